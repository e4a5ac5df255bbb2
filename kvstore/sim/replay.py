"""Hit-rate simulation: replay a `Trace` through the store's own placement core.

    request i:  hit = leading blocks held in some tier       (counted before any change)
                then each block, first first:  held -> touch (+ promote to the write tier)
                                               new  -> insert into the write tier,
                                                       evicting (demoting) as the Store does

Semantics (those of Mooncake's published figures, so results compare with them): request
``i`` hits ``min(hit_blocks * block_tokens, input_tokens)`` tokens; the hit rate is hit
tokens over input tokens, summed over the trace. Hit tokens are attributed to the
fastest tier holding each hit block (the last block trimmed to the input length).

Placement is the Store's: `kvstore.placement.Placement`, the one implementation of the
placement rules, run with no media (tiers counted in blocks, nothing stored) over the
present tiers (fastest first, only those with a capacity): new blocks go to tier 0, a
victim goes one tier down unless a lower tier already holds it, the last tier drops it; a
hit in a slower tier is copied up to tier 0 (``promote_on_hit``); a request's own new
blocks are not evicted to make room for their descendants (the Store's ``put_many``
rule): such a block goes one tier down, or the rest of the chain is not stored. Every
block takes ``block_tokens`` tokens of capacity, a trailing partial block included (it
fills a whole page in a paged KV cache). The trace is interned to dense ids once
(`Trace.interned`) and replayed in compiled code.

Invariants: each tier holds at most its capacity in blocks after every access.

`kvstore.sim.pool` runs the same core over N nodes (a pool, per node or pooled). Two
references beside the replay: `infinite_bound` (every block ever seen stays) and
`belady` (one cache of the total capacity that evicts the block whose next use is
farthest, or does not admit a block used later than everything it holds).
"""

from __future__ import annotations

from array import array
from collections.abc import Callable
from dataclasses import dataclass, field

from kvstore.errors import ConfigError
from kvstore.placement import EvictionPolicy, Placement
from kvstore.sim import _bounds
from kvstore.sim.traces import Interned, Trace

# Called now and then with the number of requests replayed so far.
Progress = Callable[[int], None]
PROGRESS_EVERY = 4096


@dataclass(frozen=True)
class ReplayConfig:
    """Tier capacities in blocks (fastest first, zero for an absent tier) and the policy."""

    capacity_blocks: tuple[int, ...]
    tier_names: tuple[str, ...] = ("hbm", "dram", "nvme")
    policy: EvictionPolicy = EvictionPolicy.LEAF_LRU
    promote_on_hit: bool = True
    window_s: float | None = None

    def __post_init__(self) -> None:
        if len(self.capacity_blocks) != len(self.tier_names):
            raise ConfigError("ReplayConfig: one capacity per tier name")
        if any(c < 0 for c in self.capacity_blocks):
            raise ConfigError(f"ReplayConfig: capacities must not be negative, got "
                              f"{self.capacity_blocks}")
        if not any(self.capacity_blocks):
            raise ConfigError("give at least one tier a capacity of one block or more "
                              "(--hbm, --dram or --nvme)")
        if self.window_s is not None and self.window_s <= 0:
            raise ConfigError(f"--window must be positive, got {self.window_s}")

    @property
    def total_blocks(self) -> int:
        return sum(self.capacity_blocks)


@dataclass
class Windows:
    """Input and hit tokens per window of ``width_s`` seconds of trace time."""

    width_s: float
    input_tokens: list[int] = field(default_factory=list)
    hit_tokens: list[int] = field(default_factory=list)

    def add(self, timestamp_s: float, input_tokens: int, hit_tokens: int) -> None:
        w = int(timestamp_s // self.width_s)
        while len(self.input_tokens) <= w:
            self.input_tokens.append(0)
            self.hit_tokens.append(0)
        self.input_tokens[w] += input_tokens
        self.hit_tokens[w] += hit_tokens

    def rows(self) -> list[dict[str, float]]:
        return [{"start_s": w * self.width_s, "input_tokens": n, "hit_tokens": h,
                 "hit_rate": h / n if n else 0.0}
                for w, (n, h) in enumerate(zip(self.input_tokens, self.hit_tokens, strict=True))]


@dataclass
class ReplayResult:
    name: str
    input_tokens: int = 0
    hit_tokens: int = 0
    hit_tokens_per_tier: dict[str, int] = field(default_factory=dict)
    num_accesses: int = 0
    evictions: int = 0
    demotions: int = 0
    promotions: int = 0
    windows: Windows | None = None

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.input_tokens if self.input_tokens else 0.0

    def to_dict(self) -> dict[str, object]:
        doc: dict[str, object] = {
            "hit_rate": self.hit_rate, "hit_tokens": self.hit_tokens,
            "input_tokens": self.input_tokens, "num_accesses": self.num_accesses}
        if self.hit_tokens_per_tier:
            doc.update(hit_tokens_per_tier=self.hit_tokens_per_tier, evictions=self.evictions,
                       demotions=self.demotions, promotions=self.promotions)
        if self.windows is not None:
            doc["windows"] = self.windows.rows()
        return doc


def replay(trace: Trace, config: ReplayConfig, progress: Progress | None = None
           ) -> ReplayResult:
    """Replay ``trace`` through the placement core with ``config``'s tiers and policy."""
    interned = trace.interned()
    present = [t for t, c in enumerate(config.capacity_blocks) if c > 0]
    names = [config.tier_names[t] for t in present]
    core = Placement([config.policy] * len(present),
                     capacity_blocks=[config.capacity_blocks[t] for t in present],
                     promote_on_hit=config.promote_on_hit, num_ids=interned.num_ids)
    hits = zero_counts(len(trace))
    tier_hits = zero_counts(len(present))
    for first in range(0, len(trace), PROGRESS_EVERY):
        if progress is not None:
            progress(first)
        core.replay(interned.flat, interned.starts, interned.input_tokens, trace.block_tokens,
                    hits, tier_hits, first, min(first + PROGRESS_EVERY, len(trace)))
    result = result_from_hits(config.policy.value, trace, interned, hits, config.window_s)
    result.hit_tokens_per_tier = dict(zip(names, tier_hits, strict=True))
    result.evictions, result.demotions = core.evictions, core.demotions
    result.promotions = core.promotions
    return result


def zero_counts(n: int) -> array:
    """``n`` 64-bit counters at zero: what the compiled loops write into."""
    return array("q", bytes(8 * n))


def result_from_hits(name: str, trace: Trace, interned: Interned, hits: array,
                     window_s: float | None) -> ReplayResult:
    """The totals (and windows) of per-request hit tokens."""
    result = ReplayResult(name, input_tokens=trace.total_input_tokens, hit_tokens=sum(hits),
                          num_accesses=len(interned.flat))
    if window_s:
        windows = result.windows = Windows(window_s)
        for ts, n, hit in zip(trace.timestamps_s, trace.input_tokens, hits, strict=True):
            windows.add(ts, n, hit)
    return result


# -- references -----------------------------------------------------------------------------------


def infinite_bound(trace: Trace, window_s: float | None = None) -> ReplayResult:
    """The hit rate of a cache that never evicts."""
    interned = trace.interned()
    hits = zero_counts(len(trace))
    _bounds.infinite_bound(interned.flat, interned.starts, interned.input_tokens,
                             trace.block_tokens, interned.num_ids, hits)
    return result_from_hits("infinite", trace, interned, hits, window_s)


def belady(trace: Trace, capacity_blocks: int, window_s: float | None = None) -> ReplayResult:
    """Belady's farthest-next-use cache of ``capacity_blocks``, with bypass: it evicts the
    block whose next use is farthest, or does not admit a block used later than everything
    it holds.

    A parent is always used before its child, so its next use comes first: the cache
    evicts chains from their tails, as leaf-first LRU does, and stays prefix-closed.
    """
    if capacity_blocks <= 0:
        raise ConfigError(f"belady needs a positive capacity, got {capacity_blocks}")
    interned = trace.interned()
    hits = zero_counts(len(trace))
    evictions = _bounds.belady(interned.flat, interned.starts, interned.input_tokens,
                                 trace.block_tokens, interned.num_ids, capacity_blocks, hits)
    result = result_from_hits("belady", trace, interned, hits, window_s)
    result.evictions = evictions
    return result

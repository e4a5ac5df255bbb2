"""Hit-rate simulation: replay a `Trace` through the store's own index and policies.

    request i:  hit = leading blocks held in some tier       (counted before any change)
                then each block, first first:  held -> touch (+ promote to the write tier)
                                               new  -> insert into the write tier,
                                                       evicting (demoting) as the Store does

Semantics (those of Mooncake's published figures, so results compare with them): request
``i`` hits ``min(hit_blocks * block_tokens, input_tokens)`` tokens; the hit rate is hit
tokens over input tokens, summed over the trace. Hit tokens are attributed to the
fastest tier holding each hit block (the last block trimmed to the input length).

Placement mirrors `kvstore.store.Store`: the tiers are `BlockIndex` tiers 0..n-1 (fastest
first, only those with a capacity), each with the `TierPolicy` the Store would make; new
blocks go to tier 0, a victim goes one tier down unless a lower tier already holds it,
the last tier drops it; a hit in a slower tier is copied up to tier 0 (``promote_on_hit``);
a request's own new blocks are not evicted to make room for their descendants (the
Store's ``put_many`` rule): such a block goes one tier down, or the rest of the chain is
not stored. Every block takes ``block_tokens`` tokens of capacity, a trailing partial
block included (it fills a whole page in a paged KV cache).

Invariants: ``used_blocks[t] <= capacity_blocks[t]`` after every access; ``used_blocks[t]``
equals the number of index entries resident in tier ``t``.

Two references beside the replay: `infinite_bound` (every block ever seen stays) and
`belady` (one cache of the total capacity that evicts the block whose next use is
farthest, or does not admit a block used later than everything it holds).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass, field

from kvstore.errors import ConfigError
from kvstore.index import BlockEntry, BlockIndex
from kvstore.policy import EvictionPolicy, make_policy
from kvstore.traces import Trace

# Called now and then with the number of requests replayed so far.
Progress = Callable[[int], None]
PROGRESS_EVERY = 512


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

    def record(self, input_tokens: int, hit_tokens: int, num_accesses: int,
               timestamp_s: float) -> None:
        """Count one replayed request."""
        self.input_tokens += input_tokens
        self.hit_tokens += hit_tokens
        self.num_accesses += num_accesses
        if self.windows is not None:
            self.windows.add(timestamp_s, input_tokens, hit_tokens)

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


class TieredReplay:
    """The Store's placement over a `BlockIndex` with no values (see the module docstring)."""

    def __init__(self, config: ReplayConfig, block_tokens: int) -> None:
        self.config = config
        self.block_tokens = block_tokens
        present = [t for t, c in enumerate(config.capacity_blocks) if c > 0]
        self.tier_names = [config.tier_names[t] for t in present]
        self.capacity_blocks = [config.capacity_blocks[t] for t in present]
        self.used_blocks = [0] * len(present)
        self.index = BlockIndex(len(present))
        self.index.attach([make_policy(config.policy, self.index, t)
                           for t in range(len(present))])
        self.result = ReplayResult(config.policy.value,
                                   hit_tokens_per_tier=dict.fromkeys(self.tier_names, 0))
        if config.window_s is not None:
            self.result.windows = Windows(config.window_s)
        self._tier_hits = [0] * len(present)

    # -- placement (Store._evict_for / _evict / _store_in / _promote, without bytes) ------------

    def _make_room(self, t: int, protect: set[bytes] | None) -> bool:
        used, capacity = self.used_blocks, self.capacity_blocks[t]
        policy = self.index.policies[t]
        while used[t] >= capacity:
            victim = policy.victim(0)
            if victim is None or (protect and victim.key in protect):
                return False
            self._evict(victim, t)
        return True

    def _evict(self, entry: BlockEntry, t: int) -> None:
        self.result.evictions += 1
        lower = t + 1
        if lower < len(self.used_blocks) and entry.residency >> lower == 0:
            if self._store_in(lower, entry, None):
                self.result.demotions += 1
        self.index.remove(entry, t)
        self.used_blocks[t] -= 1

    def _store_in(self, t: int, entry: BlockEntry, protect: set[bytes] | None) -> bool:
        if not self._make_room(t, protect):
            return False
        self.index.add(entry, t)
        self.used_blocks[t] += 1
        return True

    def _put(self, key: bytes, parent: bytes | None, protect: set[bytes]) -> bool:
        for t in range(len(self.used_blocks)):
            if self._make_room(t, protect):
                self.index.insert(key, parent, self.block_tokens, t)
                self.used_blocks[t] += 1
                return True
        return False

    def _get(self, entry: BlockEntry) -> None:
        t = entry.fastest_tier
        self.index.touch(entry)
        if self.config.promote_on_hit and t and self._store_in(0, entry, None):
            self.result.promotions += 1

    # -- the replay -------------------------------------------------------------------------------

    def request(self, keys: list[bytes], input_tokens: int, timestamp_s: float = 0.0) -> int:
        """Replay one request; returns its hit tokens."""
        index, bt = self.index, self.block_tokens
        hit_blocks = index.match_prefix(keys)
        hit_tokens = min(hit_blocks * bt, input_tokens)
        for j in range(hit_blocks):
            t = index.entries[keys[j]].fastest_tier
            assert t is not None, "a matched block is resident"
            self._tier_hits[t] += min(bt, input_tokens - j * bt) if j * bt < input_tokens else 0
        parent: bytes | None = None
        protect: set[bytes] = set()
        for key in keys:
            entry = index.get(key)
            if entry is not None:
                self._get(entry)
            elif self._put(key, parent, protect):
                protect.add(key)
            else:
                break  # put_many stops at the first block that finds no room
            parent = key
        self.result.record(input_tokens, hit_tokens, len(keys), timestamp_s)
        return hit_tokens

    def run(self, trace: Trace, progress: Progress | None = None) -> ReplayResult:
        for i, (keys, n, ts) in enumerate(zip(trace.keys, trace.input_tokens,
                                              trace.timestamps_s, strict=True)):
            self.request(keys, n, ts)
            if progress is not None and i % PROGRESS_EVERY == 0:
                progress(i)
        self.result.hit_tokens_per_tier = dict(zip(self.tier_names, self._tier_hits,
                                                   strict=True))
        return self.result


def replay(trace: Trace, config: ReplayConfig, progress: Progress | None = None
           ) -> ReplayResult:
    return TieredReplay(config, trace.block_tokens).run(trace, progress)


# -- references -----------------------------------------------------------------------------------


def _prefix_hit(keys: list[bytes], held: set[bytes] | dict[bytes, int]) -> int:
    count = 0
    for key in keys:
        if key not in held:
            break
        count += 1
    return count


def infinite_bound(trace: Trace, window_s: float | None = None) -> ReplayResult:
    """The hit rate of a cache that never evicts."""
    result = ReplayResult("infinite", windows=Windows(window_s) if window_s else None)
    seen: set[bytes] = set()
    bt = trace.block_tokens
    for keys, n, ts in zip(trace.keys, trace.input_tokens, trace.timestamps_s, strict=True):
        hit = min(_prefix_hit(keys, seen) * bt, n)
        seen.update(keys)
        result.record(n, hit, len(keys), ts)
    return result


def _next_uses(trace: Trace) -> list[int]:
    """For each access (flattened), the position of the next access to the same key;
    ``num_accesses + position`` when there is none (distinct, and later than any use)."""
    flat = [key for keys in trace.keys for key in keys]
    n = len(flat)
    next_use = [0] * n
    last: dict[bytes, int] = {}
    for pos in range(n - 1, -1, -1):
        key = flat[pos]
        next_use[pos] = last.get(key, n + pos)
        last[key] = pos
    return next_use


def belady(trace: Trace, capacity_blocks: int, window_s: float | None = None) -> ReplayResult:
    """Belady's farthest-next-use cache of ``capacity_blocks``, with bypass.

    A parent is always used before its child, so its next use comes first: the cache
    evicts chains from their tails, as leaf-first LRU does, and stays prefix-closed.
    """
    result = ReplayResult("belady", windows=Windows(window_s) if window_s else None)
    if capacity_blocks <= 0:
        raise ConfigError(f"belady needs a positive capacity, got {capacity_blocks}")
    next_use = _next_uses(trace)
    held: dict[bytes, int] = {}  # key -> its next use
    heap: list[tuple[int, bytes]] = []  # (-next use, key); lazy: stale when held differs
    bt = trace.block_tokens
    pos = 0
    for keys, n, ts in zip(trace.keys, trace.input_tokens, trace.timestamps_s, strict=True):
        hit = min(_prefix_hit(keys, held) * bt, n)
        for key in keys:
            nxt = next_use[pos]
            pos += 1
            if key in held:
                held[key] = nxt
                heapq.heappush(heap, (-nxt, key))
                continue
            if len(held) >= capacity_blocks:
                while True:  # the farthest valid entry
                    neg, victim = heap[0]
                    if held.get(victim) == -neg:
                        break
                    heapq.heappop(heap)
                if -neg < nxt:
                    continue  # used later than anything held: do not admit it
                heapq.heappop(heap)
                del held[victim]
                result.evictions += 1
            held[key] = nxt
            heapq.heappush(heap, (-nxt, key))
        if len(heap) > 4 * capacity_blocks + 64:
            heap = [(-v, k) for k, v in held.items()]
            heapq.heapify(heap)
        result.record(n, hit, len(keys), ts)
    return result

"""Fetch or recompute: which cached blocks of a prompt to load, from which tier, and which
to compute again, for the smallest time to first token.

A prompt of ``L`` tokens whose first ``n`` blocks are cached can be served as::

    load [0, a)  |  compute [a, k) while loading [k, m)  |  compute [m, L)

- ``[0, a)`` is loaded first: the head the store holds in a fast tier (HBM or DRAM),
  or nothing (``a = 0``);
- the KV of block ``i`` depends only on the tokens up to ``i``, so blocks ``[a, k)`` can
  be computed (after the head is in) while ``[k, m)`` streams in from a slower tier;
- the tail ``[m, L)`` is computed last, over the whole context; at least one token always
  runs, to give logits.

Its estimated time, from measured costs (`engines.cost_model.CostModel` for compute,
`TierCosts` for each tier's loads)::

    T = load(0, a) + max(compute(a..k), load(k, m)) + compute(m..L)

with ``T = compute(0..L)`` (one forward) when nothing is loaded. `plan_fetch` tries every
``(a, k, m)`` on a grid of block boundaries (every boundary up to 64 blocks, 65 evenly
spaced ones beyond, plus where the blocks' tier changes) and keeps the cheapest. Cold
(load nothing) and load-everything are always among the candidates, so the plan is never
estimated slower than either: a load slower than the recompute it replaces is never
chosen. A block in several tiers is loaded from its fastest.

**A load that runs late is cut** (`LoadCutoff`): a tier can be slower than its measured
cost (a disk that slowed down since start-up, a stall), and a plan made with the old cost
would then wait for its loads longer than computing the blocks would take. So a planned
load is read in chunks and checked after each: once the rest of it, at the rate seen so
far, would arrive later than computing it instead would end, the load stops there and
the rest is computed, and the tier's cost learns from what was seen. (A stall inside one
chunk, at most `CUTOFF_CHUNK_BLOCKS` blocks, is waited for: the check comes after it.) A
cut head does not cancel the middle: blocks ``[k, m)`` load while everything before them
is computed.

A prefix held wholly in HBM or DRAM is loaded whole without a search: a block from pinned
DRAM costs a tenth of its compute or less on every machine measured (the H100: about 38
us a block of llama3-8b against about 0.4 ms computed at 2K), and such a load already
overlaps the forward layer by layer; a head recomputed beside it would only compete with
the copy for the GPU.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

log = logging.getLogger(__name__)

# Tier bits as the store reports them (`kvstore.tiers.base.TIER_BIT`), fastest first.
TIER_BITS = (("hbm", 1), ("dram", 2), ("nvme", 4))
LENT = "lent"  # blocks the store lent in place, already loading when the plan is made
EXACT_UP_TO = 64  # blocks: up to this every block boundary is a candidate
GRID_POINTS = 65  # candidate boundaries beyond it, evenly spaced (a plan of 2,048 blocks
# then weighs about 17,000 candidates: well under a millisecond)
# A tier's cost learnt from observed fetches: each observation moves it this far.
OBSERVED_WEIGHT = 0.25
# A planned load is read in chunks of about an eighth of it, checked after each
# (`LoadCutoff`); at most this many blocks (each chunk is one batched read).
CUTOFF_CHUNK_BLOCKS = 16


class CostModel(Protocol):
    """The compute costs a plan needs (`engines.cost_model.CostModel` has them)."""

    prefill_fixed_s: float
    prefill_per_token_s: float
    prefill_per_token_ctx_s: float

    def prefill_s(self, num_new_tokens: int, num_context_tokens: int) -> float: ...


@dataclass(frozen=True)
class TierCost:
    """One fetch of ``b`` blocks from a tier takes ``latency_s + per_block_s * b``."""

    latency_s: float
    per_block_s: float

    def load_s(self, num_blocks: int) -> float:
        return self.latency_s + self.per_block_s * num_blocks if num_blocks else 0.0


@dataclass
class TierCosts:
    """Each tier's fetch cost into the engine's cache: measured at start-up
    (`engines.cost_model.measure_tier_costs`), then kept fresh from the fetches the engine
    observes (`observe`)."""

    tiers: dict[str, TierCost] = field(default_factory=dict)

    def observe(self, tier: str, num_blocks: int, seconds: float) -> None:
        """Move ``tier``'s per-block cost towards an observed fetch of ``num_blocks``."""
        if num_blocks <= 0 or seconds <= 0 or not math.isfinite(seconds):
            return
        old = self.tiers.get(tier)
        if old is None:
            self.tiers[tier] = TierCost(0.0, seconds / num_blocks)
            return
        seen = max(seconds - old.latency_s, 0.0) / num_blocks
        per_block = (1 - OBSERVED_WEIGHT) * old.per_block_s + OBSERVED_WEIGHT * seen
        self.tiers[tier] = replace(old, per_block_s=per_block)


@dataclass(frozen=True)
class FetchPlan:
    """What to do with a prompt's cached prefix (see the module docstring)."""

    num_tokens: int
    cached_blocks: int  # n: leading blocks the store holds
    head_load_end: int  # a: blocks [0, a) loaded first
    compute_end: int  # k: blocks [a, k) computed while [k, m) loads
    load_end: int  # m: blocks [k, m) loaded; the tail [m*block_tokens, L) computed
    loaded_per_tier: dict[str, int]
    estimate_s: float
    cold_s: float  # nothing loaded
    load_all_s: float  # every usable cached block loaded
    middle_tier: str | None = None  # the tier of blocks [k, m), when they share one
    head_tier: str | None = None  # the tier of the head's blocks not lent, when one

    @property
    def loaded_blocks(self) -> int:
        return self.head_load_end + self.load_end - self.compute_end

    @property
    def recomputed_cached_blocks(self) -> int:
        """Blocks the store holds that are computed anyway."""
        return self.cached_blocks - self.loaded_blocks

    @property
    def loads_everything(self) -> bool:
        return self.loaded_blocks == self.cached_blocks

    def describe(self) -> str:
        return (f"{self.num_tokens} tokens, {self.cached_blocks} blocks cached: load "
                f"[0,{self.head_load_end}), compute [{self.head_load_end},"
                f"{self.compute_end}) while loading [{self.compute_end},{self.load_end}), "
                f"then the rest; loads {self.loaded_per_tier}; estimated "
                f"{self.estimate_s * 1e3:.2f} ms (cold {self.cold_s * 1e3:.2f}, load all "
                f"{self.load_all_s * 1e3:.2f})")


def best_tier(bits: int) -> str | None:
    for name, bit in TIER_BITS:
        if bits & bit:
            return name
    return None


def _candidates(n: int, boundaries: Sequence[int]) -> np.ndarray:
    points = set(range(min(n, EXACT_UP_TO) + 1))
    if n > EXACT_UP_TO:
        points.update(np.rint(np.linspace(0, n, GRID_POINTS)).astype(np.int64).tolist())
    points.update(b for b in boundaries if 0 <= b <= n)
    return np.array(sorted(points), dtype=np.int64)


def plan_fetch(num_tokens: int, tier_bits: Sequence[int], cost: CostModel,
               tiers: TierCosts, *, block_tokens: int, lent: int = 0,
               overlap: bool = True) -> FetchPlan:
    """The cheapest plan for a prompt of ``num_tokens`` tokens whose leading cached blocks
    are ``lent`` blocks already loading (lent in place by the store: they cost nothing
    more and are always kept) followed by blocks of residency bits ``tier_bits`` (one
    entry per block; the first 0 ends the cached prefix). A block whose tier has no known
    cost counts as not cached. Without ``overlap`` (an engine that computes a request in
    one forward: the decode engine's batched step) the plan only chooses how many leading
    blocks to load, ``T = load(0, a) + compute(a..L)``."""
    if num_tokens <= 0:
        raise ValueError("a prompt has at least one token")
    costs = {**tiers.tiers, LENT: TierCost(0.0, 0.0)}
    usable = (num_tokens - 1) // block_tokens
    names = [LENT] * min(lent, usable)
    for bits in tier_bits[:max(usable - len(names), 0)]:
        name = best_tier(bits)
        if name is None or name not in costs:
            break
        names.append(name)
    n = len(names)
    per_block = np.array([costs[t].per_block_s for t in names] or [0.0])[:n]
    cum = np.concatenate([[0.0], np.cumsum(per_block)])
    counts = {t: np.concatenate([[0], np.cumsum([x == t for x in names])]).astype(np.int64)
              for t in costs}
    boundaries = [i for i in range(1, n) if names[i] != names[i - 1]]
    fast = 0
    while fast < n and names[fast] in (LENT, "hbm", "dram"):
        fast += 1
    if n and fast == n:
        return _load_all(num_tokens, names, cost, costs, block_tokens)
    lent = min(lent, n)

    def load_s(start: np.ndarray, end: np.ndarray) -> np.ndarray:
        total = cum[end] - cum[start]
        for t, c in counts.items():
            total = total + np.where(c[end] > c[start], costs[t].latency_s, 0.0)
        return total

    def compute_s(start: np.ndarray, end: np.ndarray) -> np.ndarray:
        """Tokens [start, end) computed after ``start`` cached ones (arrays of tokens)."""
        new = end - start
        return np.where(new > 0, cost.prefill_fixed_s + cost.prefill_per_token_s * new
                        + cost.prefill_per_token_ctx_s * new * end, 0.0)

    cold = float(compute_s(np.array(0), np.array(num_tokens)))
    grid = _candidates(n, [*boundaries, fast])
    if not overlap:
        heads = grid[grid >= lent]
        totals = (load_s(np.zeros_like(heads), heads)
                  + compute_s(heads * block_tokens, np.full_like(heads, num_tokens)))
        a = int(heads[int(np.argmin(totals))])
        return _plan_of(num_tokens, names, a, a, a, float(totals.min()), cold,
                        float(totals[-1]) if heads[-1] == n else np.inf)
    best = (cold, 0, 0, 0) if not lent else (np.inf, lent, lent, lent)
    for a in sorted({lent, fast}):
        ks = grid[grid >= a]
        k, m = np.meshgrid(ks, ks, indexing="ij")
        ok = m >= k
        head = float(load_s(np.array(0), np.array(a)))
        middle = np.maximum(compute_s(np.full_like(k, a * block_tokens), k * block_tokens),
                            load_s(k, m))
        tail = compute_s(m * block_tokens, np.full_like(m, num_tokens))
        total = np.where(ok, head + middle + tail, np.inf)
        # Nothing loaded at all is the cold forward (one forward, not several).
        total = np.where((a == 0) & (m == k), np.inf, total)
        i = np.unravel_index(int(np.argmin(total)), total.shape)
        if total[i] < best[0]:
            best = (float(total[i]), a, int(k[i]), int(m[i]))
    estimate, a, k, m = best
    everything = float(load_s(np.array(0), np.array(n))
                       + compute_s(np.array(n * block_tokens), np.array(num_tokens))) \
        if n else cold
    if everything <= estimate:  # ties go to the simplest plan: one load, one forward
        estimate, a, k, m = everything, n, n, n
    return _plan_of(num_tokens, names, a, k, m, estimate, cold, everything)


def _plan_of(num_tokens: int, names: list[str], a: int, k: int, m: int, estimate: float,
             cold: float, everything: float) -> FetchPlan:
    loaded: dict[str, int] = {}
    for i in [*range(0, a), *range(k, m)]:
        loaded[names[i]] = loaded.get(names[i], 0) + 1
    middle = set(names[k:m])
    head = set(names[:a]) - {LENT}
    return FetchPlan(num_tokens=num_tokens, cached_blocks=len(names), head_load_end=a,
                     compute_end=k, load_end=m, loaded_per_tier=loaded,
                     estimate_s=estimate, cold_s=cold, load_all_s=everything,
                     middle_tier=middle.pop() if len(middle) == 1 else None,
                     head_tier=head.pop() if len(head) == 1 else None)


def _load_all(num_tokens: int, names: list[str], cost: CostModel,
              costs: dict[str, TierCost], block_tokens: int) -> FetchPlan:
    """The plan that loads every one of the cached blocks ``names`` (their tiers)."""
    n = len(names)
    load = sum(costs[t].load_s(names.count(t)) for t in set(names))
    estimate = load + cost.prefill_s(num_tokens - n * block_tokens, num_tokens)
    return _plan_of(num_tokens, names, n, n, n, estimate,
                    cost.prefill_s(num_tokens, num_tokens), estimate)


class LoadCutoff:
    """Whether a planned load of blocks ``[first_block, first_block + num_blocks)`` of a
    prompt of ``num_tokens`` tokens should go on (see the module docstring), asked after
    each chunk of it by `keep_going`. With ``done`` of its blocks read ``elapsed`` seconds
    into the load, the rest at the rate seen so far would be in at
    ``now + rest * elapsed / done``; computed instead, in the forward over the tail, it
    would end at ``max(now, free_until) + compute(rest)``. The load goes on while the
    first is not later than the second. ``free_until_s`` (a `time.perf_counter` time):
    until when the load costs nothing because the blocks before it are computed
    meanwhile (their estimated end, or later if `head_done` is told later); None for a
    load nothing overlaps."""

    def __init__(self, planner: FetchPlanner, num_tokens: int, first_block: int,
                 num_blocks: int, free_until_s: float | None = None) -> None:
        self.planner = planner
        self.num_tokens = num_tokens
        self.first_block = first_block
        self.num_blocks = num_blocks
        self.free_until_s = free_until_s
        self.cut_at: int | None = None  # blocks read when the load was cut, if it was

    @property
    def chunk_blocks(self) -> int:
        return max(1, min(CUTOFF_CHUNK_BLOCKS, -(-self.num_blocks // 8)))

    def head_done(self, now_s: float) -> None:
        """The caller is done computing the blocks before the load (launching them, on a
        GPU, which may still be computing: so this moves the estimated end later, never
        earlier): from then on the load is waited for."""
        self.free_until_s = max(self.free_until_s or now_s, now_s)

    def recompute_s(self, done: int) -> float:
        """What computing the load's blocks after its first ``done`` adds to the tail's
        forward (the estimate the plan was made with)."""
        cost, bt, end = self.planner.cost, self.planner.block_tokens, self.num_tokens
        first = (self.first_block + done) * bt
        last = (self.first_block + self.num_blocks) * bt
        return cost.prefill_s(end - first, end) - cost.prefill_s(end - last, end)

    def keep_going(self, done: int, elapsed_s: float, now_s: float) -> bool:
        rest = self.num_blocks - done
        if rest <= 0 or done <= 0:
            return True
        arrives = now_s + rest * elapsed_s / done
        computed = max(now_s, self.free_until_s or now_s) + self.recompute_s(done)
        if arrives <= computed:
            return True
        self.cut_at = done
        self.planner.count_cut(rest)
        log.debug("fetch plan: the load of blocks [%d, %d) cut after %d (%.2f ms in); the "
                  "rest would arrive in %.2f ms, computed in %.2f ms", self.first_block,
                  self.first_block + self.num_blocks, done, elapsed_s * 1e3,
                  (arrives - now_s) * 1e3, (computed - now_s) * 1e3)
        return False


class FetchPlanner:
    """Plans with one engine's costs (`plan_fetch`), counts what its plans did, and learns
    each tier's cost from the planned loads it is told of (`observer`)."""

    def __init__(self, cost: CostModel, tiers: TierCosts, *, block_tokens: int) -> None:
        self.cost = cost
        self.tiers = tiers
        self.block_tokens = block_tokens
        self._lock = threading.Lock()
        # metrics: blocks loaded per tier, cached blocks computed anyway, plans made;
        # planned loads cut for running late (`LoadCutoff`) and the blocks they left
        self.loaded_blocks: dict[str, int] = {}
        self.recomputed_cached_blocks = 0
        self.plans = 0
        self.cut_loads = 0
        self.cut_blocks = 0

    def plan(self, num_tokens: int, tier_bits: Sequence[int], *, lent: int = 0,
             overlap: bool = True) -> FetchPlan:
        """The plan for a request (`plan_fetch`), counted in `stats`."""
        with self._lock:
            plan = plan_fetch(num_tokens, tier_bits, self.cost, self.tiers,
                              block_tokens=self.block_tokens, lent=lent, overlap=overlap)
            self.plans += 1
            for tier, count in plan.loaded_per_tier.items():
                self.loaded_blocks[tier] = self.loaded_blocks.get(tier, 0) + count
            self.recomputed_cached_blocks += plan.recomputed_cached_blocks
        return plan

    def estimate(self, num_tokens: int, tier_bits: Sequence[int], *, overlap: bool = True
                 ) -> FetchPlan:
        """The plan a request would get, not counted (a router's question)."""
        with self._lock:
            return plan_fetch(num_tokens, tier_bits, self.cost, self.tiers,
                              block_tokens=self.block_tokens, overlap=overlap)

    def cutoff(self, plan: FetchPlan, *, first_block: int, num_blocks: int,
               overlapped: bool = False, computed_from: int | None = None,
               now_s: float | None = None) -> LoadCutoff:
        """The `LoadCutoff` of ``plan``'s load of ``num_blocks`` blocks from
        ``first_block``: its head's (nothing computed meanwhile), or, ``overlapped``, its
        middle's (free until the blocks before it, from ``computed_from``, default the
        plan's head end, are computed: by the estimate, from ``now_s``, until
        `LoadCutoff.head_done`)."""
        free_until = None
        if overlapped:
            bt = self.block_tokens
            start = time.perf_counter() if now_s is None else now_s
            first = plan.head_load_end if computed_from is None else computed_from
            free_until = start + self.cost.prefill_s(
                (plan.compute_end - first) * bt, plan.compute_end * bt)
        return LoadCutoff(self, plan.num_tokens, first_block, num_blocks, free_until)

    def count_cut(self, num_blocks: int) -> None:
        with self._lock:
            self.cut_loads += 1
            self.cut_blocks += num_blocks

    def observer(self, plan: FetchPlan, *, head: bool = False
                 ) -> Callable[[int, float], None] | None:
        """What the load of ``plan``'s middle blocks (or, ``head``, of its head's blocks
        not lent) reports its time to (None: blocks of several tiers, whose shares of the
        time are unknown)."""
        tier = plan.head_tier if head else plan.middle_tier
        if tier is None or tier == LENT:
            return None

        def observe(num_blocks: int, seconds: float) -> None:
            with self._lock:
                self.tiers.observe(tier, num_blocks, seconds)

        return observe

    def stats(self) -> dict[str, object]:
        with self._lock:
            return {"plans": self.plans, "loaded_blocks": dict(self.loaded_blocks),
                    "recomputed_cached_blocks": self.recomputed_cached_blocks,
                    "cut_loads": self.cut_loads, "cut_blocks": self.cut_blocks,
                    "tier_costs": {t: {"latency_s": c.latency_s,
                                       "per_block_s": c.per_block_s}
                                   for t, c in self.tiers.tiers.items()}}

"""What a request costs where: a model fitted from measurements on the running model and
store, never constants. The conductor routes with it.

    prefill_s(new, ctx) = fixed + per_token * new + per_token_ctx * new * ctx
        compute of ``new`` tokens after ``ctx - new`` cached ones: linear layers scale
        with ``new``, attention with ``new * ctx``; fitted by least squares over timed
        forwards of several lengths and cached fractions
    fetch_s(blocks)     = fetch_fixed + fetch_per_block * blocks    (store -> engine cache)
    publish_s(blocks)   = publish_fixed + publish_per_block * blocks (engine cache -> store)
        timed through the engine's own store handle (embedded store or daemon client), with
        scratch keys that are deleted after
    decode_step_s       one batched decode step of the running batch

and, for the fetch planner (`engines.fetch_plan`), each tier's fetch cost, timed by the
engine's own fetch path on blocks put there for it, so that a tier the engine's store holds
few blocks in has a cost too: through a scratch store of that tier alone for an embedded
store (`measure_tier_costs`), in the daemon's own tiers for a daemon's client
(`measure_daemon_tier_costs`; `planner_for` picks).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

import kvstore
from engines.fetch_plan import TIER_BITS, FetchPlanner, TierCost, TierCosts
from engines.kv_io import KVBlockIO
from engines.model import LlamaModel
from engines.paged_cache import SequenceKV
from kvstore.errors import KVStoreError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CostModel:
    prefill_fixed_s: float
    prefill_per_token_s: float
    prefill_per_token_ctx_s: float
    fetch_fixed_s: float
    fetch_per_block_s: float
    publish_fixed_s: float
    publish_per_block_s: float
    decode_step_s: float

    def prefill_s(self, num_new_tokens: int, num_context_tokens: int) -> float:
        if num_new_tokens <= 0:
            return 0.0
        return (self.prefill_fixed_s + self.prefill_per_token_s * num_new_tokens
                + self.prefill_per_token_ctx_s * num_new_tokens * num_context_tokens)

    def fetch_s(self, num_blocks: int) -> float:
        return self.fetch_fixed_s + self.fetch_per_block_s * num_blocks if num_blocks else 0.0

    def publish_s(self, num_blocks: int) -> float:
        return (self.publish_fixed_s + self.publish_per_block_s * num_blocks
                if num_blocks else 0.0)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def fit_line(xs: list[list[float]], ys: list[float]) -> list[float]:
    """Non-negative least squares by clipping: coefficients of ``ys ~ xs`` (a column of
    ones included by the caller for the intercept)."""
    coef, *_ = np.linalg.lstsq(np.asarray(xs, dtype=float), np.asarray(ys, dtype=float),
                               rcond=None)
    return [max(float(c), 0.0) for c in coef]


def _time(fn: Any, repeats: int) -> float:
    """The median of ``repeats`` timed runs of ``fn``."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def measure_prefill(model: LlamaModel, lengths: list[int], *, block_tokens: int = 16,
                    repeats: int = 3) -> list[tuple[int, int, float]]:
    """(new, context, seconds) of forwards: whole prompts, and tails after half of each."""
    samples = []
    top = max(lengths)
    cache = model.new_cache(num_pages=-(-top // block_tokens), page_tokens=block_tokens,
                            cuda_graphs=True)  # as the engines run (on a GPU)
    tokens = torch.randint(0, model.config.vocab_size, (top,),
                           generator=torch.Generator().manual_seed(0)).tolist()
    for length in lengths:
        for cached in sorted({0, (length // 2) // block_tokens * block_tokens}):
            seq = SequenceKV()
            cache.reserve(seq, length)

            def run(seq: SequenceKV = seq, cached: int = cached, length: int = length) -> None:
                seq.num_tokens = cached
                model.forward(cache, [(seq, tokens[cached:length])])

            run()  # warm-up (first calls of a shape are slow), and the cached part's KV
            run()
            samples.append((length - cached, length, _time(run, repeats)))
            cache.release(seq)
    return samples


def measure_decode_step(model: LlamaModel, *, context_tokens: int, block_tokens: int = 16,
                        repeats: int = 5) -> float:
    """Seconds of one decode step (one new token) after ``context_tokens`` tokens."""
    cache = model.new_cache(num_pages=-(-(context_tokens + 1) // block_tokens),
                            page_tokens=block_tokens, cuda_graphs=True)
    seq = SequenceKV()
    cache.reserve(seq, context_tokens + 1)
    seq.num_tokens = context_tokens  # the cached KV's values do not change the cost

    def step() -> None:
        seq.num_tokens = context_tokens
        model.forward(cache, [(seq, [1])])

    step()
    return _time(step, repeats)


def measure_transfer(io: KVBlockIO, num_blocks: int, *, repeats: int = 3
                     ) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(blocks, seconds) of publishing and fetching ``n`` blocks through ``io``'s store,
    for n in (1, num_blocks), under scratch keys deleted afterwards."""
    block_tokens = io.block_tokens
    seq = SequenceKV()
    if not io.cache.reserve(seq, num_blocks * block_tokens):
        raise ValueError(f"the engine's cache cannot hold {num_blocks} calibration blocks")
    publish, fetch = [], []
    try:
        for n in sorted({1, num_blocks}):
            for _ in range(repeats):
                # Fresh keys per run: a publish of keys the store holds would skip nothing
                # but overwrite, which is not what a real publish does.
                salt = os.urandom(8).hex()
                tokens = [hash((salt, i)) % io.model.config.vocab_size
                          for i in range(n * block_tokens)]
                keys = io.keys(tokens)
                seq.num_tokens = n * block_tokens
                start = time.perf_counter()
                publisher = io.publisher(keys, seq, 0)
                for layer in range(io.model.config.num_layers):
                    publisher.after_layer(layer)
                stored = publisher.finish()
                publish.append((n, time.perf_counter() - start))
                start = time.perf_counter()
                load = io.fetch(keys, seq)
                load.wait_all()
                fetch.append((n, time.perf_counter() - start))
                if stored != n or load.num_blocks != n:
                    log.warning("calibration stored %d and fetched %d of %d blocks",
                                stored, load.num_blocks, n)
                for key in keys:
                    io.store.delete(key)
    finally:
        io.cache.release(seq)
    return publish, fetch


def calibrate(model: LlamaModel, io: KVBlockIO, *, lengths: list[int] | None = None,
              num_blocks: int = 8) -> CostModel:
    """Fit a `CostModel` by timing this model and this store (a few seconds)."""
    lengths = lengths or [16, 128, 384]
    prefill = measure_prefill(model, lengths, block_tokens=io.block_tokens)
    a, b, c = fit_line([[1.0, new, new * ctx] for new, ctx, _ in prefill],
                       [s for *_, s in prefill])
    publish, fetch = measure_transfer(io, num_blocks)
    pf, pb = fit_line([[1.0, n] for n, _ in publish], [s for _, s in publish])
    ff, fb = fit_line([[1.0, n] for n, _ in fetch], [s for _, s in fetch])
    step_s = measure_decode_step(model, context_tokens=max(lengths), block_tokens=io.block_tokens)
    cost = CostModel(prefill_fixed_s=a, prefill_per_token_s=b, prefill_per_token_ctx_s=c,
                     fetch_fixed_s=ff, fetch_per_block_s=fb, publish_fixed_s=pf,
                     publish_per_block_s=pb, decode_step_s=step_s)
    log.info("cost model for %s: %s", model.model_id,
             {k: f"{v:.3g}" for k, v in cost.as_dict().items()})
    return cost


def scratch_tier_config(tier: str, block_bytes: int, num_blocks: int, *,
                        device: str = "cuda", nvme_dir: str | None = None
                        ) -> kvstore.StoreConfig:
    """A store holding ``num_blocks`` blocks in ``tier`` alone."""
    room = (num_blocks + 8) * block_bytes
    if tier == "hbm":
        return kvstore.StoreConfig(hbm_bytes=room, dram_bytes=0, device=device,
                                   max_value_bytes=block_bytes)
    if tier == "dram":
        return kvstore.StoreConfig(dram_bytes=room, max_value_bytes=block_bytes)
    if tier == "nvme":
        if nvme_dir is None:
            raise ValueError("an NVMe tier's cost needs a directory on its disk")
        return kvstore.StoreConfig(dram_bytes=0, nvme_path=nvme_dir, nvme_bytes=2 * room,
                                   max_value_bytes=block_bytes)
    raise ValueError(f"unknown tier {tier!r}")


def measure_tier_cost(io: KVBlockIO, tier: str, *, num_blocks: int = 16, repeats: int = 3,
                      nvme_dir: str | None = None) -> TierCost:
    """The cost of fetching blocks from ``tier`` into ``io``'s cache: ``num_blocks`` blocks
    put into a scratch store of that tier alone (flushed, so NVMe reads go to the disk),
    then fetched by ``io``'s fetch path, 1 and ``num_blocks`` at a time; the line through
    the medians. ``nvme_dir``: a directory on the NVMe tier's disk (a scratch directory is
    made in it and removed after)."""
    scratch = tempfile.mkdtemp(prefix="kvstore-cost-", dir=nvme_dir) if tier == "nvme" else None
    config = scratch_tier_config(tier, io.stored_block_bytes, num_blocks,
                                 device=str(io.cache.device), nvme_dir=scratch)
    try:
        with kvstore.Store(config) as store:
            probe = KVBlockIO(io.model, io.cache, store,
                              codec=io.codec.name if io.codec is not None else None)
            try:
                tokens = torch.randint(0, io.model.config.vocab_size,
                                       (num_blocks * io.block_tokens,),
                                       generator=torch.Generator().manual_seed(1)).tolist()
                keys = probe.keys(tokens)
                if store.put_many(keys, [_scratch_block(probe)] * len(keys)) != len(keys):
                    raise RuntimeError(f"the scratch {tier} store took too few blocks")
                store.flush()
                cost = _fit_fetches(probe, f"the scratch {tier} store", num_blocks, repeats,
                                    lambda n: keys[:n])
            finally:
                probe.close()
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    log.info("fetch cost from %s: %.3g s + %.3g s a block", tier, cost.latency_s,
             cost.per_block_s)
    return cost


def measure_tier_costs(io: KVBlockIO, tiers: list[str], *, nvme_dir: str | None = None,
                       num_blocks: int = 16) -> TierCosts:
    """`measure_tier_cost` of each of ``tiers`` (say, those the engine's store has)."""
    return TierCosts({tier: measure_tier_cost(io, tier, nvme_dir=nvme_dir,
                                              num_blocks=num_blocks) for tier in tiers})


def measure_daemon_tier_cost(io: KVBlockIO, tier: str, *, num_blocks: int = 16,
                             repeats: int = 3) -> TierCost:
    """The cost of fetching blocks from the daemon's ``tier`` into ``io``'s cache, where
    ``io.store`` is the daemon's client: each run puts fresh blocks into that tier of the
    daemon itself (`put_in_tier`: NVMe ones written out to its disk), checks with
    `tier_bits` that the tier is the fastest holding them, fetches them by ``io``'s own
    fetch path, and deletes them; 1 and ``num_blocks`` blocks a run, the line through the
    medians.

    Why the daemon's own tiers, and not scratch stores as `measure_tier_cost`: a fetch
    from a daemon is its disk and its memory, and the way between (same-host shared memory
    for DRAM blocks; a pin, a get_many, the daemon's read and the frames for the others),
    which only the real client path has, and the disk may be another host's. Why fresh
    blocks each run: a hit promotes a block to the daemon's write tier, so a second read
    of the same one would time DRAM. The blocks take the room of ``num_blocks`` blocks in
    the tier for a moment, as a publish of that many would."""
    store = io.store
    bit = dict(TIER_BITS)[tier]

    def held(n: int) -> list[bytes]:
        salt = os.urandom(8).hex()
        keys = io.keys([hash((salt, i)) % io.model.config.vocab_size
                        for i in range(n * io.block_tokens)])
        if store.put_in_tier(tier, keys, [_scratch_block(io)] * n) != n:
            _delete(store, keys)
            raise RuntimeError(f"the daemon's {tier} tier took too few scratch blocks (no "
                               "room, or the tenant's quota)")
        bits = store.tier_bits(keys)
        if any((b & -b) != bit for b in bits):  # the fastest tier holding it is another
            _delete(store, keys)
            raise RuntimeError(f"scratch blocks put into the daemon's {tier} tier are held "
                               f"with tier bits {sorted(set(bits))}")
        return keys

    cost = _fit_fetches(io, f"the daemon's {tier} tier", num_blocks, repeats, held,
                        lambda keys: _delete(store, keys))
    log.info("fetch cost from the daemon's %s: %.3g s + %.3g s a block", tier, cost.latency_s,
             cost.per_block_s)
    return cost


def measure_daemon_tier_costs(io: KVBlockIO, tiers: list[str], *, num_blocks: int = 16
                              ) -> TierCosts:
    """`measure_daemon_tier_cost` of each of ``tiers`` (the daemon's)."""
    return TierCosts({tier: measure_daemon_tier_cost(io, tier, num_blocks=num_blocks)
                      for tier in tiers})


def _scratch_block(io: KVBlockIO) -> torch.Tensor:
    """One block's value as ``io``'s store holds it (encoded by its codec, if any)."""
    block = io._blocks(1).fill_(1)
    return (io.codec.encode(block) if io.codec is not None else block)[0]


def _delete(store: Any, keys: list[bytes]) -> None:
    for key in keys:
        store.delete(key)


def _fit_fetches(io: KVBlockIO, where: str, num_blocks: int, repeats: int,
                 held: Callable[[int], list[bytes]],
                 done: Callable[[list[bytes]], None] | None = None) -> TierCost:
    """The line through the median times of ``io``'s fetches of 1 and ``num_blocks``
    blocks (``repeats`` runs of each after one that warms up), each run's blocks
    ``held(n)`` (keys its store holds in the tier timed) and handed to ``done`` after."""
    seq = SequenceKV()
    if not io.cache.reserve(seq, num_blocks * io.block_tokens):
        raise ValueError(f"the engine's cache cannot hold {num_blocks} calibration blocks")
    samples: list[list[float]] = []
    times: list[float] = []
    try:
        for n in sorted({1, num_blocks}):
            runs = []
            for _ in range(repeats + 1):  # the first warms up
                keys = held(n)
                try:
                    start = time.perf_counter()
                    load = io.fetch(keys, seq)
                    load.wait_all()
                    if torch.cuda.is_available():
                        torch.cuda.synchronize()
                    runs.append(time.perf_counter() - start)
                finally:
                    if done is not None:
                        done(keys)
                if load.num_blocks != n:
                    raise RuntimeError(f"fetched {load.num_blocks} of {n} blocks from {where}")
            samples.append([1.0, n])
            times.append(float(np.median(runs[1:])))
    finally:
        io.cache.release(seq)
    latency, per_block = fit_line(samples, times)
    if per_block <= 0:  # timing noise above the cost of a few blocks (a fast tier): charge
        # the larger fetch's time to its blocks, no latency
        latency, per_block = 0.0, times[-1] / num_blocks
    return TierCost(latency_s=latency, per_block_s=per_block)


def planner_for(io: KVBlockIO, cost: CostModel) -> FetchPlanner | None:
    """A fetch planner for an engine whose store is ``io.store``, with each of the store's
    tiers measured, or None where no tier's cost can be measured honestly:

    - an embedded `kvstore.Store`: through a scratch store of each tier
      (`measure_tier_costs`; an NVMe tier's scratch directory beside the store's);
    - a daemon's client: through the client, on blocks put into each of the daemon's
      tiers (`measure_daemon_tier_costs`). None where the daemon is a node of a pool (a
      block only a peer holds has no measured cost: the planner would count it as not
      cached and compute what the engine fetches from the pool without one) or refuses
      the scratch blocks (no room, a quota), said in the log;
    - None for a store that cannot tell tiers (a pool's cluster-aware client)."""
    store = io.store
    if not hasattr(store, "tier_bits"):
        return None
    if hasattr(store, "capacities"):  # an embedded Store
        tiers = [t for t in store.capacities() if t != "hbm" or io.cache.device.type == "cuda"]
        nvme_path = getattr(getattr(store, "config", None), "nvme_path", None)
        nvme_dir = os.path.dirname(os.path.abspath(nvme_path)) if nvme_path else None
        if nvme_dir is None:
            tiers = [t for t in tiers if t != "nvme"]
        costs = measure_tier_costs(io, tiers, nvme_dir=nvme_dir, num_blocks=8)
    else:  # a daemon's client
        tiers = getattr(store, "tiers", None)
        if tiers is None or not hasattr(store, "put_in_tier"):
            return None
        if "remote" in tiers:
            log.info("no fetch planner: the daemon is a node of a pool, whose blocks on "
                     "other nodes have no measured cost")
            return None
        try:
            costs = measure_daemon_tier_costs(io, tiers, num_blocks=8)
        except (KVStoreError, RuntimeError) as e:
            log.warning("no fetch planner: measuring the daemon's tiers failed (%s)", e)
            return None
    return FetchPlanner(cost, costs, block_tokens=io.block_tokens)


def planner_costs(planner: FetchPlanner) -> dict[str, Any]:
    """What a fetch planner plans with, as plain values (`kvstore serve` hands them from
    the engine process that measured them to the others)."""
    return {"cost": asdict(planner.cost),
            "tiers": {t: [c.latency_s, c.per_block_s] for t, c in planner.tiers.tiers.items()}}


def planner_of(costs: dict[str, Any], block_tokens: int) -> FetchPlanner:
    """A fetch planner with ``costs`` (`planner_costs`)."""
    tiers = TierCosts({t: TierCost(*c) for t, c in costs["tiers"].items()})
    return FetchPlanner(CostModel(**costs["cost"]), tiers, block_tokens=block_tokens)

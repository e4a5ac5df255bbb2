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

and, for the fetch planner (`engines.fetch_plan`), each tier's fetch cost
(`measure_tier_costs`): blocks timed through a scratch store of that tier alone, by the
engine's own fetch path, so that a tier the engine's store holds few blocks in has a cost
too.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

import kvstore
from engines.fetch_plan import FetchPlanner, TierCost, TierCosts
from engines.kv_io import KVBlockIO
from engines.model import LlamaModel
from engines.paged_cache import SequenceKV

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
    seq = SequenceKV()
    if not io.cache.reserve(seq, num_blocks * io.block_tokens):
        raise ValueError(f"the engine's cache cannot hold {num_blocks} calibration blocks")
    try:
        with kvstore.Store(config) as store:
            probe = KVBlockIO(io.model, io.cache, store,
                              codec=io.codec.name if io.codec is not None else None)
            try:
                tokens = torch.randint(0, io.model.config.vocab_size,
                                       (num_blocks * io.block_tokens,),
                                       generator=torch.Generator().manual_seed(1)).tolist()
                keys = probe.keys(tokens)
                block = probe._blocks(1).fill_(1)
                block = (probe.codec.encode(block) if probe.codec is not None else block)[0]
                if store.put_many(keys, [block] * len(keys)) != len(keys):
                    raise RuntimeError(f"the scratch {tier} store took too few blocks")
                store.flush()
                samples: list[list[float]] = []
                times: list[float] = []
                for n in sorted({1, num_blocks}):
                    runs = []
                    for _ in range(repeats + 1):  # the first warms up
                        start = time.perf_counter()
                        load = probe.fetch(keys[:n], seq)
                        load.wait_all()
                        if torch.cuda.is_available():
                            torch.cuda.synchronize()
                        runs.append(time.perf_counter() - start)
                        if load.num_blocks != n:
                            raise RuntimeError(f"fetched {load.num_blocks} of {n} blocks "
                                               f"from the scratch {tier} store")
                    samples.append([1.0, n])
                    times.append(float(np.median(runs[1:])))
                latency, per_block = fit_line(samples, times)
                if per_block <= 0:  # timing noise above the cost of a few blocks (a fast
                    # tier): charge the larger fetch's time to its blocks, no latency
                    latency, per_block = 0.0, times[-1] / num_blocks
            finally:
                probe.close()
    finally:
        io.cache.release(seq)
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    cost = TierCost(latency_s=latency, per_block_s=per_block)
    log.info("fetch cost from %s: %.3g s + %.3g s a block", tier, latency, per_block)
    return cost


def measure_tier_costs(io: KVBlockIO, tiers: list[str], *, nvme_dir: str | None = None,
                       num_blocks: int = 16) -> TierCosts:
    """`measure_tier_cost` of each of ``tiers`` (say, those the engine's store has)."""
    return TierCosts({tier: measure_tier_cost(io, tier, nvme_dir=nvme_dir,
                                              num_blocks=num_blocks) for tier in tiers})


def planner_for(io: KVBlockIO, cost: CostModel) -> FetchPlanner | None:
    """A fetch planner for an engine whose store is ``io.store``: each of the store's tiers
    measured (`measure_tier_costs`; an NVMe tier's scratch directory beside the store's),
    or None where the store cannot say which tier holds a block (a daemon client)."""
    store = io.store
    if not hasattr(store, "tier_bits") or not hasattr(store, "capacities"):
        return None
    tiers = [t for t in store.capacities() if t != "hbm" or io.cache.device.type == "cuda"]
    nvme_path = getattr(getattr(store, "config", None), "nvme_path", None)
    nvme_dir = os.path.dirname(os.path.abspath(nvme_path)) if nvme_path else None
    if nvme_dir is None:
        tiers = [t for t in tiers if t != "nvme"]
    costs = measure_tier_costs(io, tiers, nvme_dir=nvme_dir, num_blocks=8)
    return FetchPlanner(cost, costs, block_tokens=io.block_tokens)

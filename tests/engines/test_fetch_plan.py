"""The fetch planner (`engines.fetch_plan`): its choices on cost tables worked out by hand,
its promise never to be estimated slower than recomputing or loading everything, and
planned prefills on the CPU against a real store with an NVMe tier on disk: the KV they
publish and the tokens decoded from it equal a plain recompute's, also when a block fails
its checksum mid-plan."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import kvstore
from engines.cost_model import CostModel, measure_tier_costs
from engines.decode import DecodeEngine
from engines.fetch_plan import FetchPlanner, TierCost, TierCosts, plan_fetch
from engines.prefill import PrefillEngine
from engines.presets import load_model
from engines.sampling import SamplingParams
from tests.engines.conftest import flip_on_disk

DRAM, NVME = 2, 4


def compute_cost(per_token: float = 1.0, fixed: float = 0.0, ctx: float = 0.0) -> CostModel:
    return CostModel(prefill_fixed_s=fixed, prefill_per_token_s=per_token,
                     prefill_per_token_ctx_s=ctx, fetch_fixed_s=0.0, fetch_per_block_s=0.0,
                     publish_fixed_s=0.0, publish_per_block_s=0.0, decode_step_s=0.0)


def estimate(plan, cost: CostModel, tiers: TierCosts, names: list[str], block_tokens: int
             ) -> float:
    """The plan's time, worked out again from the formula in the module docstring."""
    def load(start: int, end: int) -> float:
        part = names[start:end]
        return sum(tiers.tiers[t].load_s(part.count(t)) for t in set(part))

    def compute(start: int, end: int) -> float:
        return cost.prefill_s(end - start, end)

    a, k, m = plan.head_load_end, plan.compute_end, plan.load_end
    if a == k == m == 0:
        return compute(0, plan.num_tokens)
    bt = block_tokens
    return (load(0, a) + max(compute(a * bt, k * bt), load(k, m))
            + compute(m * bt, plan.num_tokens))


def test_a_prefix_in_dram_is_loaded_whole() -> None:
    tiers = TierCosts({"dram": TierCost(0.0, 0.01), "nvme": TierCost(0.0, 3.0)})
    plan = plan_fetch(61, [DRAM] * 60, compute_cost(), tiers, block_tokens=1)
    assert (plan.head_load_end, plan.compute_end, plan.load_end) == (60, 60, 60)
    assert plan.loaded_per_tier == {"dram": 60} and plan.loads_everything
    assert plan.estimate_s == pytest.approx(0.6 + 1.0)


def test_slow_disk_head_computed_while_the_rest_loads() -> None:
    """A token costs 1, a block (one token) from disk 3. Computing blocks [0, k) while
    [k, m) load and then the tail costs max(k, 3(m - k)) + (61 - m): best at m = 60 with
    k = 3(60 - k), k = 45: 45 + 1 = 46, against 61 cold and 180 + 1 loading everything."""
    tiers = TierCosts({"nvme": TierCost(0.0, 3.0)})
    plan = plan_fetch(61, [NVME] * 60, compute_cost(), tiers, block_tokens=1)
    assert (plan.head_load_end, plan.compute_end, plan.load_end) == (0, 45, 60)
    assert plan.estimate_s == pytest.approx(46.0)
    assert plan.cold_s == pytest.approx(61.0) and plan.load_all_s == pytest.approx(181.0)
    assert plan.loaded_per_tier == {"nvme": 15} and plan.recomputed_cached_blocks == 45
    assert plan.middle_tier == "nvme"


def test_a_disk_slower_than_any_overlap_pays_is_not_read() -> None:
    """A disk whose every read costs 100 (its latency) more than the 61 of recomputing
    everything: nothing is loaded."""
    tiers = TierCosts({"nvme": TierCost(100.0, 0.1)})
    plan = plan_fetch(61, [NVME] * 60, compute_cost(), tiers, block_tokens=1)
    assert plan.loaded_blocks == 0 and plan.estimate_s == pytest.approx(61.0)
    assert (plan.head_load_end, plan.compute_end, plan.load_end) == (0, 0, 0)


def test_mixed_tiers_load_the_dram_head_then_overlap_the_disk() -> None:
    """Blocks 0-29 in DRAM (0.01 each), 30-59 on disk (3 each). Loading the DRAM head
    (0.3), then computing [30, k) while [k, m) load: 0.3 + max(k - 30, 3(m - k)) +
    (61 - m), at best 24.3 (k = 53, m = 60, or k = 52, m = 59)."""
    tiers = TierCosts({"dram": TierCost(0.0, 0.01), "nvme": TierCost(0.0, 3.0)})
    names = ["dram"] * 30 + ["nvme"] * 30
    plan = plan_fetch(61, [DRAM] * 30 + [NVME] * 30, compute_cost(), tiers, block_tokens=1)
    assert plan.head_load_end == 30 and plan.estimate_s == pytest.approx(24.3)
    assert estimate(plan, compute_cost(), tiers, names, 1) == pytest.approx(plan.estimate_s)


def test_blocks_already_lent_are_always_kept() -> None:
    tiers = TierCosts({"nvme": TierCost(100.0, 0.1)})
    plan = plan_fetch(61, [NVME] * 30, compute_cost(), tiers, block_tokens=1, lent=30)
    assert plan.head_load_end == 30 and plan.loaded_blocks == 30  # the disk is not read
    assert plan.loaded_per_tier == {"lent": 30}
    assert plan.estimate_s == pytest.approx(31.0)


def test_no_plan_is_estimated_slower_than_recomputing_or_loading_everything() -> None:
    rng = random.Random(7)
    for _ in range(200):
        block_tokens = rng.choice([1, 4, 16])
        n = rng.randint(1, 150)
        num_tokens = n * block_tokens + rng.randint(1, block_tokens)
        cost = compute_cost(per_token=rng.uniform(0.1, 2), fixed=rng.uniform(0, 20),
                            ctx=rng.uniform(0, 0.01))
        tiers = TierCosts({"dram": TierCost(rng.uniform(0, 1), rng.uniform(0, 0.5)),
                           "nvme": TierCost(rng.uniform(0, 50), rng.uniform(0, 40))})
        bits = [rng.choice([DRAM, NVME, NVME | DRAM]) for _ in range(n)]
        plan = plan_fetch(num_tokens, bits, cost, tiers, block_tokens=block_tokens)
        assert plan.estimate_s <= plan.cold_s + 1e-9
        assert plan.estimate_s <= plan.load_all_s + 1e-9
        assert 0 <= plan.head_load_end <= plan.compute_end <= plan.load_end <= n
        names = ["dram" if b & DRAM else "nvme" for b in bits]
        if not plan.loads_everything or plan.head_load_end < n:
            assert estimate(plan, cost, tiers, names, block_tokens) == \
                pytest.approx(plan.estimate_s)


def test_a_load_that_runs_late_is_cut_where_computing_the_rest_ends_sooner() -> None:
    """One token a block, a token costs 1 s to compute (and 0.5 s more per 1,000 tokens
    of context), a prompt of 101 tokens. The head load of blocks [0, 100): nothing
    computes meanwhile, so it goes on while the rest at the rate seen so far arrives no
    later than computing it would end: the rest's 100 - done blocks cost (1 + 0.0505)
    each to compute in the tail's forward of context 101."""
    cost = compute_cost(per_token=1.0, ctx=0.0005)
    planner = FetchPlanner(cost, TierCosts({"nvme": TierCost(0.0, 0.1)}), block_tokens=1)
    plan = replace(plan_fetch(101, [NVME] * 100, cost, planner.tiers, block_tokens=1),
                   head_load_end=100, compute_end=100, load_end=100)  # (as a head load)
    cutoff = planner.cutoff(plan, first_block=0, num_blocks=100)
    assert cutoff.chunk_blocks == 13  # an eighth, rounded up
    per_block = 1.0 + 0.0005 * 101
    assert cutoff.recompute_s(20) == pytest.approx(80 * per_block)
    # 20 blocks read in 20 s: 1 s a block, the rest (80 s) just under computing it
    assert cutoff.keep_going(20, 20.0, now_s=1000.0)
    # 20 in 22 s: 1.1 s a block, 88 s for the rest, against 84.04 s to compute it: cut
    assert not cutoff.keep_going(20, 22.0, now_s=1000.0)
    assert cutoff.cut_at == 20
    assert planner.stats()["cut_loads"] == 1 and planner.stats()["cut_blocks"] == 80
    assert cutoff.keep_going(100, 1e9, now_s=1000.0)  # nothing left to cut


def test_a_middle_load_costs_nothing_until_the_head_is_computed() -> None:
    """A token costs 1 s: plan blocks [0, 40) computed while [40, 100) load, of 101
    tokens. Until the head's estimated end (40 s after the cutoff is made) the load is
    free: at 10 s in, with 10 of its 60 blocks read (1 s a block), the rest arrives at
    60 s, against 40 + 50 s computed: it goes on; at 2 s a block (arriving at 110 s) it
    is cut. Once the head is done (told at 45 s, later than its estimate) the wait
    counts from then (the rest computed in 1 s a block)."""
    cost = compute_cost(per_token=1.0)
    planner = FetchPlanner(cost, TierCosts({"nvme": TierCost(0.0, 1.0)}), block_tokens=1)
    plan = replace(plan_fetch(101, [NVME] * 100, cost, planner.tiers, block_tokens=1),
                   head_load_end=0, compute_end=40, load_end=100)
    cutoff = planner.cutoff(plan, first_block=40, num_blocks=60, overlapped=True, now_s=0.0)
    assert cutoff.free_until_s == pytest.approx(40.0)
    assert cutoff.keep_going(10, 10.0, now_s=10.0)  # in at 60, computed by 90
    assert not cutoff.keep_going(10, 20.0, now_s=20.0)  # in at 120, computed by 90
    late = planner.cutoff(plan, first_block=40, num_blocks=60, overlapped=True, now_s=0.0)
    late.head_done(45.0)
    late.head_done(30.0)  # (a GPU's launches end before its compute: never earlier)
    assert late.free_until_s == 45.0
    assert late.keep_going(40, 36.0, now_s=45.0)  # 20 more at 0.9 s: in at 63 <= 45 + 20
    assert not late.keep_going(40, 45.0, now_s=45.0)  # at 1.125 s: in at 67.5 > 65
    assert not late.keep_going(40, 80.0, now_s=80.0)  # at 2 s: in at 120 > 80 + 20


def test_a_head_load_teaches_its_tier_s_cost_as_the_middle_does() -> None:
    """A plan loading a prefix wholly from disk (a head, no middle) names the head's tier;
    its head load's observed time moves that tier's cost (a quarter of the way), and the
    middle of a plan with one reports to the middle's tier. Lent blocks name no tier."""
    cost = compute_cost(per_token=1.0)
    planner = FetchPlanner(cost, TierCosts({"dram": TierCost(0.0, 0.01),
                                            "nvme": TierCost(0.0, 0.1)}), block_tokens=1)
    head_only = planner.plan(11, [NVME] * 10, overlap=False)
    assert head_only.head_load_end == 10 and head_only.head_tier == "nvme"
    planner.observer(head_only, head=True)(10, 5.0)  # 0.5 a block seen
    assert planner.tiers.tiers["nvme"].per_block_s == pytest.approx(0.75 * 0.1 + 0.25 * 0.5)
    mixed = planner.plan(101, [DRAM] * 10 + [NVME] * 90)
    assert mixed.head_tier == "dram" and mixed.middle_tier == "nvme"
    assert planner.observer(plan_fetch(11, [], cost, planner.tiers, block_tokens=1,
                                       lent=10), head=True) is None


def test_bad_input_and_unknown_tiers() -> None:
    tiers = TierCosts({"nvme": TierCost(0.0, 3.0)})
    with pytest.raises(ValueError, match="at least one token"):
        plan_fetch(0, [], compute_cost(), tiers, block_tokens=1)
    plan = plan_fetch(61, [DRAM] * 60, compute_cost(), tiers, block_tokens=1)
    assert plan.cached_blocks == 0 and plan.loaded_blocks == 0  # DRAM has no cost: uncached


def test_observed_loads_move_a_tier_s_cost() -> None:
    tiers = TierCosts({"nvme": TierCost(0.001, 0.010)})
    for _ in range(20):
        tiers.observe("nvme", 10, 0.001 + 10 * 0.002)
    assert tiers.tiers["nvme"].per_block_s == pytest.approx(0.002, rel=0.02)
    tiers.observe("nvme", 0, 1.0)  # nothing loaded: ignored
    tiers.observe("nvme", 5, float("nan"))
    assert tiers.tiers["nvme"].per_block_s == pytest.approx(0.002, rel=0.02)


# -- planned prefills on a real store ------------------------------------------------------

BLOCK = 16


@pytest.fixture(scope="module", params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def model(request):
    """The tiny model in fp32, on the CPU and (the `gpu` marker) on a GPU, where the load
    runs on its own stream beside the head's forward and DRAM blocks are lent in place."""
    return load_model("tiny", device=request.param, dtype=torch.float32).model


def prompt_of(n: int, seed: int) -> list[int]:
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def nvme_store(path: Path) -> kvstore.Store:
    return kvstore.Store(kvstore.StoreConfig(dram_bytes=0, hbm_bytes=0, nvme_path=str(path),
                                             nvme_bytes="64MiB", max_value_bytes="1MiB"))


def overlapping_planner() -> FetchPlanner:
    """Costs under which a 200-token prompt's 12 cached blocks are split: a block costs
    16 to compute and 8 to read, so about 4 are computed while the other 8 load."""
    return FetchPlanner(compute_cost(per_token=1.0), TierCosts({"nvme": TierCost(0.0, 8.0)}),
                        block_tokens=BLOCK)


@pytest.mark.parametrize("damaged", [None, 9])
def test_a_planned_prefill_computes_the_head_while_the_disk_loads(model, tmp_path, damaged
                                                                  ) -> None:
    """The planned prefill computes blocks [0, k) while [k, m) come from disk, then the
    tail: its first token, the tail blocks it publishes again, and the tokens a decode
    engine makes from the store afterwards equal a plain recompute's. A block that fails
    its checksum mid-plan (``damaged``) ends the load there; the rest is computed."""
    prompt = prompt_of(200, seed=3)
    sampling = SamplingParams(max_new_tokens=8)
    with nvme_store(tmp_path / "nvme") as store:
        with PrefillEngine(model, store, num_pages=64) as plain:
            cold = plain.prefill(prompt)
        store.flush()
        keys = plain.io.keys(prompt)
        before = [store.get(key) for key in keys]
        if damaged is not None:
            flip_on_disk(tmp_path / "nvme", before[damaged])
        planner = overlapping_planner()
        with PrefillEngine(model, store, num_pages=64, planner=planner) as engine:
            planned = engine.prefill(prompt)
        plan = planned.plan
        assert plan is not None and 0 < plan.compute_end < plan.load_end == 12, plan
        assert planned.first_token == cold.first_token
        got = plan.load_end if damaged is None else damaged
        assert planned.num_cached_tokens == (got - plan.compute_end) * BLOCK
        assert planner.stats()["recomputed_cached_blocks"] == plan.compute_end
        assert planner.tiers.tiers["nvme"].per_block_s < 8.0  # learnt from the real read
        for key, old in zip(keys[got - 1:], before[got - 1:], strict=True):
            new = store.get(key)  # re-published from the recomputed tail
            assert new is not None
            assert torch.allclose(torch.frombuffer(bytearray(new), dtype=model.dtype),
                                  torch.frombuffer(bytearray(old), dtype=model.dtype),
                                  atol=1e-4)
        with DecodeEngine(model, store, num_pages=64) as decode:
            done = decode.generate(prompt, sampling, first_token=planned.first_token)
    assert done.output == model.generate(prompt, sampling=sampling)


def test_mixed_tiers_lend_the_dram_head_and_plan_the_disk(model, tmp_path) -> None:
    """The first blocks in DRAM, the rest on disk only: the DRAM head is loaded (on a GPU
    lent in place, on the CPU staged), the disk part planned; the tokens decoded after
    equal a plain recompute's."""
    prompt = prompt_of(400, seed=5)  # 24 full blocks; DRAM keeps about the first 10
    sampling = SamplingParams(max_new_tokens=8)
    block = model.config.kv_layout(BLOCK, model.dtype).block_bytes
    config = kvstore.StoreConfig(dram_bytes=10 * block + 1024, hbm_bytes=0,
                                 nvme_path=str(tmp_path / "nvme"), nvme_bytes="64MiB",
                                 max_value_bytes=block, promote_on_hit=False)
    with kvstore.Store(config) as store:
        with PrefillEngine(model, store, num_pages=64) as plain:
            cold = plain.prefill(prompt)
        store.flush()
        bits = store.tier_bits(plain.io.keys(prompt)[:24])
        head = next(i for i, b in enumerate(bits) if not b & 2)
        assert 0 < head < 24 and all(b & 4 for b in bits[head:]), bits
        planner = FetchPlanner(compute_cost(per_token=1.0),
                               TierCosts({"dram": TierCost(0.0, 0.01),
                                          "nvme": TierCost(0.0, 8.0)}), block_tokens=BLOCK)
        with PrefillEngine(model, store, num_pages=64, planner=planner) as engine:
            planned = engine.prefill(prompt)
        plan = planned.plan
        assert plan is not None and plan.head_load_end == head, plan
        assert head < plan.compute_end < plan.load_end, plan
        assert planned.first_token == cold.first_token
        assert planned.num_cached_tokens == (head + plan.load_end - plan.compute_end) * BLOCK
        with DecodeEngine(model, store, num_pages=64) as decode:
            done = decode.generate(prompt, sampling, first_token=planned.first_token)
    assert done.output == model.generate(prompt, sampling=sampling)


def test_a_planner_with_measured_costs_loads_a_dram_prefix_whole(model, tmp_path) -> None:
    """Costs measured through scratch stores of each tier by the engine's own fetch path;
    a prefix in DRAM is loaded whole, exactly as without a planner."""
    prompt = prompt_of(200, seed=4)
    with kvstore.Store(kvstore.StoreConfig(dram_bytes="64MiB", hbm_bytes=0)) as store, \
            PrefillEngine(model, store, num_pages=64) as engine:
        tiers = measure_tier_costs(engine.io, ["dram", "nvme"], nvme_dir=str(tmp_path),
                                   num_blocks=8)
        assert set(tiers.tiers) == {"dram", "nvme"}
        assert all(c.per_block_s > 0 for c in tiers.tiers.values())
        assert list(tmp_path.iterdir()) == []  # the scratch NVMe directory is gone
        first = engine.prefill(prompt)
        engine.planner = FetchPlanner(compute_cost(per_token=1.0), tiers, block_tokens=BLOCK)
        again = engine.prefill(prompt)
    assert again.plan is None or again.plan.loads_everything  # (a GPU: all lent, no plan)
    assert again.num_cached_tokens == 12 * BLOCK and again.first_token == first.first_token


def test_without_overlap_the_plan_only_chooses_how_many_blocks_to_load() -> None:
    """One forward computes whatever is not loaded: a block from disk at 3 against 1 to
    compute is never loaded; at 0.5 all are (30 + 1); a DRAM head (0.01 a block) is
    loaded and a slow disk after it is not (0.3 + 31)."""
    def plan(bits: list[int], nvme: float):
        tiers = TierCosts({"dram": TierCost(0.0, 0.01), "nvme": TierCost(0.0, nvme)})
        return plan_fetch(61, bits, compute_cost(), tiers, block_tokens=1, overlap=False)

    slow = plan([NVME] * 60, 3.0)
    assert slow.loaded_blocks == 0 and slow.estimate_s == pytest.approx(61.0)
    fast = plan([NVME] * 60, 0.5)
    assert fast.head_load_end == 60 and fast.estimate_s == pytest.approx(31.0)
    mixed = plan([DRAM] * 30 + [NVME] * 30, 3.0)
    assert (mixed.head_load_end, mixed.compute_end, mixed.load_end) == (30, 30, 30)
    assert mixed.estimate_s == pytest.approx(31.3)


def test_a_decode_engine_with_a_planner_loads_only_what_pays(model, tmp_path) -> None:
    """Blocks on a disk that a planner measured slower than computing them are computed
    in the request's first step instead; the reply equals the reference either way."""
    prompt = prompt_of(200, seed=6)
    sampling = SamplingParams(max_new_tokens=6)
    with nvme_store(tmp_path / "nvme") as store:
        with PrefillEngine(model, store, num_pages=64) as prefill:
            prefill.prefill(prompt)
        store.flush()
        for per_block, cached in ((100.0, 0), (0.001, 12 * BLOCK)):
            planner = FetchPlanner(compute_cost(per_token=1.0),
                                   TierCosts({"nvme": TierCost(0.0, per_block)}),
                                   block_tokens=BLOCK)
            with DecodeEngine(model, store, num_pages=64, planner=planner) as decode:
                request = decode.add_request(prompt, sampling)
                while decode.has_work:
                    decode.step()
            assert request.num_cached_tokens == cached
            assert request.output == model.generate(prompt, sampling=sampling)


def test_the_conductor_costs_a_request_with_the_engines_planners(model, tmp_path) -> None:
    """With a planner on the decode engine, the colocated estimate is its plan's: a cached
    prefix on a disk too slow to read costs what computing it does, not the cost model's
    fetch of every block."""
    from engines.conductor import Conductor

    prompt = prompt_of(200, seed=7)
    cost = compute_cost(per_token=0.001, fixed=0.002)
    cost = CostModel(**{**cost.as_dict(), "fetch_per_block_s": 1e-6, "decode_step_s": 0.01})
    with nvme_store(tmp_path / "nvme") as store:
        with PrefillEngine(model, store, num_pages=64) as prefill:
            prefill.prefill(prompt)
        store.flush()
        slow = FetchPlanner(cost, TierCosts({"nvme": TierCost(0.0, 1.0)}), block_tokens=BLOCK)
        with DecodeEngine(model, store, num_pages=64) as plain, \
                DecodeEngine(model, store, num_pages=64, planner=slow) as planned:
            with Conductor([], [plain], cost=cost) as conductor:
                without = conductor.route(prompt, SamplingParams(max_new_tokens=2))
            with Conductor([], [planned], cost=cost) as conductor:
                with_plan = conductor.route(prompt, SamplingParams(max_new_tokens=2))
    assert without.colocated_cost_s == pytest.approx(
        cost.fetch_s(12) + cost.prefill_s(200 - 12 * BLOCK, 200) + cost.decode_step_s)
    assert with_plan.colocated_cost_s == pytest.approx(cost.prefill_s(200, 200)
                                                       + cost.decode_step_s)

"""The conductor: routing decisions from a cost model, and outputs equal to the reference
whichever way a request went."""

from __future__ import annotations

import logging
import threading

import pytest
import torch

import kvstore
from engines.conductor import Conductor, Objectives
from engines.cost_model import CostModel, calibrate
from engines.decode import DecodeEngine
from engines.kv_io import CacheFullError
from engines.prefill import PrefillEngine
from engines.presets import load_model
from engines.sampling import SamplingParams

# Compute dominates transfer, as on any real link: 1 ms per token, 0.1 ms per block.
COST = CostModel(prefill_fixed_s=0.005, prefill_per_token_s=1e-3, prefill_per_token_ctx_s=0.0,
                 fetch_fixed_s=0.002, fetch_per_block_s=1e-4, publish_fixed_s=0.002,
                 publish_per_block_s=1e-4, decode_step_s=0.01)


@pytest.fixture(scope="module")
def model():
    return load_model("tiny").model


def prompt_of(n: int, seed: int) -> list[int]:
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def store() -> kvstore.Store:
    return kvstore.Store(kvstore.StoreConfig(dram_bytes="64MiB", hbm_bytes=0))


def test_routes_and_outputs(model, caplog):
    caplog.set_level(logging.INFO, logger="engines.conductor")
    shared = store()
    with Conductor([PrefillEngine(model, shared, num_pages=64)],
                   [DecodeEngine(model, shared, num_pages=128)], cost=COST) as conductor:
        sampling = SamplingParams(max_new_tokens=8)
        short = prompt_of(10, 1)
        assert not conductor.route(short, sampling).is_disaggregated  # shipping > computing
        long = prompt_of(400, 2)
        # An idle decode engine: recomputing 400 tokens there costs no one else anything,
        # but with requests decoding on it, each would stall for the whole prefill.
        busy = [conductor.decode[0].submit(prompt_of(20, 10 + i), SamplingParams(
            max_new_tokens=200)) for i in range(3)]
        while conductor.decode[0].num_running < 3:
            pass
        route = conductor.route(long, sampling)
        assert route.is_disaggregated and route.prefill == 0
        assert route.disaggregated_cost_s < route.colocated_cost_s
        results = [conductor.submit(p, sampling) for p in (short, long, prompt_of(37, 3))]
        results = [f.result(timeout=120) for f in results]
        for f in busy:
            f.result(timeout=120)
    assert [r.route.is_disaggregated for r in results] == [False, True, False]
    for r in results:
        assert r.output == model.generate(r.prompt, 8)
        assert r.ttft_s > 0 and len(r.inter_token_s) == 7
    assert results[1].prefill is not None and results[1].prefill.num_published_blocks == 25
    logged = [m for m in caplog.messages if m.startswith("route ")]
    assert len(logged) >= 5 and "est colocated" in logged[-1]
    shared.close()


def test_kv_already_at_decode_runs_colocated(model):
    shared = store()
    with Conductor([PrefillEngine(model, shared, num_pages=64)],
                   [DecodeEngine(model, shared, num_pages=128)], cost=COST) as conductor:
        prompt = prompt_of(400, 4)
        busy = conductor.decode[0].submit(prompt_of(20, 5), SamplingParams(max_new_tokens=300))
        while conductor.decode[0].num_running < 1:
            pass
        assert conductor.route(prompt, SamplingParams(max_new_tokens=4)).is_disaggregated
        conductor.run(prompt, SamplingParams(max_new_tokens=4))  # publishes its blocks
        again = conductor.run(prompt + prompt_of(5, 6), SamplingParams(max_new_tokens=4))
        assert not again.route.is_disaggregated  # its KV is in the decode engine's store
        assert again.num_cached_tokens == 400
        assert again.output == model.generate(prompt + prompt_of(5, 6), 4)
        busy.result(timeout=120)
    shared.close()


def test_prefill_goes_where_the_prefix_is_cached(model):
    stores = [store(), store()]
    engines = [PrefillEngine(model, s, num_pages=64) for s in stores]
    prompt = prompt_of(300, 7)
    engines[1].prefill(prompt)  # only the second prefill engine's store holds it
    with Conductor(engines, [DecodeEngine(model, store(), num_pages=128)],
                   cost=COST) as conductor:
        conductor.decode[0].submit(prompt_of(20, 8), SamplingParams(max_new_tokens=200))
        while conductor.decode[0].num_running < 1:
            pass
        route = conductor.route(prompt + prompt_of(40, 9), SamplingParams(max_new_tokens=4))
    assert route.prefill == 1 and route.cached_blocks_prefill == 18
    for s in stores:
        s.close()


def test_calibrated_cost_model_is_measured(model):
    with store() as s, DecodeEngine(model, s, num_pages=64) as decode:
        cost = calibrate(model, decode.io, lengths=[16, 128], num_blocks=4)
        assert cost.prefill_s(128, 128) > cost.prefill_s(16, 16) > 0
        assert cost.decode_step_s > 0 and cost.fetch_s(4) > 0 and cost.publish_s(4) > 0
        assert len(s.stats()["tiers"]) and s.stats()["tiers"]["dram"]["blocks"] == 0


def test_conductor_refuses_impossible_setups(model):
    with pytest.raises(ValueError, match="at least one decode"):
        Conductor([], [], cost=COST)
    with store() as s, Conductor([], [DecodeEngine(model, s, num_pages=2)],
                                 cost=COST) as conductor, \
            pytest.raises(CacheFullError, match="no decode engine"):
        conductor.route(prompt_of(100, 1), SamplingParams(max_new_tokens=4))


def test_a_fixed_mode_routes_every_request_its_way(model):
    shared = store()
    sampling = SamplingParams(max_new_tokens=4)
    short, long = prompt_of(10, 21), prompt_of(400, 22)
    for mode, expected in (("colocated", False), ("disaggregated", True)):
        with Conductor([PrefillEngine(model, shared, num_pages=64)],
                       [DecodeEngine(model, shared, num_pages=128)], cost=COST,
                       mode=mode) as conductor:
            assert [conductor.route(p, sampling).is_disaggregated for p in (short, long)
                    ] == [expected, expected]
            result = conductor.run(short, sampling)
            assert result.route.is_disaggregated is expected
            assert result.output == model.generate(short, 4)
    with pytest.raises(ValueError, match="mode is one of"):
        Conductor([], [DecodeEngine(model, shared, num_pages=16)], cost=COST, mode="split")
    with pytest.raises(ValueError, match="needs at least one prefill engine"):
        Conductor([], [DecodeEngine(model, shared, num_pages=16)], cost=COST,
                  mode="disaggregated")
    shared.close()


def test_with_objectives_auto_runs_colocated_what_meets_them(model, caplog):
    """Objectives of 1 s to the first token and 0.1 s between tokens, on the test's cost
    model (5 ms + 1 ms a token): a 400-token prompt runs colocated on an idle decode
    engine; beside a decoding request, a short prompt still runs colocated (a 15 ms
    stall) and the long one disaggregated (a 0.4 s stall; its hand-over within 0.11 s).
    Requests routed to the decode engine and not yet started count as busy, and their
    prefills as the next one's wait."""
    caplog.set_level(logging.INFO, logger="engines.conductor")
    shared = store()
    sampling = SamplingParams(max_new_tokens=4)
    short, long = prompt_of(10, 31), prompt_of(400, 32)
    with Conductor([PrefillEngine(model, shared, num_pages=64)],
                   [DecodeEngine(model, shared, num_pages=256)], cost=COST,
                   objectives=Objectives(ttft_s=1.0, itl_s=0.1)) as conductor:
        idle = conductor.route(long, sampling)
        assert not idle.is_disaggregated and idle.reason == "colocated meets objectives"
        entered, go_on = threading.Event(), threading.Event()

        def hold(*_: object) -> None:  # the decode engine's thread waits in here
            entered.set()
            go_on.wait(60)

        held = conductor.submit(prompt_of(20, 33), SamplingParams(max_new_tokens=8),
                                on_token=hold)
        assert entered.wait(60)
        route = conductor.route(short, sampling)
        assert not route.is_disaggregated and route.reason == "colocated meets objectives"
        route = conductor.route(long, sampling)
        assert route.is_disaggregated and route.reason == "disaggregated meets objectives"
        assert route.gap_colocated_s >= COST.prefill_s(400, 400) > 0.1
        conductor.objectives = Objectives(ttft_s=0.2, itl_s=0.1)  # 0.4 s: out of reach
        route = conductor.route(long, sampling)
        assert route.is_disaggregated and route.reason.startswith("neither meets")
        conductor.objectives = Objectives(ttft_s=1.0, itl_s=0.1)
        split = conductor.submit(long, sampling)
        conductor.mode = "colocated"  # one more, queued behind the held one
        queued = conductor.submit(prompt_of(300, 34), sampling)
        conductor.mode = "auto"
        route = conductor.route(short, sampling)
        assert route.ttft_colocated_s >= COST.prefill_s(300, 300)  # its wait
        assert not route.is_disaggregated  # (a 15 ms stall; 0.33 s to its first token)
        go_on.set()
        result = split.result(timeout=120)
        assert result.route.is_disaggregated and result.output == model.generate(long, 4)
        for future in (held, queued):
            future.result(timeout=120)
        assert conductor._pending_s == {"d0": 0.0}
    assert any("disaggregated meets objectives" in m and "ttft/gap colocated" in m
               for m in caplog.messages)
    shared.close()


def test_a_cancelled_request_stops_and_gives_its_pages_back(model):
    """Cancelled mid-decode, it ends with finish reason abort after fewer tokens than it
    asked for, and the decode engine's pages are all free again; a cancel of a finished
    or unknown request changes nothing."""
    from engines.decode import FinishReason

    shared = store()
    with Conductor([], [DecodeEngine(model, shared, num_pages=128)], cost=COST,
                   mode="colocated") as conductor:
        free = conductor.decode[0].num_free_pages
        produced: list[int] = []
        result = conductor.submit(prompt_of(40, 23), SamplingParams(max_new_tokens=500),
                                  request_id="r-cancel",
                                  on_token=lambda request, token: produced.append(token))
        while len(produced) < 3:
            pass
        conductor.cancel("r-cancel")
        done = result.result(timeout=60)
        assert done.finish_reason is FinishReason.ABORT
        assert 3 <= len(done.output) < 500
        assert conductor.decode[0].num_free_pages == free
        conductor.cancel("r-cancel")  # finished: nothing
        conductor.cancel("nobody")
        again = conductor.run(prompt_of(40, 23), SamplingParams(max_new_tokens=4))
        assert again.finish_reason is FinishReason.LENGTH and len(again.output) == 4
        assert again.output == model.generate(prompt_of(40, 23), 4)
    shared.close()


def test_a_request_cancelled_in_prefill_never_reaches_decode(model):
    from engines.decode import FinishReason

    shared = store()
    with Conductor([PrefillEngine(model, shared, num_pages=64)],
                   [DecodeEngine(model, shared, num_pages=128)], cost=COST,
                   mode="disaggregated") as conductor:
        block = conductor.prefill[0].submit(prompt_of(300, 24), SamplingParams(), 0.0)
        result = conductor.submit(prompt_of(300, 25), SamplingParams(max_new_tokens=50),
                                  request_id="r-prefill")
        conductor.cancel("r-prefill")  # queued behind the other prefill
        block.result(timeout=60)
        done = result.result(timeout=60)
        assert done.finish_reason is FinishReason.ABORT and done.output == []
        assert done.prefill is not None
        assert conductor.decode[0].num_active == 0
    shared.close()

"""Engines in processes of their own (`engines.processes`), as `kvstore serve` runs them:
real child processes sharing a real kvstored (served from a thread of the test), driven
by the conductor; outputs equal the reference's, and a child killed with SIGKILL fails
its requests at once, is started again, and serves again."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import replace

import pytest
import torch

import kvstore
from daemon.embedded import EmbeddedDaemon
from engines.conductor import Conductor, NoEngineError
from engines.presets import load_model
from engines.processes import EngineDiedError, EngineProcess, EngineSpec, EngineStartError
from engines.sampling import SamplingParams


def prompt_of(n: int, seed: int) -> list[int]:
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def shared_store() -> Iterator[tuple[str, kvstore.Client]]:
    daemon = EmbeddedDaemon(dram_bytes=64 << 20, nvme_path=None, nvme_bytes=0,
                            max_value_bytes=1 << 20)
    client = kvstore.connect(daemon.url)
    yield daemon.url, client
    client.close()
    daemon.close()


@pytest.fixture(scope="module")
def engines(shared_store) -> Iterator[tuple[EngineProcess, EngineProcess]]:
    url, client = shared_store
    spec = EngineSpec(role="decode", model="tiny", store_url=url, num_pages=512)
    decode = EngineProcess(replace(spec, calibrate_lengths=(16, 64)), "d0", client)
    prefill = EngineProcess(replace(spec, role="prefill"), "p0", client)
    try:
        for worker in (decode, prefill):
            worker.start()
        for worker in (decode, prefill):
            worker.wait_ready()
        yield prefill, decode
    finally:
        decode.close()
        prefill.close()


def wait_until_up(worker: EngineProcess, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not worker.is_healthy:
        assert time.monotonic() < deadline, f"engine {worker.name} did not come back"
        time.sleep(0.1)


def test_requests_through_engine_processes_match_the_reference(engines) -> None:
    prefill, decode = engines
    assert decode.cost is not None and decode.cost.decode_step_s > 0  # measured there
    assert prefill.cost is None and decode.pid != prefill.pid != os.getpid()
    # The store's one tier measured there too, for its fetch planner (none handed to p0).
    assert set(decode.planner_costs["tiers"]) == {"dram"} and prefill.planner_costs is None
    assert decode.engine.planner is not None and prefill.engine.planner is None
    reference = load_model("tiny").model
    sampling = SamplingParams(max_new_tokens=8)
    prompts = [prompt_of(40, 1), prompt_of(75, 2)]
    for mode in ("disaggregated", "colocated"):
        conductor = Conductor([prefill], [decode], cost=decode.cost, mode=mode)
        streamed: list[int] = []
        first = conductor.submit(prompts[0], sampling,
                                 on_token=lambda _, t, s=streamed: s.append(t))
        results = [first.result(timeout=120),
                   *(conductor.submit(p, sampling).result(timeout=120) for p in prompts[1:])]
        for prompt, result in zip(prompts, results, strict=True):
            assert result.output == reference.generate(prompt, 8), mode
            assert result.route.is_disaggregated == (mode == "disaggregated")
            assert result.ttft_s > 0 and len(result.inter_token_s) == 7
        assert streamed == results[0].output  # each token as it came
    # The second pass found the prompts' blocks in the shared store.
    assert results[1].num_cached_tokens == 64


def test_a_killed_engine_fails_its_requests_and_is_started_again(engines) -> None:
    prefill, decode = engines
    conductor = Conductor([prefill], [decode], cost=decode.cost, mode="colocated")
    sampling = SamplingParams(max_new_tokens=2000)
    started = threading.Event()
    running = [conductor.submit(prompt_of(30 + i, 10 + i), sampling,
                                on_token=lambda *_: started.set()) for i in range(3)]
    assert started.wait(60)
    old_pid, killed_at = decode.pid, time.monotonic()
    os.kill(old_pid, signal.SIGKILL)
    for future in running:
        with pytest.raises(EngineDiedError, match="died"):
            future.result(timeout=30)
    assert time.monotonic() - killed_at < 30  # failed, not hung
    # While the new process starts: a clear refusal, never a request left waiting.
    if not decode.is_healthy:
        with pytest.raises(NoEngineError):
            conductor.submit(prompt_of(20, 5), SamplingParams(max_new_tokens=4))
    planner_costs = decode.planner_costs
    wait_until_up(decode)
    assert decode.restarts == 1 and decode.pid != old_pid
    assert decode.planner_costs == planner_costs  # handed over, not measured again
    assert decode.num_active == 0
    prompt = prompt_of(50, 7)
    result = conductor.submit(prompt, SamplingParams(max_new_tokens=6)).result(timeout=120)
    assert result.output == load_model("tiny").model.generate(prompt, 6)
    # A prefill engine killed too: disaggregated requests go on once it is back.
    os.kill(prefill.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while prefill.is_healthy and time.monotonic() < deadline:
        time.sleep(0.05)
    wait_until_up(prefill)
    assert prefill.restarts == 1
    split = Conductor([prefill], [decode], cost=decode.cost, mode="disaggregated")
    result = split.submit(prompt, SamplingParams(max_new_tokens=6)).result(timeout=120)
    assert result.route.is_disaggregated
    assert result.output == load_model("tiny").model.generate(prompt, 6)


def test_an_engine_that_cannot_start_says_why(shared_store) -> None:
    url, client = shared_store
    worker = EngineProcess(EngineSpec(role="decode", model="no-such-model", store_url=url),
                           "d9", client)
    worker.start()
    try:
        with pytest.raises(EngineStartError, match="unknown model 'no-such-model'"):
            worker.wait_ready(timeout_s=120)
    finally:
        worker.close()
    dead_store = EngineProcess(EngineSpec(role="prefill", model="tiny",
                                          store_url="kvstore://127.0.0.1:1"), "p9", client)
    dead_store.start()
    try:
        with pytest.raises(EngineStartError, match="p9"):
            dead_store.wait_ready(timeout_s=120)
    finally:
        dead_store.close()


def test_engine_processes_plan_with_the_daemons_measured_tiers(tmp_path, capfd) -> None:
    """As `kvstore serve` starts them over a daemon with an NVMe tier: the first engine
    measures each of the daemon's tiers through its client and plans with them, the next
    one plans with those costs, and the conductor's view of each has a planner; requests
    through both equal the reference."""
    daemon = EmbeddedDaemon(dram_bytes=64 << 20, nvme_path=str(tmp_path / "nvme"),
                            nvme_bytes=64 << 20, max_value_bytes=1 << 20)
    client = kvstore.connect(daemon.url)
    spec = EngineSpec(role="decode", model="tiny", store_url=daemon.url, num_pages=512)
    first = EngineProcess(replace(spec, calibrate_lengths=(16, 64)), "d0", client)
    workers = [first]
    try:
        first.start()
        first.wait_ready()
        tiers = first.planner_costs["tiers"]
        assert set(tiers) == {"dram", "nvme"} and all(c[1] > 0 for c in tiers.values())
        prefill = EngineProcess(replace(spec, role="prefill",
                                        planner_costs=first.planner_costs), "p0", client)
        workers.append(prefill)
        prefill.start()
        prefill.wait_ready()
        assert prefill.planner_costs == first.planner_costs
        assert all(w.engine.planner is not None for w in workers)
        conductor = Conductor([prefill], [first], cost=first.cost, mode="disaggregated")
        prompt = prompt_of(60, 21)
        for _ in range(2):  # computed, then its prefix fetched
            result = conductor.submit(prompt, SamplingParams(max_new_tokens=4)).result(120)
            assert result.output == load_model("tiny").model.generate(prompt, 4)
        assert result.num_cached_tokens > 0
    finally:
        for worker in workers:
            worker.close()
        client.close()
        daemon.close()
    logged = capfd.readouterr().err
    assert logged.count("fetch planner: tier costs {'dram'") == 2, logged[-2000:]

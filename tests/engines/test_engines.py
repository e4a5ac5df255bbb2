"""Prefill -> store -> decode against the reference (`model.generate`): embedded stores,
a kvstored subprocess, engines in separate processes, and stores that lose blocks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import kvstore
from engines.decode import DecodeEngine
from engines.kv_io import CacheFullError
from engines.prefill import PrefillEngine
from engines.presets import load_model
from engines.sampling import SamplingParams
from tests.daemon.conftest import REPO, DaemonProcess
from tests.engines.conftest import assert_fetched_kv_equals_recomputed, flip_on_disk

BLOCK = 16


@pytest.fixture(scope="module")
def model():
    return load_model("tiny").model


def prompt_of(n: int, seed: int) -> list[int]:
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def dram_store(**overrides) -> kvstore.Store:
    return kvstore.Store(kvstore.StoreConfig(**{"dram_bytes": "64MiB", "hbm_bytes": 0,
                                                **overrides}))


def disaggregated(model, store, prompt, sampling):
    with PrefillEngine(model, store, num_pages=64) as prefill, \
            DecodeEngine(model, store, num_pages=64) as decode:
        first = prefill.prefill(prompt, sampling)
        done = decode.generate(prompt, sampling, first_token=first.first_token)
    return first, done


@pytest.mark.parametrize("length", [1, 15, 16, 17, 50, 64, 130])
def test_disaggregated_greedy_equals_reference(model, length):
    prompt = prompt_of(length, seed=length)
    sampling = SamplingParams(max_new_tokens=10)
    with dram_store() as store:
        first, done = disaggregated(model, store, prompt, sampling)
        assert first.num_published_blocks == length // BLOCK
        assert done.num_cached_tokens == (length // BLOCK) * BLOCK  # all full blocks fetched
    assert done.output == model.generate(prompt, sampling=sampling)


def test_seeded_sampling_survives_disaggregation(model):
    prompt = prompt_of(70, seed=1)
    sampling = SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.9, seed=5)
    with dram_store() as store:
        _, done = disaggregated(model, store, prompt, sampling)
    assert done.output == model.generate(prompt, sampling=sampling)


def test_shared_prefix_is_fetched_not_recomputed(model):
    system = prompt_of(64, seed=2)
    a, b = system + prompt_of(40, seed=3), system + prompt_of(23, seed=4)
    sampling = SamplingParams(max_new_tokens=8)
    with dram_store() as store, PrefillEngine(model, store, num_pages=64) as prefill:
        assert prefill.prefill(a, sampling).num_cached_tokens == 0
        second = prefill.prefill(b, sampling)
        assert second.num_cached_tokens == 64  # the system prompt's 4 blocks
        assert second.num_published_blocks == 1  # only b's own full block is new
        put_many, writes = store.put_many, []
        store.put_many = lambda keys, values: writes.append(len(keys)) or put_many(keys, values)
        again = prefill.prefill(b, sampling)  # every block stored: nothing is written
        assert again.num_cached_tokens == 80 and again.num_published_blocks == 0
        assert again.first_token == second.first_token and writes == []
        del store.put_many
        with DecodeEngine(model, store, num_pages=64) as decode:
            done = decode.generate(b, sampling, first_token=second.first_token)
    assert done.num_cached_tokens == 80
    assert done.output == model.generate(b, sampling=sampling)


def test_fetched_kv_equals_recomputed_per_layer(model):
    with dram_store() as store:
        assert assert_fetched_kv_equals_recomputed(model, store, prompt_of(75, seed=6)) == 4


class LosesBlockAfterMatch:
    """A real Store that loses one block between match_prefix and the fetch, as an
    eviction by another client would."""

    def __init__(self, store: kvstore.Store, lose_index: int) -> None:
        self.store = store
        self.lose_index = lose_index

    def match_prefix(self, keys, *, probe=False):
        found = self.store.match_prefix(keys, probe=probe)
        if found > self.lose_index:
            assert self.store.delete(keys[self.lose_index])
        return found

    def __getattr__(self, name):
        return getattr(self.store, name)


def test_block_lost_mid_request_is_recomputed(model):
    prompt = prompt_of(100, seed=7)
    sampling = SamplingParams(max_new_tokens=10)
    with dram_store() as store:
        with PrefillEngine(model, store, num_pages=64) as prefill:
            first = prefill.prefill(prompt, sampling)
        with DecodeEngine(model, LosesBlockAfterMatch(store, 2), num_pages=64) as decode:
            done = decode.generate(prompt, sampling, first_token=first.first_token)
    assert done.num_cached_tokens == 2 * BLOCK
    assert done.output == model.generate(prompt, sampling=sampling)


def test_corrupt_nvme_block_is_recomputed(model, tmp_path):
    prompt = prompt_of(90, seed=8)
    sampling = SamplingParams(max_new_tokens=10)
    config = kvstore.StoreConfig(dram_bytes=0, hbm_bytes=0, nvme_path=str(tmp_path / "nvme"),
                                 nvme_bytes="64MiB", max_value_bytes="1MiB")
    with kvstore.Store(config) as store, PrefillEngine(model, store, num_pages=64) as prefill, \
            DecodeEngine(model, store, num_pages=64) as decode:
        first = prefill.prefill(prompt, sampling)
        store.flush()
        flip_on_disk(tmp_path / "nvme", store.get(prefill.io.keys(prompt)[3]))  # block 3
        done = decode.generate(prompt, sampling, first_token=first.first_token)
        assert store.stats()["checksum_failures"] == 1
    assert done.num_cached_tokens == 3 * BLOCK
    assert done.output == model.generate(prompt, sampling=sampling)


def test_continuous_batching_equals_reference_and_frees_pages(model):
    prompts = [prompt_of(n, seed=n) for n in (5, 33, 48, 70, 12, 90)]
    budgets = [4, 9, 6, 12, 3, 7]
    with dram_store() as store, DecodeEngine(model, store, num_pages=64,
                                             max_batch=3) as decode:
        requests = [decode.add_request(p, SamplingParams(max_new_tokens=b))
                    for p, b in zip(prompts, budgets, strict=True)]
        peak = 0
        while decode.has_work:
            decode.step()
            peak = max(peak, decode.num_running)
        assert peak == 3
        assert decode.cache.num_free_pages == 64
    for request, prompt, budget in zip(requests, prompts, budgets, strict=True):
        assert request.output == model.generate(prompt, budget)
        assert len(request.token_times_s) == budget


def test_requests_fetched_in_one_step_each_get_their_own_kv(model):
    """Two cached prompts admitted in the same decode step: each fetch stages its blocks
    apart (one shared staging buffer let the second fetch overwrite the first's before the
    worker had copied it into the pages: wrong tokens)."""
    prompts = [prompt_of(200, seed=11), prompt_of(200, seed=12)]
    with dram_store() as store:
        with PrefillEngine(model, store, num_pages=64) as prefill:
            for prompt in prompts:
                prefill.prefill(prompt)
        for _ in range(3):
            with DecodeEngine(model, store, num_pages=128, max_batch=4,
                              publish=False) as decode:
                requests = [decode.add_request(p, SamplingParams(max_new_tokens=6))
                            for p in prompts]
                decode.run()
            for request, prompt in zip(requests, prompts, strict=True):
                assert request.num_cached_tokens == 192
                assert request.output == model.generate(prompt, 6)


def test_prompts_published_in_one_step_are_each_stored_under_their_keys(model):
    """Two prompts computed and published in the same decode step, then fetched back one
    at a time: each block holds its own prompt's KV (one shared staging buffer stored one
    request's KV under the other's keys)."""
    prompts = [prompt_of(200, seed=21), prompt_of(200, seed=22)]
    with dram_store() as store:
        with DecodeEngine(model, store, num_pages=128, max_batch=4) as decode:
            for prompt in prompts:
                decode.add_request(prompt, SamplingParams(max_new_tokens=2))
            decode.run()
        with DecodeEngine(model, store, num_pages=128, publish=False) as decode:
            for prompt in prompts:
                request = decode.generate(prompt, SamplingParams(max_new_tokens=6))
                assert request.num_cached_tokens == 192
                assert request.output == model.generate(prompt, 6)


def test_stream_yields_the_tokens_of_generate(model):
    prompt = prompt_of(40, seed=9)
    with dram_store() as store, DecodeEngine(model, store, num_pages=64) as decode:
        assert list(decode.stream(prompt, SamplingParams(max_new_tokens=7))) == \
            model.generate(prompt, 7)


def test_bad_requests_are_refused(model):
    with dram_store() as store, DecodeEngine(model, store, num_pages=4) as decode, \
            PrefillEngine(model, store, num_pages=4) as prefill:
        with pytest.raises(ValueError, match="at least one"):
            decode.add_request([])
        with pytest.raises(CacheFullError):
            decode.add_request(prompt_of(100, seed=1))  # 4 pages hold 64 tokens
        with pytest.raises(CacheFullError):
            prefill.prefill(prompt_of(100, seed=1))
        with pytest.raises(ValueError, match="exceeds"):
            prefill.prefill([1] * 5000)
        assert decode.num_waiting == 0 and prefill.cache.num_free_pages == 4


def engine_process(role: str, url: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "engines", role, "--url", url,
                             "--model", "tiny", "--num-pages", "64"], cwd=REPO, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert json.loads(proc.stdout.readline())["ready"] == role
    return proc


def ask(proc: subprocess.Popen[str], request: dict) -> dict:
    proc.stdin.write(json.dumps(request) + "\n")
    proc.stdin.flush()
    return json.loads(proc.stdout.readline())


def test_engines_in_separate_processes_through_a_daemon(model, tmp_path):
    daemon = DaemonProcess(tmp_path, "--dram", "64MiB").start()
    prefill = engine_process("prefill", daemon.url)
    try:
        prompts = [prompt_of(n, seed=100 + n) for n in (20, 64, 99)]
        firsts = [ask(prefill, {"id": str(i), "prompt": p, "max_new_tokens": 10})
                  for i, p in enumerate(prompts)]
        assert ask(prefill, {"prompt": "nope"})["error"].startswith("ValueError")
        bad = ask(prefill, {"id": "r-bad", "prompt": [1, 2], "max_new_tokens": 0})
        assert bad["id"] == "r-bad" and "max_new_tokens" in bad["error"]
        with kvstore.connect(daemon.url, timeout_s=5) as client, \
                DecodeEngine(model, client, num_pages=64) as decode:
            for prompt, first in zip(prompts, firsts, strict=True):
                done = decode.generate(prompt, SamplingParams(max_new_tokens=10),
                                       first_token=first["first_token"])
                assert done.num_cached_tokens == len(prompt) // BLOCK * BLOCK
                assert done.output == model.generate(prompt, 10)
            # The daemon dies: decode recomputes everything, and is still right.
            daemon.signal(9)
            prompt = prompts[2]
            done = decode.generate(prompt, SamplingParams(max_new_tokens=10),
                                   first_token=firsts[2]["first_token"])
            assert done.num_cached_tokens == 0
            assert done.output == model.generate(prompt, 10)
            # It comes back empty on the same port: both engines reconnect by themselves.
            restarted = DaemonProcess(tmp_path, "--dram", "64MiB", port=daemon.port).start()
            try:
                again = ask(prefill, {"prompt": prompt, "max_new_tokens": 10})
                assert again["num_cached_tokens"] == 0 and again["num_published_blocks"] == 6
                done = decode.generate(prompt, SamplingParams(max_new_tokens=10),
                                       first_token=again["first_token"])
                assert done.num_cached_tokens == 96
                assert done.output == model.generate(prompt, 10)
            finally:
                restarted.stop()
    finally:
        prefill.kill()
        prefill.wait()
        daemon.stop()


def test_decode_publishes_a_prompt_before_the_request_finishes(model):
    first, second = prompt_of(100, seed=11), prompt_of(64, seed=11) + prompt_of(30, seed=12)
    with dram_store() as store, DecodeEngine(model, store, num_pages=64) as decode:
        a = decode.add_request(first, SamplingParams(max_new_tokens=20))
        decode.step()  # a's prompt computed, and its 6 full blocks published
        assert a.num_published_blocks == 6 and not a.is_finished
        b = decode.add_request(second, SamplingParams(max_new_tokens=5))
        decode.step()
        assert b.num_cached_tokens == 64 and not a.is_finished
        decode.run()
        assert a.num_published_blocks == 7  # and at the end, its reply's full block
    assert a.output == model.generate(first, 20)
    assert b.output == model.generate(second, 5)


def test_chunked_prefill_keeps_decoding_requests_streaming(model):
    """With a step budget of 40 tokens, a 300-token prompt admitted beside three decoding
    requests is computed in chunks of at most 37 tokens (40 less their three): each of the
    three produces a token at every one of those steps, and every output, the long
    prompt's included, equals the reference. Without a budget the same prompt is computed
    in one step, during which the others produce one token."""
    short = [prompt_of(n, seed=40 + n) for n in (20, 35, 50)]
    long = prompt_of(300, seed=44)
    for budget in (40, None):
        with dram_store() as store, DecodeEngine(model, store, num_pages=128, max_batch=4,
                                                 max_step_tokens=budget) as decode:
            running = [decode.add_request(p, SamplingParams(max_new_tokens=30)) for p in short]
            while any(not r.output for r in running):
                decode.step()
            before = [len(r.output) for r in running]
            late = decode.add_request(long, SamplingParams(max_new_tokens=5))
            steps = 0
            while not late.output:
                decode.step()
                steps += 1
                assert sum(r.step_tokens[-1] for r in [*running, late]
                           if r.step_tokens) <= (budget or 10**9)
            during = [len(r.output) - b for r, b in zip(running, before, strict=True)]
            decode.run()
        if budget is not None:
            assert steps == -(-300 // 37)  # ceil: 9 steps of prompt chunks
            assert max(late.step_tokens[:steps]) <= 37
            # every step of the long prefill gave each running request a token
            assert during == [steps] * 3
        else:
            assert steps == 1 and late.step_tokens[0] == 300 and during == [1, 1, 1]
        for request, prompt in zip([*running, late], [*short, long], strict=True):
            assert request.output == model.generate(prompt, len(request.output))
        assert late.output == model.generate(long, 5)


def test_chunked_prefill_publishes_and_fetches_like_a_whole_prefill(model):
    """A prompt computed in chunks publishes its full blocks; a later request with the
    same prefix, also chunked, fetches them and computes only the rest."""
    prompt = prompt_of(200, seed=45)
    with dram_store() as store:
        with DecodeEngine(model, store, num_pages=64, max_batch=2,
                          max_step_tokens=32) as decode:
            first = decode.generate(prompt, SamplingParams(max_new_tokens=3))
            assert first.num_published_blocks >= 200 // BLOCK
            again = decode.generate([*prompt, 7, 8, 9], SamplingParams(max_new_tokens=3))
        assert again.num_cached_tokens == 192
        assert first.output == model.generate(prompt, 3)
        assert again.output == model.generate([*prompt, 7, 8, 9], 3)
    with dram_store() as store, pytest.raises(ValueError, match="max_step_tokens"):
        DecodeEngine(model, store, num_pages=8, max_batch=4, max_step_tokens=3)


def test_an_engine_process_with_a_dead_daemon_says_so_in_one_line():
    done = subprocess.run([sys.executable, "-m", "engines", "decode", "--url",
                           "kvstore://127.0.0.1:1"], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert done.returncode == 2
    assert "cannot use --url kvstore://127.0.0.1:1" in done.stderr
    assert "Traceback" not in done.stderr

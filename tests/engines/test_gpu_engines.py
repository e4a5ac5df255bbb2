"""The engines on a GPU: KV through HBM, pinned DRAM and a daemon, equal to the reference."""

from __future__ import annotations

import pytest
import torch

import kvstore
from engines.decode import DecodeEngine
from engines.paged_cache import SequenceKV
from engines.prefill import PrefillEngine
from engines.presets import load_model
from engines.sampling import SamplingParams
from tests.daemon.conftest import DaemonProcess

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def model():
    return load_model("tiny", device="cuda", dtype=torch.float32).model


def prompt_of(n: int, seed: int) -> list[int]:
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("tier", ["hbm", "dram"])
def test_disaggregated_on_gpu_equals_reference(model, tier):
    config = (kvstore.StoreConfig(hbm_bytes="64MiB", dram_bytes=0) if tier == "hbm"
              else kvstore.StoreConfig(dram_bytes="64MiB", hbm_bytes=0))
    sampling = SamplingParams(max_new_tokens=10)
    with kvstore.Store(config) as store, PrefillEngine(model, store, num_pages=64) as prefill, \
            DecodeEngine(model, store, num_pages=64) as decode:
        for length in (17, 64, 150):
            prompt = prompt_of(length, length)
            first = prefill.prefill(prompt, sampling)
            assert store.tier_of(prefill.io.keys(prompt)[0]) == tier
            done = decode.generate(prompt, sampling, first_token=first.first_token)
            assert done.num_cached_tokens == length // 16 * 16
            assert done.output == model.generate(prompt, sampling=sampling)


def test_fetched_kv_on_gpu_equals_recomputed(model):
    prompt = prompt_of(100, 3)
    with kvstore.Store(kvstore.StoreConfig(dram_bytes="64MiB", hbm_bytes=0)) as store, \
            PrefillEngine(model, store, num_pages=64) as prefill, \
            DecodeEngine(model, store, num_pages=64) as decode:
        prefill.prefill(prompt)
        seq = SequenceKV()
        decode.cache.reserve(seq, 100)
        load = decode.io.fetch(decode.io.keys(prompt), seq)
        load.wait_all()
        ref_cache = model.new_cache(num_pages=7)
        ref = SequenceKV()
        ref_cache.reserve(ref, 100)
        model.forward(ref_cache, [(ref, prompt)])
        for layer in range(model.config.num_layers):
            got = decode.cache.gather(layer, decode.cache.plan(seq, 96), 96)
            want = ref_cache.gather(layer, ref_cache.plan(ref, 96), 96)
            assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


def test_gpu_engines_through_a_daemon(model, tmp_path):
    daemon = DaemonProcess(tmp_path, "--dram", "64MiB").start()
    try:
        with kvstore.connect(daemon.url) as client, \
                PrefillEngine(model, client, num_pages=64) as prefill, \
                DecodeEngine(model, client, num_pages=64) as decode:
            prompt = prompt_of(90, 4)
            first = prefill.prefill(prompt, SamplingParams(max_new_tokens=8))
            done = decode.generate(prompt, SamplingParams(max_new_tokens=8),
                                   first_token=first.first_token)
            assert done.num_cached_tokens == 80
            assert done.output == model.generate(prompt, 8)
    finally:
        daemon.stop()


def test_gpu_fetch_mixes_borrowed_dram_blocks_and_staged_nvme_ones(model, tmp_path):
    from engines import uva_copy

    assert uva_copy.available(), "CuPy compiles the layer copy kernel on the GPU machine"
    prompt = prompt_of(200, 5)
    block_bytes = model.config.kv_layout(16, "float32").block_bytes
    config = kvstore.StoreConfig(dram_bytes=6 * block_bytes, hbm_bytes=0,
                                 nvme_path=str(tmp_path / "nvme"), nvme_bytes="64MiB",
                                 max_value_bytes=block_bytes)
    sampling = SamplingParams(max_new_tokens=8)
    with kvstore.Store(config) as store, PrefillEngine(model, store, num_pages=64) as prefill, \
            DecodeEngine(model, store, num_pages=64) as decode:
        first = prefill.prefill(prompt, sampling)
        tiers = [store.tier_of(k) for k in prefill.io.keys(prompt)]
        assert "dram" in tiers and "nvme" in tiers
        done = decode.generate(prompt, sampling, first_token=first.first_token)
        assert done.num_cached_tokens == 192
    assert done.output == model.generate(prompt, sampling=sampling)

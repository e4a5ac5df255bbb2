"""The engines on a GPU: KV through HBM, pinned DRAM and a daemon, equal to the reference."""

from __future__ import annotations

import pytest
import torch

import kvstore
from engines.decode import DecodeEngine
from engines.prefill import PrefillEngine
from engines.presets import load_model
from engines.sampling import SamplingParams
from tests.daemon.conftest import DaemonProcess
from tests.engines.conftest import assert_fetched_kv_equals_recomputed

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
    with kvstore.Store(kvstore.StoreConfig(dram_bytes="64MiB", hbm_bytes=0)) as store:
        assert assert_fetched_kv_equals_recomputed(model, store, prompt_of(100, 3)) == 6


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


@pytest.mark.parametrize("where", ["hbm", "pinned"])
def test_layer_copies_put_each_block_layer_in_its_page(model, where):
    """Blocks packed and every other slot, into two runs of pages: each block's K and V of
    every layer land in its page, and nothing else changes. Blocks in device memory go by
    the copy engines (two runs), pinned host blocks by the kernel."""
    from engines import uva_copy
    from engines.paged_cache import PagedKVCache

    config = model.config
    cache = PagedKVCache(config, num_pages=80, page_tokens=16, dtype=torch.float32,
                         device="cuda")
    shape = (64, config.num_layers, 2, 16, config.num_kv_heads, config.head_dim)
    source = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    source = source.cuda() if where == "hbm" else source.pin_memory()
    block_bytes = source[0].numel() * source.element_size()
    chosen = list(range(0, 20)) + list(range(24, 64, 2))
    pages = list(range(30, 50)) + list(range(5, 25))
    addresses = [source.data_ptr() + b * block_bytes for b in chosen]
    layer_bytes = block_bytes // config.num_layers
    copier = uva_copy.LayerCopier(cache, addresses, pages, layer_bytes, layer_bytes // 2)
    expected_runs = [(0, 20, block_bytes), (20, 20, 2 * block_bytes)]
    assert copier.runs == (expected_runs if where == "hbm" else None)
    copier.launch()
    copier.synchronize()
    for layer, kv in enumerate(cache.kv):
        expected = source[chosen, layer].transpose(0, 1).cuda()  # [2, n, tokens, heads, dim]
        assert torch.equal(kv[:, pages], expected), f"layer {layer}"
    untouched = sorted(set(range(80)) - set(pages))
    assert not any(kv[:, untouched].any() for kv in cache.kv)

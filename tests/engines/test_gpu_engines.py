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


@pytest.fixture
def parts(monkeypatch):
    """Borrowed fetches go in parts of 2, 4, 8... blocks (so the tiny model's prompts span
    several); returns (blocks, copied layer by layer, by DMA) of each part launched."""
    from engines import kv_io, uva_copy

    monkeypatch.setattr(kv_io, "FIRST_PART_BLOCKS", 2)
    monkeypatch.setattr(kv_io, "PART_GROWTH", 2)
    launched: list[tuple[int, bool, bool]] = []

    class RecordingCopier(uva_copy.LayerCopier):
        def __init__(self, cache, block_addresses, pages, *args, **kwargs) -> None:
            super().__init__(cache, block_addresses, pages, *args, **kwargs)
            launched.append((len(block_addresses), self.layerwise, self.runs is not None))

    monkeypatch.setattr(uva_copy, "LayerCopier", RecordingCopier)
    return launched


def block_bytes_of(model) -> int:
    return model.config.kv_layout(16, "float32").block_bytes


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
    block_bytes = block_bytes_of(model)
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


# -- fetches in parts ------------------------------------------------------------------------


@pytest.mark.parametrize("tier", ["dram", "hbm"])
def test_fetch_in_parts_puts_every_block_layer_in_its_page(model, parts, monkeypatch, tier):
    """12 blocks in parts of 2, 4 and 6: the first two copied whole, the last layer by
    layer. From HBM (consecutive slots into consecutive pages) by DMA runs, and after the
    first part the rest in one (issuing DMAs per part is what a fetch from HBM waits on)."""
    from engines import uva_copy

    monkeypatch.setattr(uva_copy, "MIN_DMA_RUN", 2)  # the parts are short runs
    room = {"hbm_bytes": "64MiB", "dram_bytes": 0} if tier == "hbm" else {
        "dram_bytes": "64MiB", "hbm_bytes": 0}
    config = kvstore.StoreConfig(**room, max_value_bytes=block_bytes_of(model))
    with kvstore.Store(config) as store:
        assert assert_fetched_kv_equals_recomputed(model, store, prompt_of(200, 3)) == 12
    if tier == "hbm":
        assert parts == [(2, False, True), (10, True, True)]
    else:
        assert parts == [(2, False, False), (4, False, False), (6, True, False)]


@pytest.mark.parametrize(("dram_blocks", "borrowed"), [
    (5, [(2, False, False), (3, True, False)]),  # NVMe from the middle of the second part
    (6, [(2, False, False), (4, False, False)]),  # ... from the start of the third
])
def test_fetch_in_parts_stops_borrowing_where_memory_tiers_end(model, parts, tmp_path,
                                                               dram_blocks, borrowed):
    """The first blocks in DRAM, the rest only on NVMe: the parts in DRAM are borrowed, the
    rest staged; the KV and the greedy tokens equal the reference's."""
    block_bytes = block_bytes_of(model)
    prompt = prompt_of(200, 5)

    def store(name: str) -> kvstore.Store:
        return kvstore.Store(kvstore.StoreConfig(
            dram_bytes=dram_blocks * block_bytes, hbm_bytes=0, max_value_bytes=block_bytes,
            nvme_path=str(tmp_path / name), nvme_bytes="64MiB"))

    with store("kv") as kv_store:
        assert assert_fetched_kv_equals_recomputed(model, kv_store, prompt) == 12
    assert parts == borrowed
    parts.clear()
    sampling = SamplingParams(max_new_tokens=8)
    with store("tokens") as token_store, \
            PrefillEngine(model, token_store, num_pages=64) as prefill, \
            DecodeEngine(model, token_store, num_pages=64) as decode:
        first = prefill.prefill(prompt, sampling)
        tiers = [token_store.tier_of(k) for k in prefill.io.keys(prompt)]
        assert tiers == ["dram"] * dram_blocks + ["nvme"] * (12 - dram_blocks)
        done = decode.generate(prompt, sampling, first_token=first.first_token)
        assert done.num_cached_tokens == 192
    assert parts == borrowed
    assert done.output == model.generate(prompt, sampling=sampling)


def test_fetch_in_parts_ends_the_prefix_at_a_missing_block(model, parts):
    """Block 7 of 12 deleted: the third part lends one block, and the prefix ends there."""
    prompt = prompt_of(200, 6)
    config = kvstore.StoreConfig(dram_bytes="64MiB", hbm_bytes=0)
    with kvstore.Store(config) as store:
        assert assert_fetched_kv_equals_recomputed(model, store, prompt, drop_block=7) == 7
    assert parts == [(2, False, False), (4, False, False), (1, True, False)]
    parts.clear()
    sampling = SamplingParams(max_new_tokens=8)
    with kvstore.Store(config) as store, PrefillEngine(model, store, num_pages=64) as prefill, \
            DecodeEngine(model, store, num_pages=64) as decode:
        prefill.prefill(prompt, sampling)
        assert store.delete(prefill.io.keys(prompt)[7])
        done = decode.generate(prompt, sampling)
        assert done.num_cached_tokens == 7 * 16
    assert parts == [(2, False, False), (4, False, False), (1, True, False)]
    assert done.output == model.generate(prompt, sampling=sampling)


def test_a_pin_expired_mid_fetch_fails_the_load_and_releases_every_part(model, parts):
    """Pins that outlive their lease make every borrowed block suspect: `wait_all` gives
    back the borrows of all three parts and raises rather than let the KV be used."""
    import time

    from engines.paged_cache import SequenceKV

    prompt = prompt_of(200, 7)
    config = kvstore.StoreConfig(dram_bytes="64MiB", hbm_bytes=0, lease_s=0.001)
    with kvstore.Store(config) as store, PrefillEngine(model, store, num_pages=64) as prefill, \
            DecodeEngine(model, store, num_pages=64) as decode:
        prefill.prefill(prompt)
        seq = SequenceKV()
        decode.cache.reserve(seq, len(prompt))
        fetch = decode.io.fetch_prefix(prompt, seq, max_blocks=12)
        assert fetch.load.num_blocks == 12 and len(parts) == 3
        time.sleep(0.05)
        with pytest.raises(kvstore.KVStoreError, match="pin expired"):
            fetch.load.wait_all()
        assert store.stats()["torn_reads"] == 12


@pytest.mark.parametrize("pad_page", [False, True])
@pytest.mark.parametrize("layerwise", [True, False])
@pytest.mark.parametrize("where", ["hbm", "pinned"])
def test_layer_copies_put_each_block_layer_in_its_page(model, where, layerwise, pad_page):
    """Blocks packed and every other slot, into two runs of pages: each block's K and V of
    every layer land in its page, and nothing else changes. Blocks in device memory go by
    the copy engines (two runs), pinned host blocks by the kernel; layer by layer (an event
    each) or all layers at once (one event); into a cache with CUDA graphs' pad page too
    (its V half starts one page later)."""
    from engines import uva_copy
    from engines.paged_cache import PagedKVCache

    config = model.config
    cache = PagedKVCache(config, num_pages=80, page_tokens=16, dtype=torch.float32,
                         device="cuda", cuda_graphs=pad_page)
    assert cache.num_pool_pages == 80 + pad_page
    shape = (64, config.num_layers, 2, 16, config.num_kv_heads, config.head_dim)
    source = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    source = source.cuda() if where == "hbm" else source.pin_memory()
    block_bytes = source[0].numel() * source.element_size()
    chosen = list(range(0, 20)) + list(range(24, 64, 2))
    pages = list(range(30, 50)) + list(range(5, 25))
    addresses = [source.data_ptr() + b * block_bytes for b in chosen]
    layer_bytes = block_bytes // config.num_layers
    copier = uva_copy.LayerCopier(cache, addresses, pages, layer_bytes, layer_bytes // 2,
                                  layerwise=layerwise)
    expected_runs = [(0, 20, block_bytes), (20, 20, 2 * block_bytes)]
    assert copier.runs == (expected_runs if where == "hbm" else None)
    copier.launch()
    assert len(copier.events) == (config.num_layers if layerwise else 1)
    copier.wait(config.num_layers - 1)
    torch.cuda.current_stream().synchronize()
    for layer, kv in enumerate(cache.kv):
        expected = source[chosen, layer].transpose(0, 1).cuda()  # [2, n, tokens, heads, dim]
        assert torch.equal(kv[:, pages], expected), f"layer {layer}"
    untouched = sorted(set(range(cache.num_pool_pages)) - set(pages))
    assert not any(kv[:, untouched].any() for kv in cache.kv)

"""Whole-page moves between a paged KV cache and a real Store (no vLLM needed)."""

from __future__ import annotations

import time

import pytest
import torch

import kvstore
from kvstore.integrations.pages import KVPageCodec, PageLayout, fetch_blocks, store_blocks
from kvstore.shm.directory import STALE_S

NUM_BLOCKS, HEADS, BLOCK, HEAD2 = 12, 2, 32, 16  # vLLM CPU: [blocks, heads, block, 2*hs]


def caches(seed: int, num_layers: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"model.layers.{i}.self_attn.attn":
            torch.randn(NUM_BLOCKS, HEADS, BLOCK, HEAD2, generator=g).to(torch.bfloat16)
            for i in range(num_layers)}


def keys(n: int) -> list[bytes]:
    return kvstore.prefix_hashes(list(range(n * BLOCK)), block_tokens=BLOCK, namespace="t")


def test_pages_round_trip_through_a_store_into_other_blocks() -> None:
    src, dst = caches(1), caches(2)
    out, back = PageLayout(src), PageLayout(dst)
    assert out.block_bytes == 3 * HEADS * BLOCK * HEAD2 * 2
    staging = out.staging(4)
    for layer in range(3):
        out.gather_layer(layer, [5, 1, 7, 2], staging)
    with kvstore.Store(kvstore.StoreConfig(dram_bytes=32 << 20)) as store:
        assert store_blocks(store, keys(4), staging) == 4
        fetched = back.staging(4)
        assert fetch_blocks(store, keys(4), fetched) == 4
    untouched = dst["model.layers.0.self_attn.attn"][0].clone()
    for layer in range(3):
        back.scatter_layer(layer, fetched, [0 + 3, 4, 8, 9])
    for name in src:
        for s, d in zip([5, 1, 7, 2], [3, 4, 8, 9], strict=True):
            assert torch.equal(src[name][s], dst[name][d])
    assert torch.equal(dst["model.layers.0.self_attn.attn"][0], untouched)


def test_a_missing_block_ends_the_prefix_and_nothing_after_it_is_used() -> None:
    pages = PageLayout(caches(3))
    staging = pages.staging(4)
    for layer in range(3):
        pages.gather_layer(layer, [0, 1, 2, 3], staging)
    with kvstore.Store(kvstore.StoreConfig(dram_bytes=32 << 20)) as store:
        assert store_blocks(store, keys(4), staging) == 4
        store.delete(keys(4)[2])
        assert fetch_blocks(store, keys(4), pages.staging(4)) == 2
        store.put(keys(4)[2], b"short")  # a foreign value of the wrong size
        assert fetch_blocks(store, keys(4), pages.staging(4)) == 2


def test_a_dead_daemon_is_a_miss_not_an_error(tmp_path) -> None:
    from tests.daemon.conftest import DaemonProcess

    daemon = DaemonProcess(tmp_path, "--dram", "16MiB").start()
    pages = PageLayout(caches(4))
    staging = pages.staging(2)
    for layer in range(3):
        pages.gather_layer(layer, [0, 1], staging)
    client = kvstore.connect(daemon.url, timeout_s=5)
    try:
        assert store_blocks(client, keys(2), staging) == 2
        assert fetch_blocks(client, keys(2), pages.staging(2)) == 2
        daemon.proc.kill()
        daemon.proc.wait()
        time.sleep(STALE_S + 0.3)  # same-host reads through its directory stop by then
        assert fetch_blocks(client, keys(2), pages.staging(2)) == 0
        assert store_blocks(client, keys(2), staging) == 0
    finally:
        client.close()
        daemon.stop()


def test_layouts_that_are_not_pages_on_dim_0_are_refused() -> None:
    with pytest.raises(ValueError, match="no KV cache"):
        PageLayout({})
    bad = {"a": torch.zeros(4, 2, 8), "b": torch.zeros(5, 2, 8)}
    with pytest.raises(ValueError, match="contiguous pages"):
        PageLayout(bad)
    strided = {"a": torch.zeros(2, 4, 8).transpose(0, 1)}
    with pytest.raises(ValueError, match="contiguous pages"):
        PageLayout(strided)




def test_reused_staging_keeps_its_memory_and_grows() -> None:
    pages = PageLayout(caches(5))
    first = pages.reused_staging("load", 3)
    assert tuple(first.shape) == (3, pages.block_bytes)
    assert pages.reused_staging("load", 2).data_ptr() == first.data_ptr()
    grown = pages.reused_staging("load", 5)
    assert tuple(grown.shape) == (5, pages.block_bytes)
    assert pages.reused_staging("save", 1).data_ptr() != grown.data_ptr()


def vllm_cpu_page(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The page vLLM's CPU ``vec`` kernel writes for K, V ``[block, heads, hs]``: per head,
    K transposed (``[hs, block]``) then V (``[block, hs]``), as ``[heads, block, 2 * hs]``."""
    block, heads, hs = k.shape
    page = torch.empty(heads, 2 * block, hs, dtype=k.dtype)
    page[:, :block] = k.permute(1, 2, 0).reshape(heads, block, hs)
    page[:, block:] = v.permute(1, 0, 2)
    return page.reshape(heads, block, 2 * hs)


def test_codec_stores_kvstore_layout_and_restores_the_page() -> None:
    hs = HEAD2 // 2
    codec = KVPageCodec(num_kv_heads=HEADS, block_tokens=BLOCK, head_dim=hs)
    g = torch.Generator().manual_seed(9)
    k, v = (torch.randn(BLOCK, HEADS, hs, generator=g) for _ in range(2))
    layers = codec.to_layout(vllm_cpu_page(k, v)[None])
    assert torch.equal(layers[0, 0], k) and torch.equal(layers[0, 1], v)
    assert torch.equal(codec.from_layout(layers)[0].reshape(HEADS, BLOCK, HEAD2),
                       vllm_cpu_page(k, v))
    # Through a store: the stored bytes are kvstore.layout's, layer after layer.
    src = caches(6)
    for cache in src.values():
        cache[3] = vllm_cpu_page(k, v)
    pages = PageLayout(src, codec)
    staging = pages.staging(1)
    for layer in range(3):
        pages.gather_layer(layer, [3], staging)
    layout = staging[0].view(torch.bfloat16).reshape(3, 2, BLOCK, HEADS, hs)
    assert torch.equal(layout[1, 0], k.to(torch.bfloat16))
    assert torch.equal(layout[2, 1], v.to(torch.bfloat16))
    dst = caches(7)
    back = PageLayout(dst, codec)
    for layer in range(3):
        back.scatter_layer(layer, staging, [8])
    for name in src:
        assert torch.equal(dst[name][8], src[name][3])
    with pytest.raises(ValueError, match="not K and V"):
        PageLayout(src, KVPageCodec(num_kv_heads=HEADS, block_tokens=BLOCK, head_dim=hs * 2))

"""Whole-page moves between a paged KV cache and a real Store (no vLLM needed)."""

from __future__ import annotations

import time

import pytest
import torch

import kvstore
from benchmarks import vllm_pages_bench
from kvstore.integrations.pages import (
    KVPageCodec,
    KVViewCodec,
    PageLayout,
    fetch_blocks,
    store_blocks,
)
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


# -- vLLM 0.32's logical views (CUDA backends): [blocks, heads, tokens, K|V], any strides --

# The physical orders of vLLM's KVCacheLayout, as permutations of the logical axes
# [L, B, H, N, C]: the GPU bench's table (it runs where vLLM is not installed), which
# tests/integrations/test_vllm.py checks against vLLM's own enum.
PHYSICAL_ORDERS = vllm_pages_bench.PHYSICAL_ORDERS
LAYERS, VIEW_BLOCKS, VIEW_HEADS, VIEW_TOKENS, HS = 3, 6, 2, 8, 8  # (a head's K: 16 bytes)


def logical_views(order: tuple[int, ...], *, kernel_split: int = 1,
                  dtype: torch.dtype = torch.bfloat16,
                  device: str = "cpu") -> dict[str, torch.Tensor]:
    """One backing tensor laid out in ``order``, seen as one logical view per layer
    ``[blocks * split, heads, tokens / split, 2 * HS]`` (as vLLM's allocation does), on
    ``device`` (made there: a layer's view moved alone would lose the layout's strides)."""
    shape = (LAYERS, VIEW_BLOCKS * kernel_split, VIEW_HEADS, VIEW_TOKENS // kernel_split,
             2 * HS)
    physical = torch.zeros([shape[d] for d in order], dtype=dtype, device=device)
    logical = physical.permute(*[order.index(d) for d in range(5)])
    assert tuple(logical.shape) == shape
    return {f"layers.{i}.attn": logical[i] for i in range(LAYERS)}


def fill(views: dict[str, torch.Tensor], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for view in views.values():
        view.copy_(torch.randn(view.shape, generator=g).to(view.dtype))


def kv_of(view: torch.Tensor, block: int, split: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of one block as vLLM's backends read them (FlashAttention and Triton:
    ``kv_cache.transpose(1, 2).split(head_size, dim=-1)``), ``[tokens, heads, HS]``."""
    k, v = view.transpose(1, 2).split(HS, dim=-1)
    rows = slice(block * split, (block + 1) * split)
    return (k[rows].reshape(VIEW_TOKENS, VIEW_HEADS, HS),
            v[rows].reshape(VIEW_TOKENS, VIEW_HEADS, HS))


@pytest.mark.parametrize("split", [1, 2])
@pytest.mark.parametrize("name", sorted(PHYSICAL_ORDERS))
def test_logical_views_store_kvstore_layout_in_every_physical_order(name: str,
                                                                    split: int) -> None:
    codec = KVViewCodec(num_kv_heads=VIEW_HEADS, block_tokens=VIEW_TOKENS, head_dim=HS)
    src = logical_views(PHYSICAL_ORDERS[name], kernel_split=split)
    fill(src, 11)
    pages = PageLayout(src, codec, num_blocks=VIEW_BLOCKS)
    assert pages.page_bytes == 2 * VIEW_TOKENS * VIEW_HEADS * HS * 2
    staging = pages.staging(2)
    for layer in range(LAYERS):
        pages.gather_layer(layer, [4, 1], staging)
    stored = staging.view(torch.bfloat16).reshape(2, LAYERS, 2, VIEW_TOKENS, VIEW_HEADS, HS)
    for row, block in enumerate([4, 1]):
        for layer, view in enumerate(src.values()):
            k, v = kv_of(view, block, split)
            assert torch.equal(stored[row, layer, 0], k)
            assert torch.equal(stored[row, layer, 1], v)
    # Through a store into every other layout (and split): the same K and V come back,
    # and no other block is touched.
    with kvstore.Store(kvstore.StoreConfig(dram_bytes=16 << 20)) as store:
        chain = kvstore.prefix_hashes(list(range(2 * VIEW_TOKENS)), block_tokens=VIEW_TOKENS,
                                      namespace="views")
        assert store_blocks(store, chain, staging) == 2
        for other, other_split in [(n, s) for n in sorted(PHYSICAL_ORDERS) for s in (1, 2)]:
            dst = logical_views(PHYSICAL_ORDERS[other], kernel_split=other_split)
            fill(dst, 12)
            before = {n: v.clone() for n, v in dst.items()}
            back = PageLayout(dst, codec, num_blocks=VIEW_BLOCKS)
            fetched = back.staging(2)
            assert fetch_blocks(store, chain, fetched) == 2
            for layer in range(LAYERS):
                back.scatter_layer(layer, fetched, [0, 5])
            for (n, view), original in zip(dst.items(), src.values(), strict=True):
                for to, came_from in ((0, 4), (5, 1)):
                    assert all(torch.equal(a, b) for a, b in zip(
                        kv_of(view, to, other_split), kv_of(original, came_from, split),
                        strict=True)), (name, other, other_split)
                for untouched in (1, 2, 3, 4):
                    assert torch.equal(kv_of(view, untouched, other_split)[0],
                                       kv_of(before[n], untouched, other_split)[0])


def test_logical_views_move_fp8_caches_as_bytes() -> None:
    codec = KVViewCodec(num_kv_heads=VIEW_HEADS, block_tokens=VIEW_TOKENS, head_dim=HS)
    src = logical_views(PHYSICAL_ORDERS["BLNHC"], dtype=torch.uint8)  # vLLM's fp8 cache
    for i, view in enumerate(src.values()):
        view.copy_(torch.randint(0, 256, view.shape, dtype=torch.uint8,
                                 generator=torch.Generator().manual_seed(i)))
    pages = PageLayout(src, codec, num_blocks=VIEW_BLOCKS)
    assert pages.page_bytes == 2 * VIEW_TOKENS * VIEW_HEADS * HS
    staging = pages.staging(1)
    for layer in range(LAYERS):
        pages.gather_layer(layer, [2], staging)
    dst = logical_views(PHYSICAL_ORDERS["LBHNC"], dtype=torch.uint8)
    back = PageLayout(dst, codec, num_blocks=VIEW_BLOCKS)
    for layer in range(LAYERS):
        back.scatter_layer(layer, staging, [3])
    for a, b in zip(src.values(), dst.values(), strict=True):
        assert torch.equal(a[2], b[3])


def test_views_of_another_geometry_are_refused() -> None:
    codec = KVViewCodec(num_kv_heads=VIEW_HEADS, block_tokens=VIEW_TOKENS, head_dim=HS)
    views = logical_views(PHYSICAL_ORDERS["LBNHC"])
    for wrong in (KVViewCodec(num_kv_heads=2 * VIEW_HEADS, block_tokens=VIEW_TOKENS,
                              head_dim=HS),
                  KVViewCodec(num_kv_heads=VIEW_HEADS, block_tokens=2 * VIEW_TOKENS,
                              head_dim=HS),
                  KVViewCodec(num_kv_heads=VIEW_HEADS, block_tokens=VIEW_TOKENS,
                              head_dim=2 * HS)):
        with pytest.raises(ValueError, match="is not a view"):
            PageLayout(views, wrong, num_blocks=VIEW_BLOCKS)
    with pytest.raises(ValueError, match="is not a view"):
        PageLayout(views, codec, num_blocks=VIEW_BLOCKS + 1)
    with pytest.raises(ValueError, match="is not a view"):  # K|V not innermost
        PageLayout({"a": torch.zeros(2 * HS, VIEW_TOKENS, VIEW_HEADS, VIEW_BLOCKS).permute(
            3, 2, 1, 0)}, codec, num_blocks=VIEW_BLOCKS)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["LBNHC", "BLHNC", "LHBNC"])
def test_logical_views_on_a_gpu_round_trip_through_a_store(name: str) -> None:
    """CUDA caches (vLLM's GPU layouts): gathered on the device into host rows, stored,
    and scattered back into another layout on the device."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    codec = KVViewCodec(num_kv_heads=VIEW_HEADS, block_tokens=VIEW_TOKENS, head_dim=HS)
    src = logical_views(PHYSICAL_ORDERS[name], device="cuda")
    fill(src, 21)
    host = {n: v.cpu() for n, v in src.items()}
    pages = PageLayout(src, codec, num_blocks=VIEW_BLOCKS)
    staging = pages.staging(3)
    for layer in range(LAYERS):
        pages.gather_layer(layer, [5, 0, 2], staging)
    expected = PageLayout(host, codec, num_blocks=VIEW_BLOCKS).staging(3)
    for layer in range(LAYERS):
        PageLayout(host, codec, num_blocks=VIEW_BLOCKS).gather_layer(layer, [5, 0, 2],
                                                                     expected)
    assert torch.equal(staging, expected)
    dst = logical_views(PHYSICAL_ORDERS["BHLNC"], device="cuda")
    back = PageLayout(dst, codec, num_blocks=VIEW_BLOCKS)
    with kvstore.Store(kvstore.StoreConfig(dram_bytes=16 << 20)) as store:
        chain = kvstore.prefix_hashes(list(range(3 * VIEW_TOKENS)), block_tokens=VIEW_TOKENS,
                                      namespace="gpu-views")
        assert store_blocks(store, chain, staging) == 3
        fetched = back.staging(3)
        assert fetch_blocks(store, chain, fetched) == 3
    for layer in range(LAYERS):
        back.scatter_layer(layer, fetched, [1, 3, 4])
    for (n, view), original in zip(dst.items(), host.values(), strict=True):
        for to, came_from in ((1, 5), (3, 0), (4, 2)):
            assert all(torch.equal(a.cpu(), b) for a, b in zip(
                kv_of(view, to, 1), kv_of(original, came_from, 1), strict=True)), n


def test_layer_loads_refuse_caches_off_a_gpu_and_a_grid_of_nothing() -> None:
    from kvstore.integrations import gpu_loads

    codec = KVViewCodec(num_kv_heads=VIEW_HEADS, block_tokens=VIEW_TOKENS, head_dim=HS)
    pages = PageLayout(logical_views(PHYSICAL_ORDERS["LBNHC"]), codec, num_blocks=VIEW_BLOCKS)
    with pytest.raises(ValueError, match="grid is at least 1"):
        gpu_loads.LayerLoads(pages, grid=0)
    for unroll in (0, gpu_loads.MAX_UNROLL + 1):
        with pytest.raises(ValueError, match="unroll 1 to"):
            gpu_loads.LayerLoads(pages, unroll=unroll)
    with pytest.raises(ValueError, match="for CUDA caches"):
        gpu_loads.LayerLoads(pages)


@pytest.mark.gpu
@pytest.mark.parametrize(("use_kernel", "tuning"), [
    (True, {}), (False, {}), (True, {"grid": 1, "unroll": 1}),
    (True, {"grid": 64, "unroll": 8})], ids=["kernel", "torch", "kernel-g1-u1",
                                             "kernel-g64-u8"])
def test_layer_loads_on_a_gpu_write_what_the_host_scatter_writes(
        use_kernel: bool, tuning: dict[str, int]) -> None:
    """`LayerLoads` (the copy kernel reading pinned rows in place, with its default grid
    and unroll or others, or torch's copies) into CUDA views of every layout and split:
    exactly the pages `KVViewCodec.scatter` writes on the host, and no other."""
    from kvstore.integrations import gpu_loads

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if use_kernel and not gpu_loads.kernel_available():
        pytest.skip("the copy kernel does not compile here (CuPy missing?)")
    codec = KVViewCodec(num_kv_heads=VIEW_HEADS, block_tokens=VIEW_TOKENS, head_dim=HS)
    source = logical_views(PHYSICAL_ORDERS["LBNHC"])
    fill(source, 31)
    host_pages = PageLayout(source, codec, num_blocks=VIEW_BLOCKS)
    rows = host_pages.staging(4)
    for layer in range(LAYERS):
        host_pages.gather_layer(layer, [0, 1, 2, 3], rows)
    for name in sorted(PHYSICAL_ORDERS):
        for split in (1, 2):
            expected = logical_views(PHYSICAL_ORDERS[name], kernel_split=split)
            fill(expected, 32)
            views = logical_views(PHYSICAL_ORDERS[name], kernel_split=split, device="cuda")
            for n, view in views.items():
                view.copy_(expected[n])
            reference = PageLayout(expected, codec, num_blocks=VIEW_BLOCKS)
            for layer in range(LAYERS):
                reference.scatter_layer(layer, rows, [5, 2, 0, 3])
            pages = PageLayout(views, codec, num_blocks=VIEW_BLOCKS)
            pinned = pages.staging(4)
            pinned.copy_(rows)
            assert pinned.is_pinned()
            loads = gpu_loads.LayerLoads(pages, use_kernel=use_kernel, **tuning)
            assert loads.use_kernel is use_kernel
            for layer in range(LAYERS):
                loads.load_layer(layer, [(pinned[:2], [5, 2]), (pinned[2:], [0, 3])])
            for layer in range(LAYERS):
                loads.wait(layer)
            torch.cuda.current_stream().synchronize()
            for n, view in views.items():
                assert torch.equal(view.cpu(), expected[n]), (name, split, n)


def test_layer_saves_refuse_caches_off_a_gpu() -> None:
    from kvstore.integrations import gpu_loads

    codec = KVViewCodec(num_kv_heads=VIEW_HEADS, block_tokens=VIEW_TOKENS, head_dim=HS)
    pages = PageLayout(logical_views(PHYSICAL_ORDERS["LBNHC"]), codec, num_blocks=VIEW_BLOCKS)
    with pytest.raises(ValueError, match="for CUDA caches"):
        gpu_loads.LayerSaves(pages)


@pytest.mark.gpu
def test_layer_saves_on_a_gpu_put_in_the_host_rows_what_the_host_gather_puts() -> None:
    """`LayerSaves` (each layer gathered on the device, then copied to page-locked rows
    on a side stream as a 2-D copy) out of CUDA views of every layout and split, in two
    runs of rows: exactly the rows `KVViewCodec.gather` gives on the host, bytes of the
    rows' other layers untouched until their layer is saved."""
    from kvstore.integrations import gpu_loads

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    codec = KVViewCodec(num_kv_heads=VIEW_HEADS, block_tokens=VIEW_TOKENS, head_dim=HS)
    for name in sorted(PHYSICAL_ORDERS):
        for split in (1, 2):
            source = logical_views(PHYSICAL_ORDERS[name], kernel_split=split)
            fill(source, 41)
            reference = PageLayout(source, codec, num_blocks=VIEW_BLOCKS)
            expected = reference.staging(4)
            for layer in range(LAYERS):
                reference.gather_layer(layer, [5, 2, 0, 3], expected)
            views = logical_views(PHYSICAL_ORDERS[name], kernel_split=split, device="cuda")
            for n, view in views.items():
                view.copy_(source[n])
            pages = PageLayout(views, codec, num_blocks=VIEW_BLOCKS)
            host = pages.staging(4)
            assert host.is_pinned()
            host.fill_(0xA5)
            device = pages.staging(4, on_device=True)
            saves = gpu_loads.LayerSaves(pages)
            for layer in range(LAYERS):
                saves.save_layer(layer, [(device[:2], host[:2], [5, 2]),
                                         (device[2:], host[2:], [0, 3])])
                saves.synchronize()
                done = (layer + 1) * pages.page_bytes
                assert torch.equal(host[:, :done], expected[:, :done]), (name, split, layer)
                assert bool((host[:, done:] == 0xA5).all()), (name, split, layer)

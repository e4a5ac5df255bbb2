#!/usr/bin/env python3
"""The vLLM connector's loads into CUDA KV caches, per vLLM KV cache layout, against the
raw pinned copy, on a GPU (issue 19; needs no vLLM).

Caches: ``--blocks`` manager blocks of a model's layers (llama3-8b: 32 layers, 8 KV heads,
head dim 128, bf16; vLLM's CUDA block of 16 tokens), one backing tensor per layout seen as
one logical view ``[blocks, heads, tokens, K|V]`` per layer, as vLLM 0.32 allocates them
(`KVCacheLayout`'s stride permutations; ``tests/integrations/test_vllm.py`` checks the
table below against vLLM's own enum). Source: the stored blocks (kvstore.layout) in a
page-locked staging buffer, as the connector fetches them. Per layout and copy path
(`kvstore.integrations.gpu_loads.LayerLoads`: the kernel reading the rows in place, or
torch's copies), every layer is queued as a step's load does and the figure is the
bytes of all layers over the time from the first launch to the last copy's end. Raw:
one pinned host-to-device copy of the same bytes in the same run. JSON on stdout, medians
of ``--repeats``; target (the issue): at least 0.85 of the raw copy.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

_REPO = Path(__file__).resolve().parents[1]
for path in (_REPO, _REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402
from store_bench import emit, log, machine_info  # noqa: E402

from kvstore.integrations import gpu_loads  # noqa: E402
from kvstore.integrations.pages import KVViewCodec, PageLayout  # noqa: E402

# vLLM 0.32's KVCacheLayout: physical order of the logical axes [L, B, H, N, C]; a copy
# (the bench runs without vLLM) that tests/integrations/test_vllm.py checks against vLLM's.
PHYSICAL_ORDERS = {"LBNHC": (0, 1, 3, 2, 4), "LBHNC": (0, 1, 2, 3, 4),
                   "LHBNC": (0, 2, 1, 3, 4), "BLHNC": (1, 0, 2, 3, 4),
                   "BLNHC": (1, 0, 3, 2, 4), "BHLNC": (1, 2, 0, 3, 4)}
SHAPES = {"llama3-8b": (32, 8, 128), "smollm2-135m": (30, 3, 64)}  # layers, KV heads, dim
TARGET_RATIO = 0.85


def views(order: tuple[int, ...], layers: int, blocks: int, heads: int, tokens: int,
          head_dim: int, dtype: torch.dtype, device: str = "cuda") -> dict[str, torch.Tensor]:
    shape = (layers, blocks, heads, tokens, 2 * head_dim)
    physical = torch.empty([shape[d] for d in order], dtype=dtype, device=device)
    logical = physical.permute(*[order.index(d) for d in range(5)])
    return {f"model.layers.{i}.self_attn.attn": logical[i] for i in range(layers)}


def timed(fn: Any, repeats: int) -> float:
    """Median seconds of ``fn`` (one warm-up first), ended by a device sync (where there
    is a GPU)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn()
    sync()
    seconds = []
    for _ in range(repeats):
        sync()
        started = time.perf_counter()
        fn()
        sync()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama3-8b", choices=sorted(SHAPES))
    parser.add_argument("--blocks", type=int, default=512, help="blocks per load (16 tokens)")
    parser.add_argument("--block-tokens", type=int, default=16)
    parser.add_argument("--layouts", default=",".join(PHYSICAL_ORDERS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--grids", default="",
                        help="also try the kernel with these thread blocks per launch "
                             f"(comma-separated; default {gpu_loads.GRID})")
    parser.add_argument("--unrolls", default="",
                        help="... and these loads in flight per thread "
                             f"(default {gpu_loads.UNROLL})")
    parser.add_argument("--json-out")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print('{"skipped": "needs CUDA"}')
        return 0
    started_s = time.perf_counter()
    layers, heads, head_dim = SHAPES[args.model]
    codec = KVViewCodec(heads, args.block_tokens, head_dim)
    # Pool pages twice the load, the blocks scattered over them (every other page).
    pool_blocks, block_ids = 2 * args.blocks, list(range(0, 2 * args.blocks, 2))
    doc: dict[str, Any] = {"machine": machine_info(None), "gpu": torch.cuda.get_device_name(),
                           "model": args.model, "blocks": args.blocks,
                           "kernel": gpu_loads.kernel_available(), "layouts": {}}
    # The stored blocks, page-locked (as `PageLayout.staging` gives them on a GPU).
    block_bytes = layers * 2 * args.block_tokens * heads * head_dim * 2
    rows = torch.randint(0, 256, (args.blocks, block_bytes), dtype=torch.uint8).pin_memory()
    device_copy = torch.empty_like(rows, device="cuda")
    nbytes = rows.numel()
    raw_s = timed(lambda: device_copy.copy_(rows, non_blocking=True), args.repeats)
    device_copy = None  # (its memory back before the caches)
    doc.update(bytes=nbytes, raw_gbps=nbytes / raw_s / 1e9)
    log(f"raw pinned copy {nbytes / raw_s / 1e9:.1f} GB/s ({nbytes >> 20} MiB)")
    for name in args.layouts.split(","):
        caches = views(PHYSICAL_ORDERS[name], layers, pool_blocks, heads, args.block_tokens,
                       head_dim, torch.bfloat16)
        pages = PageLayout(caches, codec, num_blocks=pool_blocks)
        assert pages.block_bytes == block_bytes
        result: dict[str, Any] = {}
        paths: dict[str, dict[str, Any]] = {"torch": {"use_kernel": False}}
        if doc["kernel"]:
            paths = {"kernel": {"use_kernel": True}, **paths}
            grids = [int(g) for g in args.grids.split(",") if g] or [gpu_loads.GRID]
            unrolls = [int(u) for u in args.unrolls.split(",") if u] or [gpu_loads.UNROLL]
            for grid in grids:
                for unroll in unrolls:
                    if (grid, unroll) != (gpu_loads.GRID, gpu_loads.UNROLL):
                        paths[f"kernel_g{grid}_u{unroll}"] = {
                            "use_kernel": True, "grid": grid, "unroll": unroll}
        for path, settings in paths.items():
            loads = gpu_loads.LayerLoads(pages, **settings)

            def load(loads: gpu_loads.LayerLoads = loads) -> None:
                for layer in range(layers):
                    loads.load_layer(layer, [(rows, block_ids)])
                loads.synchronize()

            seconds = timed(load, args.repeats)
            gbps = nbytes / seconds / 1e9
            # This path's own bytes: the pages cleared, loaded once, every block
            # gathered back on the device.
            for cache in caches.values():
                cache.zero_()
            load()
            gathered = pages.staging(len(block_ids), on_device=True)
            for layer in range(layers):
                pages.gather_layer(layer, block_ids, gathered)
            result[path] = {"ms": seconds * 1e3, "gbps": gbps, "ratio": gbps / doc["raw_gbps"],
                            "meets_target": gbps / doc["raw_gbps"] >= TARGET_RATIO,
                            "bytes_match": bool(torch.equal(gathered.cpu(), rows))}
            del gathered
            log(f"{name} {path}: {seconds * 1e3:.2f} ms, {gbps:.1f} GB/s "
                f"({gbps / doc['raw_gbps']:.2f} of raw)")
        # The last path's pages are the stored blocks (checked once per layout, by the
        # host: the device's gather checked above, here the host's).
        probe = block_ids[-1]
        host_pages = PageLayout({n: v.cpu() for n, v in caches.items()}, codec,
                                num_blocks=pool_blocks)
        check = host_pages.staging(1)
        for layer in range(layers):
            host_pages.gather_layer(layer, [probe], check)
        result["bytes_match"] = bool(torch.equal(check[0], rows[-1]))
        doc["layouts"][name] = result
        del caches, pages
        torch.cuda.empty_cache()
    emit(doc, started_s, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

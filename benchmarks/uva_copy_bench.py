#!/usr/bin/env python3
"""The layer-wise KV load kernel (`engines.uva_copy`) against the raw PCIe copy, on a GPU.

Source: ``--blocks`` stored blocks of Llama 3 8B's layout (32 layers, 8 KV heads, head
dim 128, 16 tokens, bf16: 2 MiB each) scattered in a page-locked host pool, as in the
store's DRAM tier. Destination: a paged cache. Per configuration (threads per block,
16-byte vectors per thread per step, thread blocks per launch), every layer's copy is
launched once per layer, as a fetch does; the figure is bytes / time for all layers.
The raw limit is one pinned host-to-device ``cudaMemcpy`` of the same bytes, in the
same run. JSON on stdout.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.store_bench import emit, log, machine_info  # noqa: E402
from engines import uva_copy  # noqa: E402
from engines.config import ModelConfig  # noqa: E402
from engines.paged_cache import PagedKVCache  # noqa: E402
from engines.presets import LLAMA3_8B  # noqa: E402
from kvstore.tiers.dram import HostPool  # noqa: E402


def timed(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--blocks", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)
    if not uva_copy.available():
        print("uva_copy_bench needs CUDA and CuPy", file=sys.stderr)
        return 2
    started = time.perf_counter()
    config: ModelConfig = LLAMA3_8B
    layout = config.kv_layout(16, "bfloat16")
    n = args.blocks
    # Blocks at scattered slots of a page-locked pool (every other slot, shuffled).
    pool = HostPool(2 * n * layout.block_bytes)
    host = np.frombuffer(pool.view(0, pool.nbytes), dtype=np.uint8)
    host[:] = np.random.default_rng(0).integers(0, 255, host.shape[0], dtype=np.uint8)
    slots = np.random.default_rng(1).permutation(2 * n)[:n]
    addresses = [host.ctypes.data + int(s) * layout.block_bytes for s in slots]
    cache = PagedKVCache(config, num_pages=n + 8, page_tokens=16, dtype=torch.bfloat16,
                         device="cuda")
    pages = np.random.default_rng(2).permutation(n + 8)[:n].tolist()
    nbytes = n * layout.block_bytes
    src = torch.from_numpy(host[:nbytes])
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    raw_s = timed(lambda: dst.copy_(src, non_blocking=True), args.repeats)
    doc: dict[str, Any] = {"benchmark": "uva_copy_bench", "gpu": torch.cuda.get_device_name(),
                           "machine": machine_info(None), "blocks": n,
                           "block_bytes": layout.block_bytes, "total_bytes": nbytes,
                           "raw_copy_gbps": nbytes / raw_s / 1e9, "configs": []}
    for threads, unroll, grid in ((512, 4, 16), (512, 4, 32), (512, 4, 64), (512, 4, 132),
                                  (512, 4, 4096), (256, 1, 4096)):
        copier = uva_copy.LayerCopier(cache, addresses, pages, layout.layer_bytes,
                                      layout.kv_bytes, threads=threads, unroll=unroll,
                                      grid=grid)

        def run(copier: uva_copy.LayerCopier = copier) -> None:
            copier.events.clear()
            copier.launch()
            copier.synchronize()

        run()
        seconds = timed(run, args.repeats)
        gbps = nbytes / seconds / 1e9
        # Check one (block, layer) landed where it belongs.
        b, layer = n // 2, config.num_layers // 2
        want = host[slots[b] * layout.block_bytes:][:layout.block_bytes]
        got = cache.kv[layer][:, pages[b]].contiguous().view(torch.uint8).cpu().numpy()
        start = layer * layout.layer_bytes
        verified = bool(np.array_equal(got.reshape(-1), want[start:start + layout.layer_bytes]))
        log(f"threads {threads} unroll {unroll} grid {grid}: {gbps:.1f} GB/s")
        doc["configs"].append({"threads": threads, "unroll": unroll, "grid": grid,
                               "gbps": gbps,
                               "ratio_to_raw": gbps / doc["raw_copy_gbps"],
                               "verified": verified})
    best = max(doc["configs"], key=lambda c: c["gbps"])
    doc["best"] = best
    pool.close()
    emit(doc, started, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""The layer-wise KV load kernel (`engines.uva_copy`) against the raw PCIe copy, on a GPU.

Source: ``--blocks`` stored blocks of Llama 3 8B's layout (32 layers, 8 KV heads, head
dim 128, 16 tokens, bf16: 2 MiB each) scattered in a page-locked host pool, as in the
store's DRAM tier. Destination: a paged cache. Per configuration (threads per block,
16-byte vectors per thread per step, thread blocks per launch), every layer's copy is
launched once per layer, as a fetch does; the figure is bytes / time for all layers.
The raw limit is one pinned host-to-device ``cudaMemcpy`` of the same bytes, in the
same run. ``--codec fp8``: the blocks are stored by the fp8 codec (`kvstore.codec`) and
the dequantizing kernel copies them into bf16 pages; GB/s count the stored bytes read
(what crosses PCIe), and the configurations are `uva_copy.THREADS` and `UNROLL` on each
of ``--grids``. ``--sources``: where the pool lies (``private``: the embedded store's
`HostPool`, private memory on transparent huge pages; ``shm``: a POSIX shared-memory
object, as a daemon's pool that a same-host client page-locks and reads in place;
``shm-thp``: the same with ``MADV_HUGEPAGE`` asked before its pages are faulted in, which
the kernel honours where ``/sys/kernel/mm/transparent_hugepage/shmem_enabled`` allows);
each source is timed with the default configuration after the first source's sweep.
JSON on stdout.
"""

from __future__ import annotations

import argparse
import functools
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
from kvstore.codec import Fp8Codec  # noqa: E402
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


def copy_once(copier: uva_copy.LayerCopier) -> None:
    """Launch every copy of ``copier`` and wait for them."""
    copier.events.clear()
    copier.launch()
    copier.synchronize()


def shm_pool(nbytes: int, huge: bool) -> tuple[np.ndarray, Any]:
    """``nbytes`` of POSIX shared memory, faulted in and page-locked with CUDA (as a
    client maps a daemon's pool), optionally asking for transparent huge pages first;
    (the array, a closer). Says how much of it the kernel backed by huge pages."""
    import mmap
    import os

    from kvstore.shm.mapping import MADV_POPULATE_WRITE, shm_path
    from kvstore.shm.page_lock import register_with_cuda, unregister_with_cuda

    name = f"kvstore-uva-bench-{os.getpid()}-{int(huge)}"
    fd = os.open(shm_path(name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, nbytes)
        mapping = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED)
    finally:
        os.close(fd)
        os.unlink(shm_path(name))  # (the mapping keeps it)
    if huge:
        mapping.madvise(mmap.MADV_HUGEPAGE)
    mapping.madvise(MADV_POPULATE_WRITE)
    array = np.frombuffer(mapping, dtype=np.uint8)
    if not register_with_cuda(array):
        raise RuntimeError("cudaHostRegister failed on the shared mapping")

    def close() -> None:
        nonlocal array
        unregister_with_cuda(array)
        del array

    return array, close


def huge_pages_of(array: np.ndarray) -> int:
    """Bytes of ``array``'s mapping backed by huge pages (/proc/self/smaps)."""
    start = array.ctypes.data
    found, total = False, 0
    with open("/proc/self/smaps") as f:
        for line in f:
            first = line.split()[0]
            if "-" in first and not first.endswith(":"):
                low, high = (int(x, 16) for x in first.split("-"))
                found = low <= start < high
            elif found and first in ("AnonHugePages:", "ShmemPmdMapped:", "FilePmdMapped:"):
                total += int(line.split()[1]) * 1024
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--blocks", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--codec", default="none", choices=("none", "fp8"))
    parser.add_argument("--grids", default="8,16,24,32,48,64,132",
                        help="thread blocks per launch to try with --codec fp8")
    parser.add_argument("--sources", default="private",
                        help="where the blocks lie: private, shm, shm-thp (comma-separated)")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)
    if not uva_copy.available():
        print("uva_copy_bench needs CUDA and CuPy", file=sys.stderr)
        return 2
    started = time.perf_counter()
    config: ModelConfig = LLAMA3_8B
    layout = config.kv_layout(16, "bfloat16")
    codec = Fp8Codec(layout) if args.codec == "fp8" else None
    block_bytes = codec.block_bytes if codec is not None else layout.block_bytes  # stored
    n = args.blocks
    # Blocks at scattered slots of a page-locked pool (every other slot, shuffled).
    pool = HostPool(2 * n * block_bytes)
    host = np.frombuffer(pool.view(0, pool.nbytes), dtype=np.uint8)
    if codec is None:
        host[:] = np.random.default_rng(0).integers(0, 255, host.shape[0], dtype=np.uint8)
    else:  # encoded on the GPU, 64 blocks at a time
        shape = (64, layout.num_layers, 2, 16, layout.num_kv_heads, layout.head_dim)
        gen = torch.Generator(device="cuda").manual_seed(0)
        for first in range(0, 2 * n, 64):
            values = torch.randn(shape, generator=gen, device="cuda", dtype=torch.bfloat16)
            stored = codec.encode(values)[:2 * n - first].cpu().numpy()
            host[first * block_bytes:][:stored.size] = stored.reshape(-1)
    slots = np.random.default_rng(1).permutation(2 * n)[:n]
    addresses = [host.ctypes.data + int(s) * block_bytes for s in slots]
    cache = PagedKVCache(config, num_pages=n + 8, page_tokens=16, dtype=torch.bfloat16,
                         device="cuda")
    pages = np.random.default_rng(2).permutation(n + 8)[:n].tolist()
    nbytes = n * block_bytes
    src = torch.from_numpy(host[:nbytes])
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    raw_s = timed(lambda: dst.copy_(src, non_blocking=True), args.repeats)
    doc: dict[str, Any] = {"benchmark": "uva_copy_bench", "gpu": torch.cuda.get_device_name(),
                           "machine": machine_info(None), "blocks": n, "codec": args.codec,
                           "block_bytes": block_bytes, "total_bytes": nbytes,
                           "raw_copy_gbps": nbytes / raw_s / 1e9, "configs": []}
    configs = ([(512, 4, 16), (512, 4, 32), (512, 4, 64), (512, 4, 132), (512, 4, 4096),
                (256, 1, 4096)] if codec is None else
               [(uva_copy.THREADS, uva_copy.UNROLL, int(g)) for g in args.grids.split(",")])
    fp8 = (uva_copy.Fp8Chunks(codec.chunk_bytes, codec.payload_bytes, codec.num_scales,
                              layout.head_dim) if codec is not None else None)
    for threads, unroll, grid in configs:
        copier = uva_copy.LayerCopier(cache, addresses, pages, layout.layer_bytes,
                                      layout.kv_bytes, threads=threads, unroll=unroll,
                                      grid=grid, fp8=fp8)

        run = functools.partial(copy_once, copier)
        run()
        seconds = timed(run, args.repeats)
        gbps = nbytes / seconds / 1e9
        # Check one (block, layer) landed where it belongs.
        b, layer = n // 2, config.num_layers // 2
        block = host[slots[b] * block_bytes:][:block_bytes]
        if codec is not None:
            block = (codec.decode(torch.from_numpy(block.copy())[None], torch.bfloat16)
                     .contiguous().view(torch.uint8).numpy())
        got = cache.kv[layer][:, pages[b]].contiguous().view(torch.uint8).cpu().numpy()
        start = layer * layout.layer_bytes
        verified = bool(np.array_equal(got.reshape(-1),
                                       block.reshape(-1)[start:start + layout.layer_bytes]))
        log(f"threads {threads} unroll {unroll} grid {grid}: {gbps:.1f} GB/s")
        doc["configs"].append({"threads": threads, "unroll": unroll, "grid": grid,
                               "gbps": gbps,
                               "ratio_to_raw": gbps / doc["raw_copy_gbps"],
                               "verified": verified})
    best = max(doc["configs"], key=lambda c: c["gbps"])
    doc["best"] = best
    doc["sources"] = {}
    try:
        with open("/sys/kernel/mm/transparent_hugepage/shmem_enabled") as f:
            doc["shmem_thp"] = f.read().strip()
    except OSError:
        doc["shmem_thp"] = None
    for source in args.sources.split(","):
        if source == "private":
            array, close = host, None
        elif source in ("shm", "shm-thp"):
            array, close = shm_pool(host.nbytes, huge=source == "shm-thp")
            array[:] = host
        else:
            parser.error(f"unknown source {source!r}")
        moved = [array.ctypes.data + int(s) * block_bytes for s in slots]
        figure = {"huge_page_bytes": huge_pages_of(array)}
        for name, layerwise in (("layerwise", True), ("at_once", False)):
            copier = uva_copy.LayerCopier(cache, moved, pages, layout.layer_bytes,
                                          layout.kv_bytes, fp8=fp8, layerwise=layerwise)
            run = functools.partial(copy_once, copier)
            run()
            figure[f"{name}_gbps"] = nbytes / timed(run, args.repeats) / 1e9
        figure["layerwise_over_raw"] = figure["layerwise_gbps"] / doc["raw_copy_gbps"]
        log(f"source {source}: layer by layer {figure['layerwise_gbps']:.1f} GB/s, all "
            f"layers at once {figure['at_once_gbps']:.1f}, huge pages "
            f"{figure['huge_page_bytes'] >> 20} MiB")
        doc["sources"][source] = figure
        del copier, run
        if close is not None:
            del array
            close()
    pool.close()
    emit(doc, started, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""kvstore's GPU<->CPU path beside LMCache's vLLM GPU connector, on one GPU (issue 19).

The same request's KV (``--tokens`` of a model's KV, bf16) moves between a vLLM-style
paged CUDA cache and page-locked host memory, both ways, by each system as its vLLM
integration moves it:

- **kvstore** (`KVStoreConnector`'s worker path): vLLM 0.32's default layout (LBNHC: per
  layer ``[blocks, tokens, heads, K|V]``); loads by `gpu_loads.LayerLoads` (a kernel
  reading the stored blocks in place in pinned memory, layer by layer); saves by
  `gpu_loads.LayerSaves` (each layer gathered beside the caches, then copied to pinned
  host rows on a side stream while the next layers are gathered). Also timed: the save
  as it was before (every layer gathered, then one copy).
- **LMCache** 0.5.x, `VLLMPagedMemGPUConnectorV2` (its vLLM connector's default): per
  layer ``[2, blocks, tokens, heads, head_dim]`` (the FlashAttention layout it takes),
  chunks of ``--chunk-tokens`` in page-locked `TensorMemoryObj` (format ``KV_2LTD``),
  ``batched_to_gpu`` / ``batched_from_gpu`` with the token slot mapping; its kernel
  (``multi_layer_kv_transfer``) reads and writes host memory in place.

Both scatter the request over every other block of a pool twice its size. What is timed
is the step between the GPU and page-locked host memory only: kvstore's connector also
copies each block between its staging rows and the store (one host copy each way),
which LMCache's does not (its memory objects are its CPU backend's storage); the two
sides also use different cache layouts, each its own integration's. Raw: one
pinned copy of the same bytes each way in the same run. Every path's bytes are checked
once (a round trip through it equals what went in). JSON on stdout: GB/s, ratios to raw
and kvstore / LMCache, medians of ``--repeats``.

LMCache is a benchmark peer, never a dependency: it is imported from ``--lmcache-path``
(a directory of its installed packages) or the environment. If it cannot be imported or
its connector cannot run here, the JSON says why and kvstore's figures stand alone.
Only LMCache's CacheGen codec imports numba; where numba is not installed, a stand-in
module whose ``njit`` returns the function is put in its place (the JSON says so):
nothing measured here calls it.
"""

from __future__ import annotations

import argparse
import sys
import time
import types
from pathlib import Path
from typing import Any

_REPO = Path(__file__).resolve().parents[1]
for path in (_REPO, _REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402
from store_bench import emit, log, machine_info  # noqa: E402
from vllm_pages_bench import PHYSICAL_ORDERS, SHAPES, timed, views  # noqa: E402

from kvstore.integrations import gpu_loads  # noqa: E402
from kvstore.integrations.pages import KVViewCodec, PageLayout  # noqa: E402


def raw_copies(nbytes: int, repeats: int) -> dict[str, float]:
    host = torch.randint(0, 256, (nbytes,), dtype=torch.uint8).pin_memory()
    device = torch.empty_like(host, device="cuda")
    h2d = timed(lambda: device.copy_(host, non_blocking=True), repeats)
    d2h = timed(lambda: host.copy_(device, non_blocking=True), repeats)
    return {"h2d_gbps": nbytes / h2d / 1e9, "d2h_gbps": nbytes / d2h / 1e9}


def kvstore_side(args: argparse.Namespace, block_ids: list[int], pool_blocks: int
                 ) -> dict[str, Any]:
    layers, heads, head_dim = SHAPES[args.model]
    codec = KVViewCodec(heads, args.block_tokens, head_dim)
    caches = views(PHYSICAL_ORDERS["LBNHC"], layers, pool_blocks, heads, args.block_tokens,
                   head_dim, torch.bfloat16)
    pages = PageLayout(caches, codec, num_blocks=pool_blocks)
    n = len(block_ids)
    rows = torch.randint(0, 256, (n, pages.block_bytes), dtype=torch.uint8).pin_memory()
    loads = gpu_loads.LayerLoads(pages)
    on_device = pages.staging(n, on_device=True)
    on_host = pages.staging(n)

    def load() -> None:
        for layer in range(layers):
            loads.load_layer(layer, [(rows, block_ids)])
        loads.synchronize()

    saves = gpu_loads.LayerSaves(pages)

    def save() -> None:  # as the connector saves: each layer to the host as it comes
        for layer in range(layers):
            saves.save_layer(layer, [(on_device, on_host, block_ids)])
        saves.synchronize()

    def save_one_copy() -> None:  # as it did before: every layer gathered, then one copy
        for layer in range(layers):
            pages.gather_layer(layer, block_ids, on_device)
        on_host.copy_(on_device)

    load_s = timed(load, args.repeats)
    equal = {}
    seconds = {}
    for name, fn in (("save_one_copy", save_one_copy), ("save", save)):
        on_host.zero_()
        seconds[name] = timed(fn, args.repeats)
        equal[name] = bool(torch.equal(on_host, rows))
    nbytes = rows.numel()
    return {"layout": "LBNHC", "kernel": loads.use_kernel, "bytes": nbytes,
            "load_gbps": nbytes / load_s / 1e9, "save_gbps": nbytes / seconds["save"] / 1e9,
            "save_one_copy_gbps": nbytes / seconds["save_one_copy"] / 1e9,
            "round_trip_equal": all(equal.values()), "round_trips_equal": equal}


def import_lmcache(path: str | None) -> dict[str, Any]:
    """Import LMCache's connector pieces; what was needed to, or why it failed."""
    if path:
        sys.path.insert(0, path)
    info: dict[str, Any] = {}
    try:
        import numba  # noqa: F401
    except ImportError:  # only its CacheGen codec uses numba (see the module docstring)
        stand_in = types.ModuleType("numba")
        stand_in.njit = lambda *a, **k: (a[0] if a and callable(a[0]) else (lambda f: f))
        sys.modules["numba"] = stand_in
        info["numba_stand_in"] = True
    try:
        import lmcache

        info["version"] = getattr(lmcache, "__version__", None)
        from lmcache.v1.gpu_connector.gpu_connectors import (  # noqa: F401
            VLLMPagedMemGPUConnectorV2,
        )
        from lmcache.v1.memory_management import (  # noqa: F401
            MemoryFormat,
            MemoryObjMetadata,
            TensorMemoryObj,
        )
    except Exception as e:  # (any import failure is the answer)
        info["error"] = f"{type(e).__name__}: {e}"
        return info
    try:  # its CUDA kernels; without them its connector runs a torch fallback
        import lmcache.cuda_ops

        info["cuda_ops"] = "loaded"
    except ImportError as e:
        info["cuda_ops"] = f"not loaded ({e}): its connector runs its torch fallback"
    return info


def lmcache_side(args: argparse.Namespace, block_ids: list[int], pool_blocks: int,
                 use_gpu_buffer: bool) -> dict[str, Any]:
    from lmcache.v1.gpu_connector.gpu_connectors import VLLMPagedMemGPUConnectorV2
    from lmcache.v1.memory_management import MemoryFormat, MemoryObjMetadata, TensorMemoryObj

    layers, heads, head_dim = SHAPES[args.model]
    tokens, chunk = args.tokens, args.chunk_tokens
    caches = [torch.empty(2, pool_blocks, args.block_tokens, heads, head_dim,
                          dtype=torch.bfloat16, device="cuda") for _ in range(layers)]
    t = torch.arange(tokens)
    slots = (torch.tensor(block_ids)[t // args.block_tokens] * args.block_tokens
             + t % args.block_tokens).to("cuda")
    shape = torch.Size([2, layers, chunk, heads * head_dim])
    nbytes_chunk = shape.numel() * 2

    def objects() -> list[Any]:
        out = []
        for _ in range(tokens // chunk):
            raw = torch.randint(0, 256, (nbytes_chunk,), dtype=torch.uint8).pin_memory()
            meta = MemoryObjMetadata(shape=shape, dtype=torch.bfloat16, address=0,
                                     phy_size=nbytes_chunk, ref_count=1,
                                     fmt=MemoryFormat.KV_2LTD)
            out.append(TensorMemoryObj(raw, meta, None))
        return out

    kwargs: dict[str, Any] = {}
    if use_gpu_buffer:
        kwargs = {"chunk_size": chunk, "dtype": torch.bfloat16, "device": "cuda"}
    connector = VLLMPagedMemGPUConnectorV2(heads * head_dim, layers, use_gpu=use_gpu_buffer,
                                           **kwargs)
    sources, sinks = objects(), objects()
    starts = list(range(0, tokens, chunk))
    ends = [s + chunk for s in starts]

    def load() -> None:
        connector.batched_to_gpu(sources, starts, ends, kvcaches=caches, slot_mapping=slots)

    def save() -> None:
        connector.batched_from_gpu(sinks, starts, ends, kvcaches=caches, slot_mapping=slots)

    load_s = timed(load, args.repeats)
    save_s = timed(save, args.repeats)
    # As bytes: random bytes seen as bf16 hold NaNs, which never compare equal as values.
    equal = all(torch.equal(a.tensor.view(torch.uint8), b.tensor.view(torch.uint8))
                for a, b in zip(sources, sinks, strict=True))
    nbytes = nbytes_chunk * len(sources)
    return {"layout": "[2, blocks, tokens, heads, head_dim] per layer",
            "gpu_buffer": use_gpu_buffer, "bytes": nbytes,
            "load_gbps": nbytes / load_s / 1e9, "save_gbps": nbytes / save_s / 1e9,
            "round_trip_equal": equal}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama3-8b", choices=sorted(SHAPES))
    parser.add_argument("--tokens", type=int, default=8192, help="tokens of one request")
    parser.add_argument("--chunk-tokens", type=int, default=256,
                        help="LMCache's chunk (its default chunk_size)")
    parser.add_argument("--block-tokens", type=int, default=16, help="vLLM's CUDA block")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--lmcache-path", help="a directory holding LMCache's packages")
    parser.add_argument("--json-out")
    args = parser.parse_args(argv)
    if args.tokens % args.chunk_tokens or args.chunk_tokens % args.block_tokens:
        parser.error("--tokens must be a multiple of --chunk-tokens, and that of "
                     "--block-tokens")
    if not torch.cuda.is_available():
        print('{"skipped": "needs CUDA"}')
        return 0
    started_s = time.perf_counter()
    blocks = args.tokens // args.block_tokens
    pool_blocks, block_ids = 2 * blocks, list(range(0, 2 * blocks, 2))
    doc: dict[str, Any] = {"machine": machine_info(None), "gpu": torch.cuda.get_device_name(),
                           "torch": torch.__version__, "model": args.model,
                           "tokens": args.tokens}
    kv = kvstore_side(args, block_ids, pool_blocks)
    raw = raw_copies(kv["bytes"], args.repeats)
    doc.update(raw=raw, kvstore=kv)
    log(f"raw {raw['h2d_gbps']:.1f} / {raw['d2h_gbps']:.1f} GB/s (H2D / D2H); kvstore load "
        f"{kv['load_gbps']:.1f}, save {kv['save_gbps']:.1f} (gathered, then one copy: "
        f"{kv['save_one_copy_gbps']:.1f})")
    lmc = import_lmcache(args.lmcache_path)
    doc["lmcache"] = lmc
    if "error" not in lmc:
        for use_gpu_buffer in (False, True):
            name = "gpu_buffer" if use_gpu_buffer else "direct"
            try:
                lmc[name] = side = lmcache_side(args, block_ids, pool_blocks, use_gpu_buffer)
            except Exception as e:  # (the JSON says why it could not run)
                lmc[name] = {"error": f"{type(e).__name__}: {e}"}
                log(f"LMCache ({name}) could not run: {lmc[name]['error']}")
                continue
            log(f"LMCache ({name}) load {side['load_gbps']:.1f}, save {side['save_gbps']:.1f}")
            torch.cuda.empty_cache()
    for direction, raw_key in (("load", "h2d_gbps"), ("save", "d2h_gbps")):
        figure = {"kvstore_gbps": kv[f"{direction}_gbps"], "raw_gbps": raw[raw_key],
                  "kvstore_of_raw": kv[f"{direction}_gbps"] / raw[raw_key]}
        for name in ("direct", "gpu_buffer"):
            side = lmc.get(name)
            if isinstance(side, dict) and "error" not in side:
                figure[f"lmcache_{name}_gbps"] = side[f"{direction}_gbps"]
                figure[f"kvstore_over_lmcache_{name}"] = (kv[f"{direction}_gbps"]
                                                          / side[f"{direction}_gbps"])
        doc[direction] = figure
    emit(doc, started_s, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

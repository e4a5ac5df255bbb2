"""Layer-wise KV loads on a GPU straight from the store's memory: a copy kernel that reads
whole stored blocks where they lie (page-locked host DRAM, read in place through unified
virtual addressing, or HBM) and writes one layer of them into the paged cache.

DESIGN.md records why: small DMAs crawl (one 32 KiB copy per page and layer: 0.04 of the
PCIe limit), while a kernel that reads the pinned pool directly with 16-byte loads, one
thread block per (block, K or V), moves scattered pages at 0.92-0.97 of it, also when
launched once per layer. So a fetch launches one kernel per layer on a side stream (a
small grid looping over the chunks, so the overlapping forward keeps most SMs),
records an event after each, and the forward's ``before_layer(i)`` makes the compute
stream wait for event i only: layer i+1's copy overlaps layer i's compute.

Blocks held in HBM that lie in runs (see `dma_runs`) go by 2D DMAs on the copy engines
instead, one per run, layer and half, with the same events.

Source, per (block b, layer l, half h in {K, V}): ``block_ptr[b] + l * layer_bytes +
h * kv_bytes`` (the layer-major block format of `kvstore.layout`); destination:
``kv[l][h, page[b]]``, each ``kv_bytes`` long. Needs CuPy (for the kernel) and 16-byte
aligned pointers and sizes; `available` says whether it can run.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from engines.paged_cache import PagedKVCache

# Shared by both kernels: one step of a thread's loads, UNROLL independent 16-byte loads
# (vectors first, first + blockDim.x, ...) all issued before any is used, so more reads
# are in flight over PCIe. A chunk's count of vectors need not divide evenly: the loads
# past it are skipped (and so are their stores, by the same test).
_LOAD_STEP = r"""
__device__ __forceinline__ void load_step(const uint4* s, long long first,
                                          long long num_vectors, uint4 (&v)[UNROLL]) {
  #pragma unroll
  for (int u = 0; u < UNROLL; ++u) {
    long long i = first + (long long)u * blockDim.x;
    if (i < num_vectors) v[u] = s[i];
  }
}
"""
_SOURCE = _LOAD_STEP + r"""
extern "C" __global__ void copy_chunks(const unsigned long long* src,
                                       const unsigned long long* dst,
                                       long long num_chunks, long long num_vectors) {
  const long long step = (long long)blockDim.x * UNROLL;
  for (long long c = blockIdx.x; c < num_chunks; c += gridDim.x) {
    const uint4* s = reinterpret_cast<const uint4*>(src[c]);
    uint4* d = reinterpret_cast<uint4*>(dst[c]);
    for (long long first = threadIdx.x; first < num_vectors; first += step) {
      uint4 v[UNROLL];
      load_step(s, first, num_vectors, v);
      #pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        long long i = first + (long long)u * blockDim.x;
        if (i < num_vectors) d[i] = v[u];
      }
    }
  }
}
"""
# The fp8 codec's chunks (`kvstore.codec`): fp8 e4m3 values then one float32 scale per
# token and head, dequantized into bf16 pages as they are copied (half the bytes cross
# PCIe). Each thread turns one 16-byte load (16 values of one token's head: head_dim is a
# multiple of 16, so vector i's scale is number i / (head_dim / 16)) into two 16-byte
# stores, with the steps of `Fp8Codec.decode`: float(e4m3) * scale in float32, rounded to
# bf16 to nearest even, so the pages equal its result bit for bit. A chunk's first loads
# are issued before its scales are read: the two reads over PCIe overlap.
# On sm_89 and later (the H100) e4m3x2 -> half2 is one instruction, exact (every e4m3
# value is a half), and so is float2 -> bf16x2 with round to nearest even: written in PTX
# (NVRTC needs no header, and CuPy compiles with -ftz=true, which would flush the
# subnormal products that torch keeps). Older GPUs look e4m3 up in a 256-entry table and
# round by hand. NaN (the encoder never writes it) stays NaN on the first path, 0 on the
# second.
_FP8_SOURCE = _LOAD_STEP + r"""
#if __CUDA_ARCH__ >= 890
__device__ __forceinline__ void init_table() {}
__device__ __forceinline__ unsigned int dequant_pair(unsigned int two, float scale) {
  unsigned int out;  // two e4m3 (the low 16 bits) -> two bf16, the first in the low half
  asm("{\n\t"
      ".reg .b32 h2;\n\t"
      ".reg .b16 h_lo, h_hi;\n\t"
      ".reg .f32 f_lo, f_hi;\n\t"
      "cvt.rn.f16x2.e4m3x2 h2, %1;\n\t"
      "mov.b32 {h_lo, h_hi}, h2;\n\t"
      "cvt.f32.f16 f_lo, h_lo;\n\t"
      "cvt.f32.f16 f_hi, h_hi;\n\t"
      "mul.rn.f32 f_lo, f_lo, %2;\n\t"
      "mul.rn.f32 f_hi, f_hi, %2;\n\t"
      "cvt.rn.bf16x2.f32 %0, f_hi, f_lo;\n\t"
      "}" : "=r"(out) : "h"((unsigned short)two), "f"(scale));
  return out;
}
#else
__shared__ float table[256];
__device__ __forceinline__ void init_table() {
  for (int i = threadIdx.x; i < 256; i += blockDim.x) {
    int e = (i >> 3) & 15, m = i & 7;
    float v = e == 0 ? ldexpf((float)m, -9) : ldexpf(1.0f + m * 0.125f, e - 7);
    if (e == 15 && m == 7) v = 0.0f;  // NaN
    table[i] = (i & 128) ? -v : v;
  }
}
__device__ __forceinline__ unsigned int scaled_bf16(unsigned int code, float scale) {
  float f;
  asm("mul.rn.f32 %0, %1, %2;" : "=f"(f) : "f"(table[code & 0xFFu]), "f"(scale));
  unsigned int u = __float_as_uint(f);
  return (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
}
__device__ __forceinline__ unsigned int dequant_pair(unsigned int two, float scale) {
  return scaled_bf16(two, scale) | (scaled_bf16(two >> 8, scale) << 16);
}
#endif
__device__ __forceinline__ void dequant_vector(uint4 v, float scale, uint4* d) {
  uint4 a, b;
  a.x = dequant_pair(v.x, scale); a.y = dequant_pair(v.x >> 16, scale);
  a.z = dequant_pair(v.y, scale); a.w = dequant_pair(v.y >> 16, scale);
  b.x = dequant_pair(v.z, scale); b.y = dequant_pair(v.z >> 16, scale);
  b.z = dequant_pair(v.w, scale); b.w = dequant_pair(v.w >> 16, scale);
  d[0] = a;
  d[1] = b;
}
extern "C" __global__ void dequant_fp8_chunks(const unsigned long long* src,
                                              const unsigned long long* dst,
                                              long long num_chunks, long long num_vectors,
                                              long long payload_bytes, int num_scales,
                                              unsigned int vectors_per_scale) {
  __shared__ float scales[MAX_SCALES];
  init_table();
  const long long step = (long long)blockDim.x * UNROLL;
  for (long long c = blockIdx.x; c < num_chunks; c += gridDim.x) {
    const unsigned char* chunk = reinterpret_cast<const unsigned char*>(src[c]);
    const uint4* s = reinterpret_cast<const uint4*>(chunk);
    uint4* d = reinterpret_cast<uint4*>(dst[c]);
    uint4 v[UNROLL];
    load_step(s, threadIdx.x, num_vectors, v);
    __syncthreads();  // (the table, and the previous chunk's scales no longer read)
    const float* chunk_scales = reinterpret_cast<const float*>(chunk + payload_bytes);
    for (int h = threadIdx.x; h < num_scales; h += blockDim.x) scales[h] = chunk_scales[h];
    __syncthreads();
    for (long long first = threadIdx.x;;) {
      #pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        long long i = first + (long long)u * blockDim.x;
        if (i < num_vectors)  // (a chunk's vectors and scales are few: 32-bit division)
          dequant_vector(v[u], scales[(unsigned int)i / vectors_per_scale], d + 2 * i);
      }
      first += step;
      if (first >= num_vectors) break;
      load_step(s, first, num_vectors, v);
    }
  }
}
"""
UNROLL = 4
MAX_FP8_SCALES = 2048  # scales per chunk (tokens x heads) the kernel holds in shared memory
# Thread blocks per launch, each looping over chunks: enough reads in flight to fill PCIe,
# while leaving most SMs to the forward that overlaps the copy (a grid of one block per
# chunk would hold every SM and push the forward's kernels behind the copies). Measured on
# the H100 (8K-token llama3-8b fetch, 2026-11-23): 8 to 64 blocks all copy at 47-50 GB/s
# (4: 45, 2: 25), but the overlapping forward runs slower the more blocks copy: by the
# time the copies end it had reached layer 14-16 with 8-16 blocks, layer 12-13 with 64.
# With the fetch in parts (`engines.kv_io`: the first copy starts ~0.5 ms in) what ends the
# TTFT is the forward waiting on the copies, and it ends later the more of each SM the
# copy holds. 8K tokens cached in DRAM, TTFT medians of two runs (H100, 2026-11-24):
# 16 blocks of 512 threads 25.1, 25.1 ms (forward done 1.8-2.4 ms after the last copy);
# 16 of 256: 22.9, 24.3 (0.7-1.2 ms after), copying at 47.8-49.5 GB/s; 8 of 512: 23.8;
# 8 of 1024: 23.3, 25.0; 24 of 256: 24.8; 32 of 256: 25.3. Host noise moves them 1-2 ms.
GRID = 16
# The fp8 kernel's grid, its own lever. With table lookups (16 per 16 bytes read) and a
# grid of 16 it copied 26 GB/s to the lossless kernel's 50 (H100, 2026-12-06). With the
# conversions in hardware (H100, 2026-12-07), alone: grid 8 29.0 GB/s, 16 47.7, 32 48.0,
# 64 42.6; fp8 TTFT from DRAM beside the forward, grid 16 / 32: 16.3 / 15.1 ms at 8K,
# 52.2 / 48.0 ms at 32K (docs/BENCHMARKS.md).
FP8_GRID = 32
THREADS = 256
ALIGN = 16
# Blocks in device memory (the HBM tier) whose addresses advance by one stride while their
# pages advance by one form a run, copied by the copy engines instead: one 2D DMA per run,
# layer and half (rows of `kv_bytes`, source pitch the stride). Not for host memory: alone
# the DMAs reach the raw pinned copy (54.1 GB/s; this kernel 49.9), but beside the GEMMs
# of the forward they overlap they fell to 37.8 GB/s (beside an HBM copy, 27.5), where
# this kernel kept 47.2 (43.5) (H100, 2026-11-24). From HBM the kernel's small grid is
# what limits it (8K tokens of llama3-8b: TTFT 34-38 ms by the kernel, 24 ms by DMA).
# At most this many runs per fetch; past it the blocks are scattered and the kernel copies.
MAX_DMA_RUNS = 8
MIN_DMA_RUN = 16  # blocks: shorter runs are small DMAs, which crawl (see DESIGN.md)


@functools.cache
def _kernel(unroll: int = UNROLL) -> Any:
    import cupy

    return cupy.RawKernel(_SOURCE, "copy_chunks", options=(f"-DUNROLL={unroll}",))


@functools.cache
def _fp8_kernel(unroll: int = UNROLL) -> Any:
    import cupy

    return cupy.RawKernel(_FP8_SOURCE, "dequant_fp8_chunks",
                          options=(f"-DUNROLL={unroll}", f"-DMAX_SCALES={MAX_FP8_SCALES}"))


@functools.cache
def fp8_available() -> bool:
    """`available`, and the fp8 dequantizing kernel compiles."""
    if not available():
        return False
    try:
        _fp8_kernel().compile()
    except Exception:
        return False
    return True


@dataclass(frozen=True)
class Fp8Chunks:
    """How the fp8 codec lays out a block (`kvstore.codec.Fp8Codec`): what the copier
    needs to dequantize chunks into bf16 pages."""

    chunk_bytes: int  # one layer's K or V in the store: values, then scales
    payload_bytes: int  # its fp8 values
    num_scales: int  # its scales: one per token and head
    head_dim: int


@functools.cache
def available() -> bool:
    """CUDA and CuPy are there and the kernel compiles."""
    if not torch.cuda.is_available():
        return False
    try:
        _kernel().compile()
    except Exception:
        return False
    return True


class LayerCopier:
    """Launches the copies of ``n`` blocks into ``pages`` of ``cache``: one per layer, an
    event after each (``layerwise``), or all layers at once with one event (a fetch in
    several parts: only the last part's copies need to be layer by layer, see
    `engines.kv_io`). On ``stream``, or a side stream of its own."""

    def __init__(self, cache: PagedKVCache, block_addresses: list[int], pages: list[int],
                 layer_bytes: int, kv_bytes: int, *, threads: int = THREADS,
                 unroll: int = UNROLL, grid: int | None = None,
                 stream: torch.cuda.Stream | None = None, layerwise: bool = True,
                 fp8: Fp8Chunks | None = None) -> None:
        """``layer_bytes``, ``kv_bytes``: a layer and one of its halves in the pages (and
        in the store, unless ``fp8``: blocks stored by the fp8 codec, dequantized into
        bf16 pages by the kernel as they are copied). ``grid``: thread blocks per launch
        (default `GRID`, or `FP8_GRID` for fp8)."""
        if kv_bytes % ALIGN or layer_bytes % ALIGN or any(a % ALIGN for a in block_addresses):
            raise ValueError("UVA copies need 16-byte aligned blocks and sizes")
        if fp8 is not None and (fp8.chunk_bytes % ALIGN or fp8.head_dim % 16
                                or fp8.num_scales > MAX_FP8_SCALES
                                or cache.dtype != torch.bfloat16):
            raise ValueError("fp8 copies need 16-byte chunks, head_dim a multiple of 16, "
                             f"at most {MAX_FP8_SCALES} scales a chunk and bf16 pages")
        self.fp8 = fp8
        self.cache = cache
        self.kv_bytes = kv_bytes
        self.threads = threads
        self.unroll = unroll
        self.grid = grid if grid is not None else GRID if fp8 is None else FP8_GRID
        self.layerwise = layerwise
        device = cache.device
        num_layers = len(cache.kv)
        self.stream = stream if stream is not None else torch.cuda.Stream(device=device)
        self.events: list[torch.cuda.Event] = []  # one per layer, or one if not layerwise
        # Host memory goes by the kernel, which holds up better beside the forward; runs
        # are looked for only from HBM, and each must lie there.
        self.runs = (dma_runs(block_addresses, pages)  # (DMAs cannot dequantize)
                     if block_addresses and fp8 is None
                     and _in_device_memory(block_addresses[0]) else None)
        if self.runs is not None and not all(_in_device_memory(block_addresses[first])
                                             for first, _, _ in self.runs[1:]):
            self.runs = None
        if self.runs is not None:  # copy engines: no pointer tables
            self._layer_offsets = [layer * layer_bytes for layer in range(num_layers)]
            self._kv_base = [kv.data_ptr() for kv in cache.kv]
            self._addresses = block_addresses
            self._pages = pages
            self.num_chunks = 2 * len(pages)
            return
        # [layer, block, half] -> address; flattened per layer: one kernel's pointer table.
        # Built in numpy and uploaded in one copy (torch's CPU ops and two uploads cost ~1 ms
        # in front of the first copy; pinning the table first cost 3.5 ms).
        blocks = np.asarray(block_addresses, dtype=np.int64)
        half = kv_bytes if fp8 is None else fp8.chunk_bytes  # in the store
        layers = np.arange(num_layers, dtype=np.int64) * 2 * half
        src = blocks[None, :, None] + layers[:, None, None] + np.array([0, half])
        page = np.asarray(pages, dtype=np.int64)
        bases = np.array([kv.data_ptr() for kv in cache.kv], dtype=np.int64)
        dst = (bases[:, None, None]
               + (np.array([0, cache.num_pool_pages]) + page[None, :, None]) * kv_bytes)
        tables = np.stack([src.reshape(num_layers, -1), dst.reshape(num_layers, -1)])
        self._tables = torch.from_numpy(tables).to(device)
        self.num_chunks = tables.shape[2]

    def launch(self) -> None:
        """Queue the copies on the side stream, with their events."""
        if self.runs is not None:
            self._launch_dma()
            return
        import cupy

        kernel = _kernel(self.unroll)
        extra: tuple[Any, ...] = ()
        if self.fp8 is not None:  # the same launches, dequantizing: 16 values a vector
            kernel = _fp8_kernel(self.unroll)
            extra = (np.int64(self.fp8.payload_bytes), np.int32(self.fp8.num_scales),
                     np.uint32(self.fp8.head_dim // 16))
        # The pointer tables were uploaded on the current stream: copies wait for them.
        self.stream.wait_stream(torch.cuda.current_stream(self.cache.device))
        with warnings.catch_warnings():  # newer CuPy deprecates the pointer form
            warnings.simplefilter("ignore", DeprecationWarning)
            external = cupy.cuda.ExternalStream(self.stream.cuda_stream)
        num_layers = self._tables.shape[1]
        row_bytes = self.num_chunks * self._tables.element_size()
        src = self._tables.data_ptr()
        dst = src + num_layers * row_bytes
        num_vectors = np.int64(self.kv_bytes // ALIGN if self.fp8 is None
                               else self.fp8.payload_bytes // ALIGN)  # vectors read
        if not self.layerwise:  # the tables' rows are consecutive: one launch copies all
            with external:
                kernel((min(self.grid, self.num_chunks * num_layers),), (self.threads,),
                       (np.uint64(src), np.uint64(dst), np.int64(self.num_chunks * num_layers),
                        num_vectors, *extra))
            self._record()
            return
        num_chunks = np.int64(self.num_chunks)
        with external:
            for layer in range(num_layers):
                kernel((min(self.grid, self.num_chunks),), (self.threads,),
                       (np.uint64(src + layer * row_bytes), np.uint64(dst + layer * row_bytes),
                        num_chunks, num_vectors, *extra))
                self._record()

    def _launch_dma(self) -> None:
        from cupy.cuda import runtime

        kv_bytes, num_pages = self.kv_bytes, self.cache.num_pool_pages
        stream = self.stream.cuda_stream
        with torch.cuda.device(self.cache.device):
            for layer, layer_offset in enumerate(self._layer_offsets):
                for start, count, stride in self.runs:
                    src = self._addresses[start] + layer_offset
                    for half in (0, 1):
                        dst = (self._kv_base[layer]
                               + (half * num_pages + self._pages[start]) * kv_bytes)
                        runtime.memcpy2DAsync(dst, kv_bytes, src + half * kv_bytes, stride,
                                              kv_bytes, count, runtime.memcpyDefault, stream)
                if self.layerwise:
                    self._record()
        if not self.layerwise:
            self._record()

    def _record(self) -> None:
        event = torch.cuda.Event()
        event.record(self.stream)
        self.events.append(event)

    def wait(self, layer: int) -> None:
        """Make the current stream wait for ``layer``'s copy (no host sync)."""
        event = self.events[layer] if self.layerwise else self.events[-1]
        torch.cuda.current_stream(self.cache.device).wait_event(event)

    def synchronize(self) -> None:
        """Block the host until every copy is done (before the sources may go)."""
        if self.events:
            self.events[-1].synchronize()


def _in_device_memory(address: int) -> bool:
    from cupy.cuda import runtime

    return bool(runtime.pointerGetAttributes(address).type == runtime.memoryTypeDevice)


def dma_runs(addresses: list[int], pages: list[int]) -> list[tuple[int, int, int]] | None:
    """``(first, count, source stride)`` of each run of blocks whose addresses advance by
    one stride while their pages advance by one; None if there are more than
    `MAX_DMA_RUNS` runs or one shorter than `MIN_DMA_RUN` (then the kernel copies)."""
    runs: list[tuple[int, int, int]] = []
    start, n = 0, len(addresses)
    while start < n:
        end = start + 1
        stride = addresses[end] - addresses[start] if end < n else 0
        while (end < n and addresses[end] - addresses[end - 1] == stride and stride > 0
               and pages[end] == pages[end - 1] + 1):
            end += 1
        if end - start < MIN_DMA_RUN or len(runs) == MAX_DMA_RUNS:
            return None
        runs.append((start, end - start, stride))
        start = end
    return runs or None

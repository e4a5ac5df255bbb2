"""Loads of stored blocks into a serving engine's CUDA KV caches, a layer at a time, on a
side stream: the compute stream waits for a layer's copy just before it reads that layer.
Saves the other way (`LayerSaves`): each layer gathered beside the caches as the forward
hands it over, then copied to page-locked host rows on a side stream while the forward
computes the next layers.

The blocks are in host staging rows (`kvstore.integrations.pages.PageLayout.staging`,
page-locked when the caches are on a GPU). A copy kernel reads each row's slice of a
layer in place, through unified virtual addressing (no copy to the device first), and
writes each 16 bytes where the layer's logical view ``[R * blocks, heads, tokens, K|V]``
puts it (`KVViewCodec`'s geometry, any strides)::

    row of block b:  | layer 0 | ... | layer l: K [T, H, D] then V [T, H, D] | ...
                                        vector i (16 bytes) = (kv, t, h, v) in that order
    view:            base + (page[b] * R + t / N) * s_block + h * s_head
                          + (t % N) * s_token + kv * head_bytes + 16 * v

Reads are contiguous (a row's layer slice in order); writes land in 16-byte pieces,
which the GPU's memory takes at full speed. Without CuPy (or where the kernel does not
compile) the same copy goes by torch: the rows to the device, then the strided copies of
`KVViewCodec.scatter`, on the same side stream.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from kvstore.integrations.pages import KVViewCodec, PageLayout

# A block's source: staging rows, or each block's address in page-locked host memory.
Rows = torch.Tensor | Sequence[int]
ALIGN = 16  # bytes a thread loads and stores at once
UNROLL = 4  # loads a thread has in flight before its stores
MAX_UNROLL = 16  # (each load in flight holds 16 bytes of registers)
THREADS = 256
# Thread blocks per launch, each looping over the stored blocks: enough loads in flight to
# fill PCIe while the forward that overlaps the copies keeps most SMs (as the engines'
# copy kernel, `engines.uva_copy`).
GRID = 16

_SOURCE = r"""
extern "C" __global__ void scatter_layer(
    const unsigned long long* rows, const long long* pages, long long num_blocks,
    long long layer_offset, unsigned long long base, long long split,
    long long block_stride, long long head_stride, long long token_stride,
    int tokens, int heads, int kernel_tokens, int head_vectors) {
  const long long per_block = 2LL * tokens * heads * head_vectors;
  const long long step = (long long)blockDim.x * UNROLL;
  for (long long b = blockIdx.x; b < num_blocks; b += gridDim.x) {
    const uint4* src = reinterpret_cast<const uint4*>(rows[b] + layer_offset);
    char* first_row = reinterpret_cast<char*>(base) + pages[b] * split * block_stride;
    for (long long first = threadIdx.x; first < per_block; first += step) {
      uint4 v[UNROLL];
      #pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        long long i = first + (long long)u * blockDim.x;
        if (i < per_block) v[u] = src[i];
      }
      #pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        long long i = first + (long long)u * blockDim.x;
        if (i >= per_block) continue;
        int vector = (int)(i % head_vectors);
        long long cell = i / head_vectors;
        int h = (int)(cell % heads);
        cell /= heads;
        int t = (int)(cell % tokens);
        int kv = (int)(cell / tokens);
        char* d = first_row + (long long)(t / kernel_tokens) * block_stride
                  + h * head_stride + (long long)(t % kernel_tokens) * token_stride
                  + ((long long)kv * head_vectors + vector) * 16;
        *reinterpret_cast<uint4*>(d) = v[u];
      }
    }
  }
}
"""


@functools.cache
def _kernel(unroll: int = UNROLL) -> Any:
    import cupy

    return cupy.RawKernel(_SOURCE, "scatter_layer", options=(f"-DUNROLL={unroll}",))


@functools.cache
def kernel_available() -> bool:
    """CUDA and CuPy are there, and the kernel compiles."""
    if not torch.cuda.is_available():
        return False
    try:
        _kernel().compile()
    except Exception:
        return False
    return True


class LayerLoads:
    """One step's loads into ``pages``' CUDA caches (`PageLayout` with a `KVViewCodec`):
    `load_layer` queues a layer's copies on the side stream and records its event; `wait`
    makes the current stream wait for it; `synchronize` blocks until all are done (before
    the staging rows are reused). ``use_kernel`` False: torch's copies instead;
    ``grid`` and ``unroll``: the kernel's thread blocks per launch and loads in flight
    per thread (`GRID`, `UNROLL`; the benchmark tries others)."""

    def __init__(self, pages: PageLayout, *, use_kernel: bool | None = None,
                 grid: int = GRID, unroll: int = UNROLL) -> None:
        if grid < 1 or not 1 <= unroll <= MAX_UNROLL:
            raise ValueError(f"grid is at least 1 and unroll 1 to {MAX_UNROLL}, got {grid} "
                             f"and {unroll}")
        self.grid, self.unroll = grid, unroll
        if not isinstance(pages.codec, KVViewCodec) or pages.device.type != "cuda":
            raise ValueError("LayerLoads is for CUDA caches seen through a KVViewCodec")
        self.pages = pages
        self.codec: KVViewCodec = pages.codec
        aligned = all(_aligned(cache) for cache in pages.caches) and not pages.page_bytes % ALIGN
        if use_kernel and not aligned:
            raise ValueError("the copy kernel needs caches whose heads' K and V, strides and "
                             "pages are multiples of 16 bytes")
        self.use_kernel = (kernel_available() and aligned) if use_kernel is None else use_kernel
        if self.use_kernel and unroll != UNROLL:
            _kernel(unroll).compile()  # (a failure here, not at the first load)
        self.stream = torch.cuda.Stream(device=pages.device)
        self.events: dict[int, torch.cuda.Event] = {}
        # The kernel's tables (row addresses, pages) of each load of this step, on the
        # device: uploaded with the first layer's copies, the same for every layer.
        self._tables: dict[tuple[int, int, tuple[int, ...]], torch.Tensor] = {}

    def load_layer(self, layer: int, loads: Sequence[tuple[Rows, Sequence[int]]]) -> None:
        """Queue layer ``layer`` of each ``(rows, block ids)`` into its pages: the rows are
        staging rows, or (the kernel only) each block's address in page-locked host
        memory, such as the store's own pool lent in place (`kvstore.Client.lend`)."""
        pages, cache = self.pages, self.pages.caches[layer]
        with torch.cuda.stream(self.stream):
            for rows, block_ids in loads:
                if not len(block_ids):
                    continue
                if self.use_kernel:
                    self._launch(layer, cache, rows, block_ids)
                elif not isinstance(rows, torch.Tensor):
                    raise ValueError("rows given by address need the copy kernel")
                else:
                    start = layer * pages.page_bytes
                    self.codec.scatter(cache, pages.num_blocks,
                                       rows[:len(block_ids), start:start + pages.page_bytes],
                                       block_ids)
            event = torch.cuda.Event()
            event.record(self.stream)
        self.events[layer] = event

    def _launch(self, layer: int, cache: torch.Tensor, rows: Rows,
                block_ids: Sequence[int]) -> None:
        import cupy

        pages, codec = self.pages, self.codec
        n = len(block_ids)
        split = cache.shape[0] // pages.num_blocks
        raw = cache.view(torch.uint8)
        head_bytes = raw.shape[3] // 2
        tables = self._tables_for(rows, block_ids, cache.device)
        with warnings.catch_warnings():  # newer CuPy deprecates the pointer form
            warnings.simplefilter("ignore", DeprecationWarning)
            external = cupy.cuda.ExternalStream(self.stream.cuda_stream)
        with external:
            _kernel(self.unroll)((min(self.grid, n),), (THREADS,), (
                np.uint64(tables[0].data_ptr()), np.uint64(tables[1].data_ptr()),
                np.int64(n), np.int64(layer * pages.page_bytes), np.uint64(raw.data_ptr()),
                np.int64(split), np.int64(raw.stride(0)), np.int64(raw.stride(1)),
                np.int64(raw.stride(2)), np.int32(codec.block_tokens),
                np.int32(codec.num_kv_heads), np.int32(raw.shape[2]),
                np.int32(head_bytes // ALIGN)))

    def _tables_for(self, rows: Rows, block_ids: Sequence[int],
                    device: torch.device) -> torch.Tensor:
        """The kernel's tables for ``rows`` and ``block_ids`` on ``device`` (int64, row
        addresses then pages), uploaded once per step on the side stream (the current
        one) from pinned memory, without a host sync."""
        n = len(block_ids)
        if isinstance(rows, torch.Tensor):
            if rows.data_ptr() % ALIGN or rows.stride(0) % ALIGN:
                raise ValueError("the copy kernel needs 16-byte aligned staging rows")
            key: tuple[Any, ...] = (rows.data_ptr(), rows.stride(0), tuple(block_ids))
        else:
            if len(rows) < n or any(a % ALIGN for a in rows[:n]):
                raise ValueError("the copy kernel needs a 16-byte aligned address a block")
            key = (tuple(rows[:n]), tuple(block_ids))
        tables = self._tables.get(key)
        if tables is None:
            addresses = (rows.data_ptr() + np.arange(n, dtype=np.int64) * rows.stride(0)
                         if isinstance(rows, torch.Tensor)
                         else np.asarray(rows[:n], dtype=np.uint64).view(np.int64))
            host = torch.from_numpy(np.stack([
                addresses, np.asarray(block_ids, dtype=np.int64)]))
            # Pinned by the caching host allocator: kept until the copy is done.
            tables = self._tables[key] = host.pin_memory().to(device, non_blocking=True)
        return tables

    def wait(self, layer: int) -> None:
        """Make the current stream wait for ``layer``'s copies (no host sync)."""
        event = self.events.get(layer)
        if event is not None:
            torch.cuda.current_stream(self.pages.device).wait_event(event)

    def synchronize(self) -> None:
        """Block until every queued copy is done (the step is over: its tables go)."""
        self.stream.synchronize()
        self._tables.clear()


def _aligned(cache: torch.Tensor) -> bool:
    """Whether the kernel can write ``cache``'s pages in 16-byte pieces."""
    raw = cache.view(torch.uint8)
    return (raw.shape[3] // 2) % ALIGN == 0 and raw.data_ptr() % ALIGN == 0 and all(
        s % ALIGN == 0 for s in raw.stride()[:3])


class LayerSaves:
    """One step's saves out of ``pages``' CUDA caches into page-locked host rows, a layer
    at a time. `save_layer` gathers the layer's pages into rows beside the caches on the
    current (compute) stream, as the forward hands the layer over, then queues the copy
    of those rows' layer slices to the host rows on a side stream: one 2-D copy per
    staging run (each row's slice is ``page_bytes`` at a stride of ``block_bytes``), so a
    layer crosses PCIe while the forward computes the next ones. `synchronize` blocks
    until every queued copy is in the host rows (before they are read or reused)."""

    def __init__(self, pages: PageLayout) -> None:
        if pages.device.type != "cuda":
            raise ValueError("LayerSaves is for CUDA caches")
        self.pages = pages
        self.stream = torch.cuda.Stream(device=pages.device)
        # Gathers into device rows that no host copy follows (they are stored from the
        # device): `wait_gathered` makes a stream wait for them, whichever stream ran them.
        self.gathered: list[torch.cuda.Event] = []

    def wait_gathered(self) -> None:
        """Make the current stream wait for every gather `save_layer` queued since the last
        call (before the device rows are read on it)."""
        gathered, self.gathered = self.gathered, []
        stream = torch.cuda.current_stream(self.pages.device)
        for event in gathered:
            stream.wait_event(event)

    def save_layer(self, layer: int, saves: Sequence[tuple[torch.Tensor, torch.Tensor | None,
                                                           Sequence[int]]]) -> None:
        """Gather layer ``layer`` of each ``(device rows, host rows, block ids)`` and queue
        its copy to the host rows (none where the host rows are None: the device rows
        are what is stored)."""
        pages = self.pages
        saves = [(dev, host, ids) for dev, host, ids in saves if len(ids)]
        for dev, _, ids in saves:
            pages.gather_layer(layer, ids, dev)
        if not saves:
            return
        gathered = torch.cuda.Event()
        gathered.record(torch.cuda.current_stream(pages.device))
        saves = [(dev, host, ids) for dev, host, ids in saves if host is not None]
        if not saves:  # the device rows are stored: whoever reads them waits for this
            self.gathered.append(gathered)
            return
        self.stream.wait_event(gathered)
        start = layer * pages.page_bytes
        with torch.cuda.stream(self.stream):
            for dev, host, ids in saves:
                dev.record_stream(self.stream)  # (read here after the compute stream)
                _copy_columns(host, dev, start, pages.page_bytes, len(ids), self.stream)

    def synchronize(self) -> None:
        self.stream.synchronize()


def _copy_columns(host: torch.Tensor, dev: torch.Tensor, start: int, width: int, rows: int,
                  stream: torch.cuda.Stream) -> None:
    """Copy bytes ``[start, start + width)`` of ``rows`` rows of ``dev`` into the same
    bytes of ``host``'s rows, on ``stream``: one strided (2-D) DMA copy with CuPy, else
    torch's copy of the two column views (not contiguous: torch may stage it and wait
    for it on the host)."""
    if host.stride(1) != 1 or dev.stride(1) != 1:
        raise ValueError("rows must be contiguous within each row")
    try:
        import cupy
    except ImportError:
        host[:rows, start:start + width].copy_(dev[:rows, start:start + width],
                                               non_blocking=True)
        return
    runtime = cupy.cuda.runtime
    runtime.memcpy2DAsync(host.data_ptr() + start, host.stride(0), dev.data_ptr() + start,
                          dev.stride(0), width, rows, runtime.memcpyDeviceToHost,
                          stream.cuda_stream)

"""Moving whole pages of a serving engine's paged KV cache to and from a store.

vLLM's connector (`kvstore.integrations.vllm`) is built on this; it imports no vLLM, so
it is tested on its own.

A *page* is one block of one layer, ``kv_caches[layer][block_id]``: whatever the engine's
attention kernel keeps for ``block_size`` tokens of that layer. The bytes are treated as
opaque (vLLM's CPU backend packs K and V inside a page in an ISA-dependent way), so the
stored format only promises a byte-exact round trip into a cache of the same page format;
the connector's namespace names that format. One stored block is a block's pages of every
layer, layer after layer::

    stored block = | page of layer 0 | page of layer 1 | ... | page of layer L-1 |

Where the page format is known, a codec converts each page to and from the layer-major
format of `kvstore.layout` (K then V, each ``[block_tokens, kv_heads, head_dim]``) as it
is stored, so the blocks are those the embedded engines publish and read:

- `KVPageCodec`: vLLM's CPU pages for its ``vec`` ISA, ``[kv_heads, 2 * block_tokens,
  head_dim]`` viewed per head: K transposed (``[head_dim, block_tokens]``), then V
  (``[block_tokens, head_dim]``).
- `KVViewCodec`: vLLM's per-layer *logical views* (vLLM 0.32 on CUDA: FlashAttention,
  FlashInfer, Triton). Each layer's cache is a view ``[blocks, heads, tokens, K|V]``
  (each cell K then V of one head and token), whatever the physical order its
  `KVCacheLayout` gives the axes: the layer may be outermost (LBNHC, LBHNC, LHBNC) or the
  block (BLHNC, BLNHC, BHLNC), pages contiguous or split by head. The codec reads and
  writes through the view's strides, so every layout stores the same bytes, and caches
  of different layouts (and the engines) share blocks. A manager block split into
  kernel blocks (a view with ``R * blocks`` rows) is its ``R`` kernel blocks in order.

A load is all-or-prefix: blocks are fetched in chain order and the first one that is
missing, fails its checksum or cannot be read ends the usable prefix; every block from
there on is reported as failed, never written half.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from kvstore.errors import KVStoreError

log = logging.getLogger(__name__)

# What a store call can raise when the store (a daemon, most often) fails.
STORE_FAILURES = (KVStoreError, OSError, TimeoutError)


class KVPageCodec:
    """vLLM CPU ``vec`` pages <-> `kvstore.layout` layers (see the module docstring)."""

    def __init__(self, num_kv_heads: int, block_tokens: int, head_dim: int) -> None:
        self.num_kv_heads = num_kv_heads
        self.block_tokens = block_tokens
        self.head_dim = head_dim

    def store(self, page: torch.Tensor, out: torch.Tensor) -> None:
        """Write one page (typed) into ``out``, a ``[2, block_tokens, kv_heads, head_dim]``
        view of the staging row: one strided copy each for K and V."""
        h, bs, d = self.num_kv_heads, self.block_tokens, self.head_dim
        p = page.reshape(h, 2 * bs, d)
        out[0].copy_(p[:, :bs].reshape(h, d, bs).permute(2, 0, 1))
        out[1].copy_(p[:, bs:].permute(1, 0, 2))

    def load(self, layer: torch.Tensor, page: torch.Tensor) -> None:
        """Write ``layer`` (``[2, block_tokens, kv_heads, head_dim]``) into one page of the
        cache, in place (``page`` is a contiguous view of it)."""
        h, bs, d = self.num_kv_heads, self.block_tokens, self.head_dim
        p = page.view(h, 2 * bs, d)
        p[:, :bs].view(h, d, bs).copy_(layer[0].permute(1, 2, 0))
        p[:, bs:].copy_(layer[1].permute(1, 0, 2))

    def to_layout(self, pages: torch.Tensor) -> torch.Tensor:
        """``[n, ...]`` typed pages -> ``[n, 2, block_tokens, kv_heads, head_dim]``."""
        out = torch.empty((pages.shape[0], 2, self.block_tokens, self.num_kv_heads,
                           self.head_dim), dtype=pages.dtype, device=pages.device)
        for page, layer in zip(pages, out, strict=True):
            self.store(page, layer)
        return out

    def from_layout(self, layers: torch.Tensor) -> torch.Tensor:
        """``[n, 2, block_tokens, kv_heads, head_dim]`` -> ``[n, kv_heads, 2 * block_tokens,
        head_dim]`` pages."""
        pages = torch.empty((layers.shape[0], self.num_kv_heads, 2 * self.block_tokens,
                             self.head_dim), dtype=layers.dtype, device=layers.device)
        for layer, page in zip(layers, pages, strict=True):
            self.load(layer, page)
        return pages


class KVViewCodec:
    """vLLM's per-layer logical views ``[R * blocks, heads, tokens, K|V]`` (any strides)
    <-> `kvstore.layout` layers (see the module docstring). It works on the views' bytes,
    so any dtype (an fp8 cache too) moves as it is. Gathers and scatters run on the
    cache's device, a layer of many blocks in a few strided copies."""

    def __init__(self, num_kv_heads: int, block_tokens: int, head_dim: int) -> None:
        self.num_kv_heads = num_kv_heads
        self.block_tokens = block_tokens
        self.head_dim = head_dim

    def _blocks(self, cache: torch.Tensor, num_blocks: int) -> torch.Tensor:
        """``cache`` as bytes ``[num_blocks, R, heads, tokens / R, 2 * head_bytes]``."""
        raw = cache.view(torch.uint8)
        return raw.unflatten(0, (num_blocks, raw.shape[0] // num_blocks))

    def check(self, name: str, cache: torch.Tensor, num_blocks: int) -> int:
        """The bytes of one block of ``cache`` (a layer named ``name``); raises
        `ValueError` when it is not a view of ``num_blocks`` blocks of this geometry."""
        shape = tuple(cache.shape)
        if (cache.dim() != 4 or num_blocks <= 0 or shape[0] % num_blocks
                or shape[1] != self.num_kv_heads
                or shape[2] * (shape[0] // num_blocks) != self.block_tokens
                or shape[3] != 2 * self.head_dim or cache.stride(3) != 1):
            raise ValueError(
                f"KV cache {name!r} of shape {shape} (strides {cache.stride()}) is not a "
                f"view [blocks, {self.num_kv_heads} heads, tokens, K|V of {self.head_dim}] "
                f"of {num_blocks} blocks of {self.block_tokens} tokens")
        return cache[0].numel() * (shape[0] // num_blocks) * cache.element_size()

    def gather(self, cache: torch.Tensor, num_blocks: int, block_ids: Sequence[int],
               out: torch.Tensor) -> None:
        """Layer pages ``block_ids`` of ``cache`` (a view of ``num_blocks`` blocks) into
        ``out``'s byte rows (their slice of this layer, ``[n, layer_bytes]``, any
        device)."""
        index = torch.as_tensor(block_ids, dtype=torch.long, device=cache.device)
        picked = self._blocks(cache, num_blocks).index_select(0, index)  # contiguous
        n, r, heads, tokens, cell = picked.shape
        half = cell // 2
        layers = torch.empty((n, 2, r, tokens, heads, half), dtype=torch.uint8,
                             device=cache.device)  # K then V, each [r * tokens, heads, h]
        layers[:, 0].copy_(picked[..., :half].permute(0, 1, 3, 2, 4))
        layers[:, 1].copy_(picked[..., half:].permute(0, 1, 3, 2, 4))
        out.copy_(layers.view(n, -1))

    def scatter(self, cache: torch.Tensor, num_blocks: int, rows: torch.Tensor,
                block_ids: Sequence[int]) -> None:
        """``rows`` (this layer's byte slice of stored blocks, ``[n, layer_bytes]``) into
        the pages ``block_ids`` of ``cache`` (a view of ``num_blocks`` blocks)."""
        blocks = self._blocks(cache, num_blocks)
        _, r, heads, tokens, cell = blocks.shape
        n, half = len(block_ids), cell // 2
        layers = rows.to(cache.device).reshape(n, 2, r, tokens, heads, half)
        pages = torch.empty((n, r, heads, tokens, cell), dtype=torch.uint8,
                            device=cache.device)
        pages[..., :half].copy_(layers[:, 0].permute(0, 1, 3, 2, 4))
        pages[..., half:].copy_(layers[:, 1].permute(0, 1, 3, 2, 4))
        index = torch.as_tensor(block_ids, dtype=torch.long, device=cache.device)
        blocks.index_copy_(0, index, pages)


class PageLayout:
    """The page geometry of an engine's registered caches, one tensor per layer.

    Without a codec, or with `KVPageCodec`, every layer's tensor must have the blocks on
    dim 0 and hold each block's page contiguously; with `KVViewCodec` each is a logical
    view of ``num_blocks`` blocks (any strides). Layers keep the mapping's order.
    """

    def __init__(self, kv_caches: Mapping[str, torch.Tensor],
                 codec: KVPageCodec | KVViewCodec | None = None, *,
                 num_blocks: int | None = None) -> None:
        if not kv_caches:
            raise ValueError("no KV cache tensors were registered")
        self.layer_names = list(kv_caches)
        self.caches = [kv_caches[name] for name in self.layer_names]
        first = self.caches[0]
        self.num_blocks = first.shape[0] if num_blocks is None else num_blocks
        self.codec = codec
        if isinstance(codec, KVViewCodec):
            sizes = {codec.check(name, cache, self.num_blocks)
                     for name, cache in zip(self.layer_names, self.caches, strict=True)}
            if len(sizes) != 1:
                raise ValueError(f"KV cache layers differ in page size: {sorted(sizes)}")
            self.page_bytes = sizes.pop()
        else:
            self.page_bytes = first[0].numel() * first.element_size()
            for name, cache in zip(self.layer_names, self.caches, strict=True):
                page = cache[0]
                if (cache.shape[0] != self.num_blocks or not page.is_contiguous()
                        or page.numel() * page.element_size() != self.page_bytes):
                    raise ValueError(f"KV cache {name!r} of shape {tuple(cache.shape)} does "
                                     f"not hold {self.num_blocks} contiguous pages of "
                                     f"{self.page_bytes} bytes")
            if codec is not None and (2 * codec.num_kv_heads * codec.block_tokens
                                      * codec.head_dim * first.element_size()
                                      != self.page_bytes):
                raise ValueError(f"pages of {self.page_bytes} bytes are not K and V of "
                                 f"{codec.block_tokens} tokens x {codec.num_kv_heads} "
                                 f"heads x {codec.head_dim}")
        self.block_bytes = self.page_bytes * len(self.caches)
        self._index = {name: i for i, name in enumerate(self.layer_names)}
        self.device = first.device
        self._buffers: dict[str, torch.Tensor] = {}

    def layer_index(self, layer_name: str) -> int | None:
        return self._index.get(layer_name)

    def pages(self, layer: int) -> torch.Tensor:
        """Layer ``layer``'s cache as ``[num_blocks, page_bytes]`` bytes (a view)."""
        cache = self.caches[layer]
        return cache.view(cache.shape[0], -1).view(torch.uint8)

    def staging(self, num_blocks: int, *, on_device: bool = False) -> torch.Tensor:
        """Memory for ``num_blocks`` stored blocks, ``[num_blocks, block_bytes]``: on the
        host (page-locked when the caches are on a GPU: a kernel reads it in place), or
        (``on_device``) beside the caches."""
        shape = (num_blocks, self.block_bytes)
        if on_device:
            return torch.empty(shape, dtype=torch.uint8, device=self.device)
        return torch.empty(shape, dtype=torch.uint8, pin_memory=self.device.type == "cuda")

    def reused_staging(self, purpose: str, num_blocks: int, *, on_device: bool = False
                       ) -> torch.Tensor:
        """`staging` kept per ``purpose`` and grown as needed: its pages stay faulted in
        (first touches of fresh memory cost as much as the copy itself). The rows are valid
        until the next call with the same purpose."""
        buf = self._buffers.get(purpose)
        if buf is None or buf.shape[0] < num_blocks:
            buf = self._buffers[purpose] = self.staging(max(num_blocks, 2 * (
                0 if buf is None else buf.shape[0])), on_device=on_device)
        return buf[:num_blocks]

    def staging_for(self, purpose: str, transfers: Sequence[Any], *, on_device: bool = False
                    ) -> list[torch.Tensor]:
        """`reused_staging` split into one run of rows per transfer (anything with
        ``keys``: one row per key)."""
        rows = self.reused_staging(purpose, sum(len(t.keys) for t in transfers),
                                   on_device=on_device)
        parts, first = [], 0
        for transfer in transfers:
            parts.append(rows[first:first + len(transfer.keys)])
            first += len(transfer.keys)
        return parts

    def gather_layer(self, layer: int, block_ids: Sequence[int], out: torch.Tensor) -> None:
        """Copy layer ``layer``'s pages of ``block_ids`` into its slice of ``out``'s rows."""
        start = layer * self.page_bytes
        dst = out[:len(block_ids), start:start + self.page_bytes]
        if isinstance(self.codec, KVViewCodec):
            self.codec.gather(self.caches[layer], self.num_blocks, block_ids, dst)
            return
        if self.codec is None:
            index = torch.as_tensor(block_ids, dtype=torch.long, device=self.device)
            dst.copy_(self.pages(layer).index_select(0, index))
            return
        cache = self.caches[layer]
        for block_id, row in zip(block_ids, self._typed(dst, cache.dtype), strict=True):
            self.codec.store(cache[block_id], row)

    def scatter_layer(self, layer: int, src: torch.Tensor, block_ids: Sequence[int]) -> None:
        """Write layer ``layer``'s slice of ``src``'s rows into the pages ``block_ids``."""
        start = layer * self.page_bytes
        rows = src[:len(block_ids), start:start + self.page_bytes]
        if isinstance(self.codec, KVViewCodec):
            self.codec.scatter(self.caches[layer], self.num_blocks, rows, block_ids)
            return
        if self.codec is not None:
            cache = self.caches[layer]
            for block_id, row in zip(block_ids, self._typed(rows, cache.dtype), strict=True):
                self.codec.load(row, cache[block_id])
            return
        pages = self.pages(layer)
        for row, block_id in zip(rows, block_ids, strict=True):
            pages[block_id].copy_(row)  # a page at a time: index_copy_ on bytes is 10x slower

    def _typed(self, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Byte rows of one layer as ``[n, 2, block_tokens, kv_heads, head_dim]`` (a view)."""
        codec = self.codec
        assert codec is not None
        return rows.view(dtype).view(rows.shape[0], 2, codec.block_tokens,
                                     codec.num_kv_heads, codec.head_dim)


OnFailure = Callable[[BaseException], None]


def _store_down(error: BaseException, on_failure: OnFailure | None) -> None:
    """Tell ``on_failure`` when the store itself failed (not one bad value)."""
    if on_failure is not None and not isinstance(error, ValueError):
        on_failure(error)


def fetch_blocks(store: Any, keys: Sequence[bytes], out: torch.Tensor, *,
                 on_failure: OnFailure | None = None) -> int:
    """Read ``keys`` into ``out``'s rows in order; returns how many leading blocks arrived
    whole (each verified by the store's checksum). A failure ends the prefix there; a
    failure of the store (not of one value, e.g. of the wrong size) goes to
    ``on_failure``."""
    batch = getattr(store, "get_many_into", None)
    if batch is not None:
        try:
            return int(batch(list(keys), [out[i] for i in range(len(keys))]))
        except STORE_FAILURES as e:  # one bad block fails the batch: find the good prefix
            log.info("kvstore: batch read of %d blocks failed (%s); reading one by one",
                     len(keys), e)
    num_done = 0
    try:
        for i, key in enumerate(keys):
            if not store.get_into(key, out[i]):
                break
            num_done += 1
    except STORE_FAILURES as e:
        log.warning("kvstore: reading %d blocks failed after %d: %s", len(keys), num_done, e)
        _store_down(e, on_failure)
    return num_done


def store_blocks(store: Any, keys: Sequence[bytes], blocks: torch.Tensor, *,
                 on_failure: OnFailure | None = None) -> int:
    """``put_many`` of ``blocks``' rows under ``keys`` (one chain, parent first); returns
    how many were stored (0 when the store failed, which goes to ``on_failure``)."""
    try:
        return int(store.put_many(list(keys), [blocks[i] for i in range(len(keys))]))
    except STORE_FAILURES as e:
        log.warning("kvstore: storing %d blocks failed: %s", len(keys), e)
        _store_down(e, on_failure)
        return 0

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

Where the page format is known, a `KVPageCodec` converts each page to and from the
layer-major format of `kvstore.layout` (K then V, each ``[block_tokens, kv_heads,
head_dim]``) as it is stored, so the blocks are those the embedded engines publish and
read. vLLM's CPU pages for its ``vec`` ISA are ``[kv_heads, 2 * block_tokens, head_dim]``
viewed per head: K transposed (``[head_dim, block_tokens]``), then V (``[block_tokens,
head_dim]``).

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


class PageLayout:
    """The page geometry of an engine's registered caches, one tensor per layer.

    Every layer's tensor must have the blocks on dim 0 and hold each block's page
    contiguously (vLLM's layouts do); layers keep the mapping's order.
    """

    def __init__(self, kv_caches: Mapping[str, torch.Tensor],
                 codec: KVPageCodec | None = None) -> None:
        if not kv_caches:
            raise ValueError("no KV cache tensors were registered")
        self.layer_names = list(kv_caches)
        self.caches = [kv_caches[name] for name in self.layer_names]
        first = self.caches[0]
        self.num_blocks = first.shape[0]
        self.page_bytes = first[0].numel() * first.element_size()
        for name, cache in zip(self.layer_names, self.caches, strict=True):
            page = cache[0]
            if (cache.shape[0] != self.num_blocks or not page.is_contiguous()
                    or page.numel() * page.element_size() != self.page_bytes):
                raise ValueError(f"KV cache {name!r} of shape {tuple(cache.shape)} does not "
                                 f"hold {self.num_blocks} contiguous pages of "
                                 f"{self.page_bytes} bytes")
        self.block_bytes = self.page_bytes * len(self.caches)
        self._index = {name: i for i, name in enumerate(self.layer_names)}
        self.device = first.device
        self.codec = codec
        if codec is not None and (2 * codec.num_kv_heads * codec.block_tokens * codec.head_dim
                                  * first.element_size() != self.page_bytes):
            raise ValueError(f"pages of {self.page_bytes} bytes are not K and V of "
                             f"{codec.block_tokens} tokens x {codec.num_kv_heads} heads x "
                             f"{codec.head_dim}")
        self._buffers: dict[str, torch.Tensor] = {}

    def layer_index(self, layer_name: str) -> int | None:
        return self._index.get(layer_name)

    def pages(self, layer: int) -> torch.Tensor:
        """Layer ``layer``'s cache as ``[num_blocks, page_bytes]`` bytes (a view)."""
        cache = self.caches[layer]
        return cache.view(cache.shape[0], -1).view(torch.uint8)

    def staging(self, num_blocks: int) -> torch.Tensor:
        """Host memory for ``num_blocks`` stored blocks, ``[num_blocks, block_bytes]``."""
        return torch.empty((num_blocks, self.block_bytes), dtype=torch.uint8)

    def reused_staging(self, purpose: str, num_blocks: int) -> torch.Tensor:
        """`staging` kept per ``purpose`` and grown as needed: its pages stay faulted in
        (first touches of fresh memory cost as much as the copy itself). The rows are valid
        until the next call with the same purpose."""
        buf = self._buffers.get(purpose)
        if buf is None or buf.shape[0] < num_blocks:
            buf = self._buffers[purpose] = self.staging(max(num_blocks, 2 * (
                0 if buf is None else buf.shape[0])))
        return buf[:num_blocks]

    def staging_for(self, purpose: str, transfers: Sequence[Any]) -> list[torch.Tensor]:
        """`reused_staging` split into one run of rows per transfer (anything with
        ``keys``: one row per key)."""
        rows = self.reused_staging(purpose, sum(len(t.keys) for t in transfers))
        parts, first = [], 0
        for transfer in transfers:
            parts.append(rows[first:first + len(transfer.keys)])
            first += len(transfer.keys)
        return parts

    def gather_layer(self, layer: int, block_ids: Sequence[int], out: torch.Tensor) -> None:
        """Copy layer ``layer``'s pages of ``block_ids`` into its slice of ``out``'s rows."""
        start = layer * self.page_bytes
        dst = out[:len(block_ids), start:start + self.page_bytes]
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

"""Moving KV between an engine's paged cache and a store, block by block, layer by layer.

A store block is one page of the cache across every layer, in `kvstore.layout`'s
layer-major format; its key is `kvstore.prefix_hashes` of the tokens up to and including
it, in a namespace naming the model (with a digest of its weights), the layout and the
dtype. The store handle is anything with the Store API: an embedded `kvstore.Store` or a
daemon client.

Publishing (prefill)::

    layer i computed --after_layer(i)--> layer i of the new pages is copied into the
    staging blocks (on a GPU: queued behind layer i on the device; on the CPU: by the
    worker thread, overlapping layer i+1's compute) --last layer--> put_many

Fetching (decode, and prefill reusing a cached prefix)::

    GPU, blocks in the store's DRAM or HBM: borrow them (pinned, zero copy) -> one kernel
    per layer reads them in place and writes that layer's pages (`engines.uva_copy`), on
    a side stream; before_layer(i) makes compute wait for layer i's copy only
    otherwise (CPU, NVMe, a daemon): get_many_into staging on the cache's device (a
    missing or corrupt block ends the usable prefix there) -> worker copies layer i into
    the pages; before_layer(i) waits for it

Failure is never wrong output: a store error or a missing/corrupt block shortens the
cached prefix (the rest is recomputed); a block is only used once all of its bytes arrived
and the store verified its checksum.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from engines import uva_copy
from engines.model import LlamaModel
from engines.paged_cache import PagedKVCache, SequenceKV, to_device
from kvstore.errors import KVStoreError
from kvstore.keys import prefix_hashes

log = logging.getLogger(__name__)


class CacheFullError(KVStoreError):
    """An engine's paged cache has no room for a request."""


def usable_prefix_blocks(num_cached_blocks: int, num_tokens: int, block_tokens: int) -> int:
    """How many cached blocks to use when ``num_tokens`` tokens must run: at least one token
    has to be computed to get logits, so a fully cached prompt recomputes its last block."""
    return min(num_cached_blocks, (num_tokens - 1) // block_tokens)


class KVBlockIO:
    """The store side of one engine: keys, fetches into its cache, publishes from it."""

    def __init__(self, model: LlamaModel, cache: PagedKVCache, store: Any) -> None:
        self.model = model
        self.cache = cache
        self.store = store
        self.block_tokens = cache.page_tokens
        self.layout = model.config.kv_layout(cache.page_tokens, cache.dtype)
        self.namespace = self.layout.namespace(model.model_id)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-io")
        self._staging: dict[str, torch.Tensor] = {}

    def keys(self, tokens: Sequence[int]) -> list[bytes]:
        return prefix_hashes(list(tokens), block_tokens=self.block_tokens,
                             namespace=self.namespace)

    def cached_blocks(self, keys: Sequence[bytes], *, probe: bool = False) -> int:
        """Leading blocks of ``keys`` the store holds (0 if it cannot be reached). ``probe``:
        a routing question, not a request (a daemon does not log or count it)."""
        if not keys:
            return 0
        try:
            return self.store.match_prefix(keys, probe=probe)
        except KVStoreError as e:
            log.warning("match_prefix failed (%s); computing without the store", e)
            return 0

    def close(self) -> None:
        self._worker.shutdown(wait=True)

    # -- staging ---------------------------------------------------------------------------

    def _blocks(self, purpose: str, num_blocks: int) -> torch.Tensor:
        """Staging for ``num_blocks`` blocks, ``[n, layers, 2, tokens, heads, dim]``, on the
        cache's device: one buffer per purpose ("fetch", "publish"), reused across
        requests, grown on demand. On a GPU the store copies each block straight in (one
        DMA of a whole block: small per-layer DMAs crawl, see DESIGN.md) and the per-layer
        scatter into the pages runs on the device."""
        cache, config = self.cache, self.model.config
        staging = self._staging.get(purpose)
        if staging is None or staging.shape[0] < num_blocks:
            self._staging.pop(purpose, None)  # free the old one before the new one
            shape = (max(num_blocks, 16), config.num_layers, 2, self.block_tokens,
                     config.num_kv_heads, config.head_dim)
            staging = torch.empty(shape, dtype=cache.dtype, device=cache.device)
            self._staging[purpose] = staging
        return staging[:num_blocks]

    # -- fetch -----------------------------------------------------------------------------

    def fetch(self, keys: Sequence[bytes], seq: SequenceKV) -> LayerLoad:
        """Start moving ``keys`` (leading blocks of ``seq``) from the store into ``seq``'s
        first pages. The load's ``num_blocks`` is how many are coming, whole; call its
        ``wait(layer)`` before layer ``layer`` reads the cache and `LayerLoad.wait_all`
        once the forward is done (it releases what the load borrowed from the store)."""
        load = LayerLoad(self)
        if (self.cache.device.type == "cuda" and hasattr(self.store, "borrow")
                and uva_copy.available()):
            load.borrow(keys, seq.pages)  # blocks in memory tiers, read in place
        rest = keys[load.num_blocks:]
        if not rest:
            return load
        staging = self._blocks("fetch", len(rest))
        num_staged = 0
        batch = getattr(self.store, "get_many_into", None)
        try:
            if batch is not None:  # one pin-copy-unpin pass, copies in flight together
                num_staged = batch(rest, list(staging))
            else:
                for i, key in enumerate(rest):
                    if not self.store.get_into(key, staging[i]):
                        break  # evicted, deleted or failed its checksum since match_prefix
                    num_staged += 1
        except KVStoreError as e:
            log.warning("fetching %d blocks failed after %d (%s); recomputing from there",
                        len(keys), load.num_blocks + num_staged, e)
        first = load.num_blocks
        load.stage(staging[:num_staged], seq.pages[first:first + num_staged])
        return load

    # -- publish ---------------------------------------------------------------------------

    def publisher(self, keys: Sequence[bytes], seq: SequenceKV, first_block: int) -> Publisher:
        """A publisher of blocks ``[first_block, len(keys))`` of ``seq``: feed it each layer
        as the layer finishes (``after_layer``), then `finish` stores them."""
        return Publisher(self, keys, seq, first_block)


class LayerLoad:
    """One fetch in flight: blocks borrowed from the store and copied by the UVA kernel
    (GPU), then blocks staged by `get_many_into` and copied by the worker."""

    def __init__(self, io: KVBlockIO) -> None:
        self.io = io
        self.num_blocks = 0
        self._copier: uva_copy.LayerCopier | None = None
        self._borrow: Any = None  # the store's borrow context, exited by wait_all
        self._borrowed: Any = None
        self._staged: list[Future[None]] = []

    def borrow(self, keys: Sequence[bytes], pages: list[int]) -> None:
        """Borrow the leading blocks held in memory tiers and launch their copies."""
        io = self.io
        try:
            self._borrow = io.store.borrow(keys)
            self._borrowed = self._borrow.__enter__()
            addresses = self._borrowed.addresses
            if addresses:
                self._copier = uva_copy.LayerCopier(
                    io.cache, addresses, pages[:len(addresses)],
                    io.layout.layer_bytes, io.layout.kv_bytes)
                self._copier.launch()
                self.num_blocks = len(addresses)
        except (KVStoreError, ValueError) as e:
            log.warning("borrowing %d blocks failed (%s); copying them instead", len(keys), e)
            self._release()
            self._copier, self.num_blocks = None, 0

    def stage(self, blocks: torch.Tensor, pages: list[int]) -> None:
        """Copy blocks fetched into staging to ``pages``, layer by layer, on the worker."""
        if not pages:
            return
        cache = self.io.cache
        index = to_device(pages, cache.device)
        self._staged = [self.io._worker.submit(_load_layer, cache, layer, index, blocks)
                        for layer in range(len(cache.kv))]
        self.num_blocks += len(pages)

    def wait(self, layer: int) -> None:
        if self._copier is not None:
            self._copier.wait(layer)
        if self._staged:
            self._staged[layer].result()

    def wait_all(self) -> None:
        """Finish every copy and give back what was borrowed. Raises `KVStoreError` if a
        borrowed block's pin expired before its copy was done (then nothing it fed may be
        used: the caller fails the request rather than emit tokens computed from it)."""
        for done in self._staged:
            done.result()
        if self._copier is not None:
            self._copier.synchronize()
        self._release()
        if self._borrowed is not None and self._borrowed.intact is False:
            raise KVStoreError("a borrowed KV block's pin expired mid-copy")

    def _release(self) -> None:
        if self._borrow is not None:
            borrow, self._borrow = self._borrow, None
            borrow.__exit__(None, None, None)


def _load_layer(cache: PagedKVCache, layer: int, index: torch.Tensor,
                blocks: torch.Tensor) -> None:
    # blocks: [n, layers, 2, tokens, heads, dim] -> this layer's [2, n, tokens, heads, dim]
    cache.kv[layer].index_copy_(1, index, blocks[:, layer].transpose(0, 1))


class Publisher:
    def __init__(self, io: KVBlockIO, keys: Sequence[bytes], seq: SequenceKV,
                 first_block: int) -> None:
        self.io = io
        self.keys = list(keys[first_block:])
        self.first_block = first_block
        self._pages = seq.pages[first_block:len(keys)]
        self._staging = io._blocks("publish", len(self._pages)) if self._pages else None
        self._index = to_device(self._pages, io.cache.device) if self._pages else None
        self._copies: list[Future[None]] = []

    def after_layer(self, layer: int) -> None:
        if not self._pages:
            return
        cache = self.io.cache
        if cache.device.type == "cuda":  # queued on the GPU after the layer: no thread
            _save_layer(cache, layer, self._index, self._staging, non_blocking=True)
            return
        self._copies.append(self.io._worker.submit(
            _save_layer, cache, layer, self._index, self._staging))

    def finish(self) -> int:
        """Wait for the layer copies and store the blocks; returns how many were stored."""
        for copy in self._copies:
            copy.result()
        if not self._pages:
            return 0
        if self.io.cache.device.type == "cuda":
            torch.cuda.current_stream(self.io.cache.device).synchronize()
        else:
            assert len(self._copies) == len(self.io.cache.kv), "publish before every layer ran"
        try:
            return self.io.store.put_many(self.keys, list(self._staging))
        except KVStoreError as e:
            log.warning("publishing %d blocks failed: %s", len(self.keys), e)
            return 0


def _save_layer(cache: PagedKVCache, layer: int, index: torch.Tensor,
                staging: torch.Tensor, non_blocking: bool = False) -> None:
    layer_kv = cache.kv[layer].index_select(1, index)  # [2, n, tokens, heads, dim]
    staging[:, layer].copy_(layer_kv.transpose(0, 1), non_blocking=non_blocking)

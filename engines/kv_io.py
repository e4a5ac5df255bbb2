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

A borrowed fetch goes in parts of growing size (`part_ends`), so that the GPU copies the
first blocks while the host still hashes, looks up, borrows and launches the rest (8K
tokens of llama3-8b on the H100: the first copy starts 0.5-0.6 ms into the fetch instead
of 2.1-3.0 ms in one piece, and the last ends ~2 ms sooner)::

    host  | hash+match+borrow+launch 16 | ... 64 | ... the remaining 431, layer by layer |
    GPU          | copy part 1 (all layers) | copy part 2 | copy layer 0 | 1 | ... | 31 |
    forward                                              | layer 0 | 1 |    ...   | 31 |

Every part's copies go on one side stream, so they complete in order: the event after the
last part's layer i also marks every earlier part done, and before_layer(i) waits for it
alone. The parts before the last need no per-layer events (the forward's first layer
waits for them whole) and go in one launch each. A part the store cannot lend in full (a
block missing, only on NVMe, or a failed borrow) is the last borrowed: the blocks after
it go by staging.

Failure is never wrong output: a store error or a missing/corrupt block shortens the
cached prefix (the rest is recomputed); a block is only used once all of its bytes arrived
and the store verified its checksum.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from engines import uva_copy
from engines.model import LlamaModel
from engines.paged_cache import PagedKVCache, SequenceKV, to_device
from kvstore.codec import codec_for
from kvstore.errors import KVStoreError
from kvstore.keys import prefix_hashes

if TYPE_CHECKING:
    from engines.fetch_plan import FetchPlan, FetchPlanner, LoadCutoff

log = logging.getLogger(__name__)


class CacheFullError(KVStoreError):
    """An engine's paged cache has no room for a request."""


# A borrowed fetch's first part, and how much each part grows on the one before: a part's
# host work (hash, look up, borrow, build the copy's tables: ~5-7 us a block on the H100's
# host) has to fit in the previous part's copy (~44 us a block at 47 GB/s), with room for
# each part's fixed cost (a launch, an event, a table upload).
FIRST_PART_BLOCKS = 16
PART_GROWTH = 4


def usable_prefix_blocks(num_cached_blocks: int, num_tokens: int, block_tokens: int) -> int:
    """How many cached blocks to use when ``num_tokens`` tokens must run: at least one token
    has to be computed to get logits, so a fully cached prompt recomputes its last block."""
    return min(num_cached_blocks, fetchable_blocks(num_tokens, block_tokens))


def fetchable_blocks(num_tokens: int, block_tokens: int) -> int:
    """The most blocks of a cached prefix that ``num_tokens`` tokens can use."""
    return (num_tokens - 1) // block_tokens


def part_ends(num_blocks: int) -> list[int]:
    """Where the parts of a borrowed fetch of ``num_blocks`` blocks end: `FIRST_PART_BLOCKS`,
    then each `PART_GROWTH` times the one before, the rest in the last part; a rest smaller
    than the part before it joins that part (the last part, copied layer by layer, is the
    one the forward overlaps, so it should be the largest)."""
    ends: list[int] = []
    end, size = 0, FIRST_PART_BLOCKS
    while end + size < num_blocks:
        end += size
        ends.append(end)
        size *= PART_GROWTH
    if ends and num_blocks - end < size // PART_GROWTH:
        ends.pop()
    return [*ends, num_blocks] if num_blocks > 0 else []


@dataclass
class PrefixFetch:
    """What `KVBlockIO.fetch_prefix` found and started."""

    keys: list[bytes]  # one per full block of the tokens
    num_stored_blocks: int  # leading keys held in some tier of the store
    load: LayerLoad  # the first load.num_blocks of them, on their way into the pages
    # With a planner: its plan, and the load of blocks [plan.compute_end, plan.load_end)
    # running in the background while the blocks before them are computed (None: none).
    plan: FetchPlan | None = None
    middle: LayerLoad | None = None


class BlockKeys:
    """An engine's blocks as its store knows them: their keys (`kvstore.prefix_hashes` in
    the engine's namespace) and how many leading ones the store holds, in which tiers. What
    a router needs of an engine; `KVBlockIO` adds the moving of bytes."""

    def __init__(self, store: Any, namespace: str, block_tokens: int) -> None:
        self.store = store
        self.namespace = namespace
        self.block_tokens = block_tokens

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

    def tier_bits(self, keys: Sequence[bytes]) -> list[int] | None:
        """Each key's residency bits in the store (`kvstore.tiers.base.TIER_BIT`; 0: not
        held), or None where the store cannot tell (a daemon client) or fails."""
        ask = getattr(self.store, "tier_bits", None)
        if ask is None:
            return None
        try:
            return ask(keys)
        except KVStoreError as e:
            log.warning("tier_bits failed (%s); fetching without a plan", e)
            return None


class KVBlockIO(BlockKeys):
    """The store side of one engine: keys, fetches into its cache, publishes from it."""

    def __init__(self, model: LlamaModel, cache: PagedKVCache, store: Any, *,
                 codec: str | None = None) -> None:
        """``codec``: store blocks compressed (`kvstore.codec`: ``"fp8"``), in a namespace
        of their own; None or ``"none"``: as the pages hold them."""
        self.model = model
        self.cache = cache
        self.layout = model.config.kv_layout(cache.page_tokens, cache.dtype)
        self.codec = codec_for(codec, self.layout)
        super().__init__(store, self.layout.namespace(
            model.model_id, codec=self.codec.name if self.codec is not None else None),
            cache.page_tokens)
        # What one block takes in the store.
        self.stored_block_bytes = (self.codec.block_bytes if self.codec is not None
                                   else self.layout.block_bytes)
        self.fp8_chunks = (uva_copy.Fp8Chunks(self.codec.chunk_bytes, self.codec.payload_bytes,
                                              self.codec.num_scales, self.layout.head_dim)
                           if self.codec is not None else None)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-io")
        # Planned loads that run while the blocks before them are computed, on one side
        # stream of their own (created on first use): the store's copies into staging
        # must not queue behind the forward on the compute stream, and staging memory
        # freed on this stream is what the caching allocator reuses for the next load
        # (a new stream per load would draw from torch's pool of streams in turn).
        self._fetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-fetch")
        self._fetch_stream: torch.cuda.Stream | None = None

    def close(self) -> None:
        self._fetcher.shutdown(wait=True)
        self._worker.shutdown(wait=True)

    # -- staging ---------------------------------------------------------------------------

    def _blocks(self, num_blocks: int) -> torch.Tensor:
        """Staging for ``num_blocks`` blocks, ``[n, layers, 2, tokens, heads, dim]``, on the
        cache's device: one per fetch or publish, never shared (several requests of one
        decode step fetch and publish at once, their layer copies still queued on the
        worker when the next one fills its staging). On a GPU the store copies each block
        straight in (one DMA of a whole block: small per-layer DMAs crawl, see DESIGN.md)
        and the per-layer scatter into the pages runs on the device."""
        config = self.model.config
        shape = (num_blocks, config.num_layers, 2, self.block_tokens, config.num_kv_heads,
                 config.head_dim)
        return torch.empty(shape, dtype=self.cache.dtype, device=self.cache.device)

    # -- fetch -----------------------------------------------------------------------------

    def fetch_prefix(self, tokens: Sequence[int], seq: SequenceKV, *, max_blocks: int,
                     probe: bool = False, planner: FetchPlanner | None = None,
                     overlap: bool = True) -> PrefixFetch:
        """Key ``tokens``' full blocks, find how many leading ones the store holds, and start
        loading at most ``max_blocks`` of those into ``seq``'s first pages (the load as in
        `fetch`). ``probe`` as in `cached_blocks`. Where the store lends blocks in place,
        each part (`part_ends`) is hashed, looked up and launched before the next is
        hashed; otherwise the whole prompt is hashed and looked up at once.

        With a ``planner``, the blocks the store could not lend (those in a slower tier,
        or all of them where it lends none) are planned (`engines.fetch_plan`): the
        returned fetch's ``load`` holds the head to load first, and its ``middle`` the
        blocks to load in the background while the caller computes those between (never,
        without ``overlap``: then the plan only says how many leading blocks to load)."""
        tokens = list(tokens)
        keys: list[bytes] = []
        num_stored = 0
        load = LayerLoad(self, seq)
        try:
            if self._can_borrow():
                for end, is_last in load.parts(min(len(tokens) // self.block_tokens,
                                                   max_blocks)):
                    part = self._extend_keys(keys, tokens, end)
                    found = self.cached_blocks(part, probe=probe)
                    num_stored += found
                    is_last = is_last or found < len(part)
                    if not load.borrow(part[:found], is_last=is_last) or is_last:
                        break
            num_looked_up = len(keys)
            rest = self._extend_keys(keys, tokens, None)
            if num_stored == num_looked_up:  # no miss yet: look up the rest
                num_stored += self.cached_blocks(rest, probe=probe)
            end = min(num_stored, max_blocks)
            plan = self._plan(planner, len(tokens), keys, load.num_blocks, end, overlap)
            if plan is None:
                load.stage(keys[load.num_blocks:end])
                return PrefixFetch(keys, num_stored, load)
            assert planner is not None
            head = planner.cutoff(plan, first_block=load.num_blocks,
                                  num_blocks=plan.head_load_end - load.num_blocks)
            load.stage(keys[load.num_blocks:plan.head_load_end], cutoff=head,
                       observe=planner.observer(plan, head=True))
            if load.num_blocks < plan.head_load_end and head.cut_at is None:
                return PrefixFetch(keys, num_stored, load, plan)  # a miss: no middle
            middle = None
            if plan.load_end > plan.compute_end:
                middle = LayerLoad(self, seq, first_page=plan.compute_end)
                middle.stage_in_background(
                    keys[plan.compute_end:plan.load_end], observe=planner.observer(plan),
                    cutoff=planner.cutoff(plan, first_block=plan.compute_end,
                                          num_blocks=plan.load_end - plan.compute_end,
                                          overlapped=True, computed_from=load.num_blocks))
            return PrefixFetch(keys, num_stored, load, plan, middle)
        except BaseException:
            load.release()
            raise

    def _plan(self, planner: FetchPlanner | None, num_tokens: int, keys: list[bytes],
              num_loading: int, end: int, overlap: bool) -> FetchPlan | None:
        """The plan for blocks ``[num_loading, end)`` (those before are loading already),
        or None: no planner, nothing to plan, or a store that cannot tell tiers."""
        if planner is None or end <= num_loading:
            return None
        bits = self.tier_bits(keys[num_loading:end])
        if bits is None:
            return None
        plan = planner.plan(num_tokens, bits, lent=num_loading, overlap=overlap)
        log.debug("fetch plan: %s", plan.describe())
        return plan

    def fetch(self, keys: Sequence[bytes], seq: SequenceKV) -> LayerLoad:
        """Start moving ``keys`` (leading blocks of ``seq``) from the store into ``seq``'s
        first pages. The load's ``num_blocks`` is how many are coming, whole; call its
        ``wait(layer)`` before layer ``layer`` reads the cache and `LayerLoad.wait_all`
        once the forward is done (it releases what the load borrowed from the store)."""
        load = LayerLoad(self, seq)
        try:
            if self._can_borrow():
                for end, is_last in load.parts(len(keys)):
                    if not load.borrow(keys[load.num_blocks:end], is_last=is_last):
                        break
            load.stage(keys[load.num_blocks:])
        except BaseException:
            load.release()
            raise
        return load

    def _can_borrow(self) -> bool:
        """Whether fetched blocks can be read in place: an embedded store (which lends its
        slots), a GPU cache the copy kernel runs on, and blocks stored as the pages hold
        them or by the fp8 codec into bf16 pages (the kernel dequantizes as it copies;
        other compressed blocks are staged, then decoded on the cache's device)."""
        if self.cache.device.type != "cuda" or not hasattr(self.store, "borrow"):
            return False
        if self.codec is None:
            return uva_copy.available()
        return self.cache.dtype == torch.bfloat16 and uva_copy.fp8_available()

    def _extend_keys(self, keys: list[bytes], tokens: list[int], num_blocks: int | None
                     ) -> list[bytes]:
        """Append the keys of ``tokens``' blocks from ``len(keys)`` up to ``num_blocks``
        (None: to the end, validating the partial tail too) to ``keys``; return them."""
        start = len(keys) * self.block_tokens
        end = None if num_blocks is None else num_blocks * self.block_tokens
        new = prefix_hashes(tokens[start:end], block_tokens=self.block_tokens,
                            namespace=self.namespace, parent=keys[-1] if keys else None)
        keys += new
        return new

    # -- publish ---------------------------------------------------------------------------

    def publisher(self, keys: Sequence[bytes], seq: SequenceKV, first_block: int) -> Publisher:
        """A publisher of blocks ``[first_block, len(keys))`` of ``seq``: feed it each layer
        as the layer finishes (``after_layer``), then `finish` stores them."""
        return Publisher(self, keys, seq, first_block)


class LayerLoad:
    """One fetch in flight into ``seq``'s first pages: parts borrowed from the store and
    copied by the UVA kernel (GPU), then blocks staged by `get_many_into` and copied by
    the worker."""

    def __init__(self, io: KVBlockIO, seq: SequenceKV, *, first_page: int = 0) -> None:
        self.io = io
        self.seq = seq
        self.first_page = first_page  # the load fills seq.pages[first_page:]
        self.num_blocks = 0
        self._background: Future[None] | None = None  # `stage_in_background`
        self._cutoff: LoadCutoff | None = None  # its planner's cutoff, if any
        self.staged_s = 0.0  # how long `stage`'s reads took
        self._stream: torch.cuda.Stream | None = None  # every part's copies, in order
        self._copiers: list[uva_copy.LayerCopier] = []
        self._borrows: list[tuple[Any, Any]] = []  # (the store's context, what it lent)
        self._staged: list[Future[None]] = []

    def parts(self, num_blocks: int) -> Iterator[tuple[int, bool]]:
        """``(end, is_last)`` of each part of a borrowed fetch of ``num_blocks`` blocks
        (`part_ends`), to borrow in turn. Once a part went by the copy engines (blocks in
        HBM) the rest is one part: those DMAs are issued per part, layer, run and half, so
        from HBM, where the copy is fast and the host's issuing is what takes time, parts
        only add to it."""
        ends = part_ends(num_blocks)
        for end in ends:
            is_last = end == ends[-1]
            if is_last or not (self._copiers and self._copiers[-1].runs is not None):
                yield end, is_last

    def borrow(self, keys: Sequence[bytes], *, is_last: bool) -> bool:
        """Borrow the leading ``keys`` held in memory tiers, for the pages after those
        already loading, and launch their copies; True if every key was lent. A part that
        comes up short is copied layer by layer, as is the ``is_last`` one."""
        if not keys:
            return False
        io = self.io
        context = io.store.borrow(keys)
        try:
            lent = context.__enter__()
        except KVStoreError as e:
            log.warning("borrowing %d blocks failed (%s); copying them instead", len(keys), e)
            return False
        self._borrows.append((context, lent))
        addresses = lent.addresses
        if not addresses:
            return False
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=io.cache.device)
        first = self.first_page + self.num_blocks
        try:
            copier = uva_copy.LayerCopier(
                io.cache, addresses, self.seq.pages[first:first + len(addresses)],
                io.layout.layer_bytes, io.layout.kv_bytes, stream=self._stream,
                layerwise=is_last or len(addresses) < len(keys), fp8=io.fp8_chunks)
        except ValueError as e:
            log.warning("copying %d borrowed blocks in place failed (%s); copying them "
                        "instead", len(addresses), e)
            return False
        copier.launch()
        self._copiers.append(copier)
        self.num_blocks += len(addresses)
        return len(addresses) == len(keys)

    def stage(self, keys: Sequence[bytes], *, cutoff: LoadCutoff | None = None,
              observe: Callable[[int, float], None] | None = None) -> None:
        """Fetch ``keys`` (the blocks after those already loading) into staging on the
        cache's device, stopping at the first the store cannot give, and copy them to their
        pages layer by layer on the worker. With a planner's ``cutoff`` the reads go in
        chunks, and stop early where it says the rest is better computed; ``observe``
        is told how many blocks were read in how long (see `stage_in_background`)."""
        if not keys:
            return
        io, first = self.io, self.first_page + self.num_blocks
        staging = io._blocks(len(keys)) if io.codec is None else torch.empty(
            (len(keys), io.stored_block_bytes), dtype=torch.uint8, device=io.cache.device)
        num_staged = 0
        started = time.perf_counter()
        batch = getattr(io.store, "get_many_into", None)
        step = len(keys) if cutoff is None else cutoff.chunk_blocks
        try:
            for start in range(0, len(keys), step):
                chunk = keys[start:start + step]
                if batch is not None:  # one pin-copy-unpin pass, copies in flight together
                    got = batch(chunk, list(staging[start:start + step]))
                else:
                    got = 0
                    for i, key in enumerate(chunk):
                        if not io.store.get_into(key, staging[start + i]):
                            break  # evicted, deleted or failed its checksum since match_prefix
                        got += 1
                num_staged += got
                if got < len(chunk):
                    break
                now = time.perf_counter()
                if cutoff is not None and not cutoff.keep_going(num_staged, now - started, now):
                    break
        except KVStoreError as e:
            log.warning("fetching %d blocks failed after %d (%s); recomputing from there",
                        first + len(keys), first + num_staged, e)
        if not num_staged:
            return
        self.staged_s = time.perf_counter() - started
        if observe is not None:
            observe(num_staged, self.staged_s)
        cache = io.cache
        if io.codec is not None:
            staging = io.codec.decode(staging[:num_staged], cache.dtype)
        if staging.is_cuda and (torch.cuda.current_stream(cache.device)
                                != torch.cuda.default_stream(cache.device)):
            # Staged (and decoded) on a side stream, copied into the pages on the worker's
            # default one: that work done first, and the memory kept for the default one.
            torch.cuda.current_stream(cache.device).synchronize()
            staging.record_stream(torch.cuda.default_stream(cache.device))
        index = to_device(self.seq.pages[first:first + num_staged], cache.device)
        blocks = staging[:num_staged]
        self._staged = [io._worker.submit(_load_layer, cache, layer, index, blocks)
                        for layer in range(len(cache.kv))]
        self.num_blocks += num_staged

    def stage_in_background(self, keys: Sequence[bytes], *,
                            observe: Callable[[int, float], None] | None = None,
                            cutoff: LoadCutoff | None = None) -> None:
        """`stage` ``keys`` on the io's fetch thread, so that the caller computes
        meanwhile; `settle` waits for the blocks to be read (then ``num_blocks`` is how
        many came). ``observe(num_blocks, seconds)`` is told how long the reads took (a
        planner keeps its costs fresh with it); ``cutoff`` as in `stage`, told by
        `settle` when the caller's computing is done."""
        self._cutoff = cutoff

        def run() -> None:
            io = self.io
            on_stream: Any = contextlib.nullcontext()
            if io.cache.device.type == "cuda":
                # (the fetcher's one thread is the stream's only user; each stage drains it)
                if io._fetch_stream is None:
                    io._fetch_stream = torch.cuda.Stream(device=io.cache.device)
                on_stream = torch.cuda.stream(io._fetch_stream)
            with on_stream:
                self.stage(keys, cutoff=cutoff, observe=observe)

        self._background = self.io._fetcher.submit(run)

    def settle(self) -> int:
        """Wait for a background `stage` to have read its blocks; how many it got. (From
        here its cutoff counts the wait: the caller has nothing else to do.)"""
        if self._cutoff is not None:
            self._cutoff.head_done(time.perf_counter())
        if self._background is not None:
            self._background.result()
        return self.num_blocks

    def wait(self, layer: int) -> None:
        if self._background is not None:
            self._background.result()
        if self._copiers:
            # One stream: the last part's layer copy comes after every earlier part's.
            self._copiers[-1].wait(layer)
        if self._staged:
            self._staged[layer].result()

    def wait_all(self) -> None:
        """Finish every copy and give back what was borrowed. Raises `KVStoreError` if a
        borrowed block's pin expired before its copy was done (then nothing it fed may be
        used: the caller fails the request rather than emit tokens computed from it)."""
        lent = [lent for _, lent in self._borrows]
        self.release()
        if any(part.intact is False for part in lent):
            raise KVStoreError("a borrowed KV block's pin expired mid-copy")

    def release(self) -> None:
        """Wait for every copy, then give back what was borrowed (also after an error)."""
        try:
            if self._background is not None:
                self._background.result()
            for done in self._staged:
                done.result()
        finally:
            try:
                if self._stream is not None:  # every part's copies, even one that failed
                    self._stream.synchronize()
            finally:
                borrows, self._borrows = self._borrows, []
                for context, _ in reversed(borrows):
                    context.__exit__(None, None, None)


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
        self._staging = io._blocks(len(self._pages)) if self._pages else None
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
        blocks = self._staging
        if self.io.codec is not None:  # quantized where the pages are, then stored
            blocks = self.io.codec.encode(blocks)
        try:
            return self.io.store.put_many(self.keys, list(blocks))
        except KVStoreError as e:
            log.warning("publishing %d blocks failed: %s", len(self.keys), e)
            return 0


def _save_layer(cache: PagedKVCache, layer: int, index: torch.Tensor,
                staging: torch.Tensor, non_blocking: bool = False) -> None:
    layer_kv = cache.kv[layer].index_select(1, index)  # [2, n, tokens, heads, dim]
    staging[:, layer].copy_(layer_kv.transpose(0, 1), non_blocking=non_blocking)

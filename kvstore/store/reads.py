"""The Store's read paths: `get_into`'s engine (`Reads.read`), get_many's batch runs,
`get_many_into` and `borrow`.

A read pins the block (so no eviction or overwrite frees its slot mid-copy), copies
outside the lock, then unpins; a copy whose block was overwritten or dropped meanwhile
(`StoreState.unpin` says so) is torn and reported as a miss, never as a hit.

`get_many_into` is the batch form for KV fetches: it pins a run of blocks held in memory
tiers in one lock hold, starts every copy (asynchronous where a GPU is on either side),
waits once for all of them, then unpins: a GPU-bound fetch of many blocks goes at the
copy engine's pace instead of one synchronised DMA per block.

Blocks only on NVMe that `get_many_into` copies into GPU tensors go through a pipeline:
a reader thread reads block i+1 from disk (`read` into a pinned host buffer: one O_DIRECT
read, checked there) while block i's buffer is copied to the GPU, so the disk is kept
busy at one request at a time instead of idling through each copy (`_NvmeToGpu`).

`borrow` hands out the slots themselves, pinned, for zero-copy reads: views of host DRAM
(page-locked when CUDA is there, so a GPU kernel reads them in place through unified
addressing) or of HBM. A pinned slot stays allocated and unchanged until released, even
if its key is overwritten or deleted meanwhile (the retired slots of `TierMedia`).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import numpy as np

from kvstore.buffers import ByteView, copy_bytes, output_view, to_bytes
from kvstore.errors import InvalidValueError, StoreClosedError
from kvstore.keys import KEY_BYTES
from kvstore.store.state import StoreState
from kvstore.tiers.base import check_key

# Values up to this size are copied under the store lock (a pin round trip costs more).
SMALL_VALUE_BYTES = 64 * 1024
# Whether get_many_into pipelines reads of NVMe blocks into GPU tensors (`_NvmeToGpu`);
# off, each is read then copied in turn (benchmarks compare the two in one run).
PIPELINE_NVME_TO_GPU = True


def _is_cuda(view: Any) -> bool:
    return not isinstance(view, np.ndarray) and view.is_cuda


def _is_cuda_out(out: Any) -> bool:
    """Whether a caller's output buffer is a GPU tensor."""
    return not isinstance(out, np.ndarray) and getattr(out, "is_cuda", False) is True


class Borrowed:
    """What `Reads.borrow` yields for the leading blocks held in memory tiers:
    ``addresses`` (host or device pointers, for copy kernels) and ``views`` (a numpy array
    over host memory or a device tensor each, made on first use), both read-only by
    contract; after release, ``intact``: False if a pin expired while held (a holder slower
    than ``lease_s``), in which case what was read from them must not be used."""

    def __init__(self, slots: list[tuple[Any, int, int]], addresses: list[int]) -> None:
        self._slots = slots  # (pool, offset, nbytes)
        self.addresses = addresses
        self.intact: bool | None = None
        self._views: list[ByteView] | None = None

    def __len__(self) -> int:
        return len(self._slots)

    @property
    def views(self) -> list[ByteView]:
        if self._views is None:
            self._views = [pool.view(offset, n) for pool, offset, n in self._slots]
        return self._views


class Reads:
    """The read paths over a `StoreState` (see the module docstring)."""

    def __init__(self, state: StoreState, host_write_tier: Any | None) -> None:
        self.state = state
        # The write tier when it is host memory: get_many reads small values from it in runs.
        self.host_write_tier = host_write_tier
        self._pipeline: _NvmeToGpu | None = None  # made on the first NVMe read to a GPU
        self._pipeline_lock = threading.Lock()
        self._closed = False

    def read(self, key: bytes, out: Any) -> bytes | bool | None:
        """Find ``key``, pin it, copy it (into ``out``, or as bytes if ``out`` is None)
        outside the lock, unpin. Returns the bytes, True (copied into ``out``) or None.

        An NVMe read as bytes or into a host buffer takes no pin: the tier reads under its
        own lock (no eviction can interleave) and checks the record, so nothing can tear it,
        and for a 4 KiB value the pin and unpin are a sixth of the CPU time per read."""
        state = self.state
        core = state.core
        with state.lock:
            state.check_open()
            state.counters.queries += 1
            block = core.lookup(key)
            if block < 0:
                return None
            nbytes = core.nbytes(block)
            # A wrong-size buffer raises here, before anything changes.
            dst = output_view(out, nbytes) if out is not None else None
            t = core.fastest(block)
            gen = core.generation(block)
            core.touch(block)
            tier = state.tiers[t]
            in_memory = state.media.is_memory[t]
            slot = tier.slot_of(key) if in_memory else None
            pin = (None if not in_memory and (dst is None or isinstance(dst, np.ndarray))
                   else core.pin(block, state.config.lease_s))
        result: bytes | bool | None = None
        source: ByteView | bytes | None = None  # the bytes read, for a promotion
        try:
            if slot is not None:
                source = tier.view(*slot)
                result = to_bytes(source) if dst is None else True
                if dst is not None:
                    copy_bytes(dst, source)
            elif isinstance(dst, np.ndarray):
                # NVMe straight into the caller's host buffer; verifies the checksum.
                if tier.read_exact(key, dst):
                    result, source = True, dst
            else:
                data = tier.read_bytes(key)  # verifies the record checksum
                if data is not None:
                    result, source = data, data
                    if dst is not None:
                        result, source = True, np.frombuffer(data, dtype=np.uint8)
                        copy_bytes(dst, source)
        except BaseException:
            if pin is not None:
                with state.lock:
                    state.unpin(block, pin)
            raise
        with state.lock:
            intact = pin is None or state.unpin(block, pin)
            if result is None:  # checksum failure: the NVMe copy is gone for good
                if core.generation(block) == gen and core.is_in(block, t):
                    tier.evict(key)
                    core.remove(block, t)
                return None
            if not intact:
                state.counters.torn_reads += 1
                return None
            state.counters.hit(t)
            state.promote(block, gen, t, source)
        return result

    def get_run(self, keys: list[bytes], i: int, results: list[bytes | None], total: int,
                limit: float) -> tuple[int, int, bool]:
        """get_many's batch path (lock held) from key ``i``, with ``total`` bytes read so
        far: where it stopped, the bytes read by then, and whether the value there would
        take them past ``limit``. It reads misses and small values whose fastest tier is
        the host write tier; any other key stops it (get's path for that one)."""
        state = self.state
        core = state.core
        tier, t = self.host_write_tier, core.write_tier
        t_bit, upto_t = 1 << t, (1 << (t + 1)) - 1
        # Values of the run that fit whatever their sizes: counted, not summed, per value.
        sure_hits = (limit - total) // SMALL_VALUE_BYTES if limit < math.inf else math.inf
        start, queries, hits = i, 0, 0
        stop = -1
        lookup, residency, nbytes_of, touch = (core.lookup, core.residency, core.nbytes,
                                               core.touch)
        while i < len(keys):
            block = lookup(keys[i])
            if block >= 0:
                if (tier is None or residency(block) & upto_t != t_bit  # t: its fastest
                        or nbytes_of(block) > SMALL_VALUE_BYTES or hits >= sure_hits):
                    stop = block  # get's path for this one
                    break
                touch(block)
                results[i] = tier.view(*tier.slot_of(keys[i])).tobytes()
                hits += 1
            queries += 1
            i += 1
        state.counters.queries += queries
        state.counters.hit(t, hits)
        if hits and limit < math.inf:
            total += sum(len(v) for v in results[start:i] if v is not None)
        # A value that would pass the limit is not read only to be dropped.
        is_full = stop >= 0 and total > 0 and total + core.nbytes(stop) > limit
        return i, total, is_full

    @contextmanager
    def borrow(self, keys: Sequence[bytes]) -> Iterator[Borrowed]:
        """Pin the leading ``keys`` held in memory tiers (stopping at the first that is
        missing or only on NVMe) and yield their slots; unpin on exit."""
        # A GPU fetch borrows hundreds of blocks in front of its first copy: the loops
        # below bind what they call and look each tier up once.
        checked = [k if type(k) is bytes and len(k) == KEY_BYTES else check_key(k)
                   for k in keys]
        state = self.state
        run: list[tuple[int, int, int]] = []  # block, pin, tier
        slots: list[tuple[Any, int, int]] = []  # pool, offset, nbytes
        addresses: list[int] = []
        with state.lock:
            state.check_open()
            core, lease_s = state.core, state.config.lease_s
            memory = [(tier, tier.pool.base_address) if is_memory else None
                      for tier, is_memory in zip(state.tiers, state.media.is_memory,
                                                 strict=True)]
            num_found = 0
            for key in checked:
                block = core.lookup(key)
                if block < 0:
                    state.counters.queries += 1
                    break
                t = core.fastest(block)
                if memory[t] is None:
                    break
                tier, base = memory[t]
                num_found += 1
                core.touch(block)
                run.append((block, core.pin(block, lease_s), t))
                offset, nbytes = tier.slot_of(key)
                slots.append((tier.pool, offset, nbytes))
                addresses.append(base + offset)
            state.counters.queries += num_found
        borrowed = Borrowed(slots, addresses)
        try:
            yield borrowed
        finally:
            with state.lock:
                num_torn = 0
                for block, pin, t in run:
                    if state.unpin(block, pin):
                        state.counters.hit(t)
                    else:
                        num_torn += 1
                state.counters.torn_reads += num_torn
                borrowed.intact = not num_torn

    def get_many_into(self, keys: Sequence[bytes], outs: Sequence[Any]) -> int:
        """Copy the values of leading ``keys`` into ``outs`` (one buffer or tensor each,
        of exactly the value's size); returns how many leading keys were copied, stopping
        at the first miss. Same effect as `get_into` on each key in turn until one misses.
        """
        checked = [check_key(k) for k in keys]
        if len(outs) != len(checked):
            raise InvalidValueError(f"get_many_into got {len(checked)} keys but "
                                    f"{len(outs)} outputs")
        state = self.state
        with state.lock:  # every buffer checked before anything changes
            state.check_open()
            for key, out in zip(checked, outs, strict=True):
                block = state.core.lookup(key)
                if block < 0:
                    break
                output_view(out, state.core.nbytes(block))
        done = 0
        while done < len(checked):
            copied, stop = self._read_run(checked, outs, done)
            done += copied
            if stop:
                return done
            if done < len(checked):  # a block outside memory tiers
                if PIPELINE_NVME_TO_GPU and _is_cuda_out(outs[done]):
                    copied = self._nvme_to_gpu().copy(checked, outs, done)
                    if copied == 0:
                        return done
                    done += copied
                    continue
                if self.read(checked[done], outs[done]) is None:  # get_into's path
                    return done
                done += 1
        return done

    def _nvme_to_gpu(self) -> _NvmeToGpu:
        with self._pipeline_lock:
            if self._closed:  # the store is closing
                raise StoreClosedError("the store is closed; open a new kvstore.Store")
            if self._pipeline is None:
                self._pipeline = _NvmeToGpu(self)
            return self._pipeline

    def close(self) -> None:
        """Stop the NVMe-to-GPU reader thread, if one was started (the store is closing)."""
        with self._pipeline_lock:
            self._closed = True
            pipeline, self._pipeline = self._pipeline, None
        if pipeline is not None:
            pipeline.close()

    def _read_run(self, keys: list[bytes], outs: Sequence[Any], start: int
                  ) -> tuple[int, bool]:
        """Pin, copy and unpin the run of memory-tier blocks from ``start``; returns (how
        many were copied whole, whether a miss ended the run)."""
        state = self.state
        core = state.core
        run: list[tuple[int, int, int, int, ByteView, ByteView]] = []
        missed = False
        with state.lock:
            state.check_open()
            try:
                for i in range(start, len(keys)):
                    block = core.lookup(keys[i])
                    if block < 0:
                        state.counters.queries += 1
                        missed = True
                        break
                    t = core.fastest(block)
                    if not state.media.is_memory[t]:
                        break
                    tier = state.tiers[t]
                    dst = output_view(outs[i], core.nbytes(block))
                    state.counters.queries += 1
                    core.touch(block)
                    pin = core.pin(block, state.config.lease_s)
                    run.append((block, core.generation(block), pin, t,
                                tier.view(*tier.slot_of(keys[i])), dst))
            except BaseException:
                for block, _, pin, *_ in run:
                    state.unpin(block, pin)
                raise
        streams = set()
        try:
            for *_, src, dst in run:
                copy_bytes(dst, src, non_blocking=True)
                for view in (src, dst):
                    if _is_cuda(view):
                        streams.add(view.device)
            if streams:  # every copy done before any slot is unpinned
                import torch

                for device in streams:
                    torch.cuda.current_stream(device).synchronize()
        finally:
            with state.lock:
                whole = [state.unpin(block, pin) for block, _, pin, *_ in run]
        copied = 0
        with state.lock:
            for (block, gen, _, t, src, _), intact in zip(run, whole, strict=True):
                if not intact:
                    state.counters.torn_reads += 1
                    return copied, True
                copied += 1
                state.counters.hit(t)
                state.promote(block, gen, t, src)
        return copied, missed


class _NvmeToGpu:
    """`get_many_into`'s reads of blocks outside memory tiers into GPU tensors, pipelined:
    one reader thread runs `Reads.read` of the next block into a pinned host buffer (the
    whole read path: the tier checks the record's checksum there, counters, promotion)
    while the caller's thread copies the block before it to the GPU. Two buffers of each
    size are kept; a buffer is read into again only after its copy to the GPU is done."""

    BUFFERS = 2

    def __init__(self, reads: Reads) -> None:
        self.reads = reads
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvstore-nvme")
        self._buffers: dict[int, list[Any]] = {}  # nbytes -> free pinned buffers
        self._lock = threading.Lock()

    def close(self) -> None:
        self._reader.shutdown(wait=True)

    def _take(self, nbytes: int) -> Any:
        import torch

        with self._lock:
            free = self._buffers.setdefault(nbytes, [])
            if free:
                return free.pop()
        # Page-locked (cudaHostAlloc: page-aligned, as the tier's O_DIRECT reads want).
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def _give(self, nbytes: int, buffer: Any) -> None:
        with self._lock:
            free = self._buffers.setdefault(nbytes, [])
            if len(free) < self.BUFFERS:
                free.append(buffer)

    def copy(self, keys: list[bytes], outs: Sequence[Any], start: int) -> int:
        """Copy the values of ``keys[start:]`` into their GPU ``outs`` until a miss, a
        failed checksum or an out that is not a GPU tensor; how many were copied."""
        import torch

        reads = self.reads
        pending: list[tuple[Future[Any], Any, int]] = []  # (read, buffer, nbytes), in order
        copies: list[tuple[Any, Any, int]] = []  # (event after its GPU copy, buffer, nbytes)
        done = 0
        i = start

        def submit() -> bool:
            nonlocal i
            if i >= len(keys):
                return False
            if not _is_cuda_out(outs[i]):
                return False
            nbytes = outs[i].nbytes
            buffer = self._take(nbytes)
            host = buffer.numpy()
            pending.append((self._reader.submit(reads.read, keys[i], host), buffer, nbytes))
            i += 1
            return True

        try:
            for _ in range(self.BUFFERS):
                if not submit():
                    break
            while pending:
                read, buffer, nbytes = pending.pop(0)
                if read.result() is None:  # a miss or a failed checksum: the run ends
                    self._give(nbytes, buffer)
                    break
                out = output_view(outs[start + done], nbytes)
                out.copy_(buffer, non_blocking=True)
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(out.device))
                copies.append((event, buffer, nbytes))
                done += 1
                # The oldest buffer comes back once its copy is done; then read the next.
                if len(copies) >= self.BUFFERS:
                    event, old, old_bytes = copies.pop(0)
                    event.synchronize()
                    self._give(old_bytes, old)
                submit()
        finally:
            for read, buffer, nbytes in pending:  # reads started past where the run ended
                read.result()
                self._give(nbytes, buffer)
            for event, buffer, nbytes in copies:
                event.synchronize()
                self._give(nbytes, buffer)
        return done

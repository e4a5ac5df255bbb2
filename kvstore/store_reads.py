"""The Store's read paths, kept apart from store.py (a mixin of `kvstore.store.Store`).

A read pins the block (so no eviction or overwrite frees its slot mid-copy), copies
outside the lock, then unpins; a copy whose block was overwritten or dropped meanwhile
(`Store._unpin` says so) is torn and reported as a miss, never as a hit.

`get_many_into` is the batch form for KV fetches: it pins a run of blocks held in memory
tiers in one lock hold, starts every copy (asynchronous where a GPU is on either side),
waits once for all of them, then unpins: a GPU-bound fetch of many blocks goes at the
copy engine's pace instead of one synchronised DMA per block.

`borrow` hands out the slots themselves, pinned, for zero-copy reads: views of host DRAM
(page-locked when CUDA is there, so a GPU kernel reads them in place through unified
addressing) or of HBM. A pinned slot stays allocated and unchanged until released, even
if its key is overwritten or deleted meanwhile (the retired-slot rule of `Store._unpin`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from kvstore.buffers import ByteView, copy_bytes, output_view, to_bytes
from kvstore.errors import InvalidValueError
from kvstore.keys import KEY_BYTES
from kvstore.tiers.base import check_key
from kvstore.tiers.memory import MemoryTier


def _is_cuda(view: Any) -> bool:
    return not isinstance(view, np.ndarray) and view.is_cuda


class Borrowed:
    """What `StoreReads.borrow` yields for the leading blocks held in memory tiers:
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


class StoreReads:
    """`get_into`'s engine (``_read``), `get_many_into` and `borrow`."""

    @contextmanager
    def borrow(self, keys: Sequence[bytes]) -> Iterator[Borrowed]:
        """Pin the leading ``keys`` held in memory tiers (stopping at the first that is
        missing or only on NVMe) and yield their slots; unpin on exit."""
        # A GPU fetch borrows hundreds of blocks in front of its first copy: the loops
        # below bind what they call and look each tier up once (1.6 -> 1.4 us a block).
        checked = [k if type(k) is bytes and len(k) == KEY_BYTES else check_key(k)
                   for k in keys]
        run: list[tuple[Any, int, int]] = []  # entry, pin, tier
        slots: list[tuple[Any, int, int]] = []  # pool, offset, nbytes
        addresses: list[int] = []
        with self._lock:
            self._check_open()
            index, lease_s = self.index, self.config.lease_s
            memory = [(tier, tier.pool.base_address) if isinstance(tier, MemoryTier) else None
                      for tier in self._tiers]
            num_found = 0
            for key in checked:
                entry = index.get(key)
                if entry is None:
                    self._queries += 1
                    break
                t = entry.fastest_tier
                if memory[t] is None:
                    break
                tier, base = memory[t]
                num_found += 1
                index.touch(entry)
                run.append((entry, index.pin(entry, lease_s), t))
                offset, nbytes = tier.slot_of(key)
                slots.append((tier.pool, offset, nbytes))
                addresses.append(base + offset)
            self._queries += num_found
        borrowed = Borrowed(slots, addresses)
        try:
            yield borrowed
        finally:
            with self._lock:
                num_torn = 0
                unpin, tier_hits = self._unpin, self._tier_hits
                for entry, pin, t in run:
                    if unpin(entry, pin):
                        tier_hits[t] += 1
                    else:
                        num_torn += 1
                self._hits += len(run) - num_torn
                self._torn_reads += num_torn
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
        with self._lock:  # every buffer checked before anything changes
            self._check_open()
            for key, out in zip(checked, outs, strict=True):
                entry = self.index.get(key)
                if entry is None:
                    break
                output_view(out, entry.nbytes)
        done = 0
        while done < len(checked):
            copied, stop = self._read_run(checked, outs, done)
            done += copied
            if stop:
                return done
            if done < len(checked):  # a block outside memory tiers: get_into's path
                if self._read(checked[done], outs[done]) is None:
                    return done
                done += 1
        return done

    def _read_run(self, keys: list[bytes], outs: Sequence[Any], start: int
                  ) -> tuple[int, bool]:
        """Pin, copy and unpin the run of memory-tier blocks from ``start``; returns (how
        many were copied whole, whether a miss ended the run)."""
        run: list[tuple[Any, int, int, ByteView, ByteView]] = []  # entry, pin, tier, src, dst
        missed = False
        with self._lock:
            self._check_open()
            try:
                for i in range(start, len(keys)):
                    entry = self.index.get(keys[i])
                    if entry is None:
                        self._queries += 1
                        missed = True
                        break
                    t = entry.fastest_tier
                    tier = self._tiers[t]
                    if not isinstance(tier, MemoryTier):
                        break
                    dst = output_view(outs[i], entry.nbytes)
                    self._queries += 1
                    self.index.touch(entry)
                    pin = self.index.pin(entry, self.config.lease_s)
                    run.append((entry, pin, t, tier.view(*tier.slot_of(keys[i])), dst))
            except BaseException:
                for entry, pin, *_ in run:
                    self._unpin(entry, pin)
                raise
        streams = set()
        try:
            for _, _, _, src, dst in run:
                copy_bytes(dst, src, non_blocking=True)
                for view in (src, dst):
                    if _is_cuda(view):
                        streams.add(view.device)
            if streams:  # every copy done before any slot is unpinned
                import torch

                for device in streams:
                    torch.cuda.current_stream(device).synchronize()
        finally:
            with self._lock:
                whole = [self._unpin(entry, pin) for entry, pin, *_ in run]
        copied = 0
        with self._lock:
            for (entry, _, t, src, _), intact in zip(run, whole, strict=True):
                if not intact:
                    self._torn_reads += 1
                    return copied, True
                copied += 1
                self._hits += 1
                self._tier_hits[t] += 1
                self._promote(entry, t, src)
        return copied, missed

    def _promote(self, entry: Any, t: int, source: ByteView | bytes) -> None:
        """After a hit in tier ``t``, copy the block up to the write tier (lock held)."""
        w = self._write_tier
        if (self.config.promote_on_hit and t > w and not self._closed
                and self.index.get(entry.key) is entry and not entry.is_in(w)):
            if isinstance(source, bytes):
                source = np.frombuffer(source, dtype=np.uint8)
            if self._store_in(w, entry, source):
                self._promotions += 1

    def _read(self, key: bytes, out: Any) -> bytes | bool | None:
        """Find ``key``, pin it, copy it (into ``out``, or as bytes if ``out`` is None)
        outside the lock, unpin. Returns the bytes, True (copied into ``out``) or None.

        An NVMe read as bytes or into a host buffer takes no pin: the tier reads under its
        own lock (no eviction can interleave) and checks the record, so nothing can tear it,
        and for a 4 KiB value the pin and unpin are a sixth of the CPU time per read."""
        with self._lock:
            self._check_open()
            self._queries += 1
            entry = self.index.get(key)
            if entry is None:
                return None
            # A wrong-size buffer raises here, before anything changes.
            dst = output_view(out, entry.nbytes) if out is not None else None
            t = entry.fastest_tier
            self.index.touch(entry)
            tier = self._tiers[t]
            in_memory = isinstance(tier, MemoryTier)
            slot = tier.slot_of(key) if in_memory else None
            pin = (None if not in_memory and (dst is None or isinstance(dst, np.ndarray))
                   else self.index.pin(entry, self.config.lease_s))
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
                with self._lock:
                    self._unpin(entry, pin)
            raise
        with self._lock:
            intact = pin is None or self._unpin(entry, pin)
            if result is None:  # checksum failure: the NVMe copy is gone for good
                if entry.is_in(t):
                    tier.evict(key)
                    self.index.remove(entry, t)
                return None
            if not intact:
                self._torn_reads += 1
                return None
            self._hits += 1
            self._tier_hits[t] += 1
            self._promote(entry, t, source)
        return result

"""The Store's host-memory data plane, for the daemon's shared-memory clients (a mixin of
`kvstore.store.Store`, kept apart from store.py).

A client on the same host maps the DRAM pool and copies values itself: a put is
``reserve_host -> copy -> commit_host`` (or ``release_host``), a get is ``pin_host ->
copy -> unpin_host``, whose False means the copy may be torn and must be dropped. The
daemon's event loop runs short calls inline when the store lock is free (`try_lock`).
"""

from __future__ import annotations

from typing import Any

from kvstore.errors import InvalidValueError
from kvstore.tiers.base import check_key


class StoreHostPlane:
    """reserve/commit/release and pin/unpin of DRAM slots, by offset."""

    @property
    def has_nvme(self) -> bool:
        return self._nvme is not None

    def try_lock(self) -> bool:
        """Take the store lock only if it is free; True if taken (then call `unlock`).

        The daemon's event loop runs short calls inline this way, and hands them to a
        thread when another thread holds the lock (for NVMe I/O, say)."""
        return self._lock.acquire(blocking=False)

    def unlock(self) -> None:
        self._lock.release()

    @property
    def host_pool(self) -> Any | None:
        """The DRAM tier's pool (``.array``, ``.shm_name``), or None without DRAM."""
        t = self._dram_tier
        return None if t is None else self._tiers[t].pool

    def reserve_host(self, nbytes: int, protect: set[bytes] | None = None,
                     owner: int = 0) -> int | None:
        """Reserve a DRAM slot for a value of ``owner`` (evicting and demoting as needed,
        its own blocks first at its quota, never a key of ``protect``): its offset, or
        None."""
        if nbytes > self.config.max_value_bytes:
            raise InvalidValueError(f"value of {nbytes} bytes exceeds max_value_bytes "
                                    f"({self.config.max_value_bytes})")
        with self._lock:
            self._check_open()
            t = self._dram_tier
            if t is None:
                return None
            offset = self._reserve(t, nbytes, protect, owner)
            if offset is not None:
                self._hold(t, offset, owner, nbytes)  # charged to its owner until committed
            return offset

    def commit_host(self, key: bytes, offset: int, nbytes: int, parent: bytes | None,
                    owner: int = 0) -> bool:
        """Make a reserved DRAM slot, now filled, the value of ``key``, charged to
        ``owner``; False, the slot still reserved (release it), if ``key`` cannot take a new
        value (its old record is on a read-only NVMe disk: `Store.put`)."""
        key = check_key(key)
        with self._lock:
            self._check_open()
            if self._is_pinned_on_disk(key):
                return False
            self._commit(self._dram_tier, key, parent, offset, nbytes, owner)
            return True

    def release_host(self, offset: int) -> None:
        """Give back a reserved DRAM slot that will not be committed."""
        with self._lock:
            if not self._closed:
                self._unhold(self._dram_tier, offset)
                self._tiers[self._dram_tier].release(offset)

    def pin_host(self, key: bytes) -> tuple[int, int, int] | None:
        """``(offset, nbytes, pin)`` of a block whose fastest tier is DRAM, counted as a
        hit; None (nothing counted) when it is elsewhere or absent: use `get` for it."""
        key = check_key(key)
        with self._lock:
            self._check_open()
            t = self._dram_tier
            entry = self.index.get(key)
            if entry is None or t is None or entry.fastest_tier != t:
                return None
            self.index.touch(entry)
            self._queries += 1
            self._hits += 1
            self._tier_hits[t] += 1
            offset, nbytes = self._tiers[t].slot_of(key)
            return offset, nbytes, self.index.pin(entry, self.config.lease_s)

    def touch_host(self, keys: list[bytes]) -> None:
        """Count blocks a client read from the DRAM pool on its own (through the shared
        directory) as DRAM hits, and make those still stored the most recently used."""
        with self._lock:
            self._check_open()
            t = self._dram_tier
            if t is None:
                return
            for key in keys:
                entry = self.index.get(check_key(key))
                if entry is not None:
                    self.index.touch(entry)
            self._queries += len(keys)
            self._hits += len(keys)
            self._tier_hits[t] += len(keys)

    def unpin_host(self, key: bytes, pin: int, *, after_copy: bool = True) -> bool:
        """Release a pin_host pin; False if the block changed meanwhile or the lease ran
        out (the copy may be torn: treat it as a miss). ``after_copy=False`` drops a pin
        whose copy nobody will use (its holder went away): no torn read is counted."""
        with self._lock:
            if not self._unpin(self.index.entries.get(key), pin):
                self._torn_reads += after_copy
                return False
            return True

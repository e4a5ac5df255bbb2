"""The Store's host-memory data plane, for the daemon's shared-memory clients.

A client on the same host maps the DRAM pool and copies values itself: a put is
``reserve -> copy -> commit`` (or ``release``), a get is ``pin -> copy -> unpin``, whose
False means the copy may be torn and must be dropped. The daemon's event loop runs short
calls inline when the store lock is free (`Store.try_lock`).
"""

from __future__ import annotations

from collections.abc import Callable

from kvstore.errors import InvalidValueError
from kvstore.store.state import StoreState
from kvstore.tiers.base import check_key

# commit(tier, key, parent, offset, nbytes, owner): the Store's commit of a filled slot.
Commit = Callable[[int, bytes, bytes | None, int, int, int], None]


class HostPlane:
    """reserve/commit/release and pin/unpin of DRAM slots, by offset."""

    def __init__(self, state: StoreState, dram_tier: int | None, commit: Commit) -> None:
        self.state = state
        self.t = dram_tier
        self._commit = commit

    def reserve(self, nbytes: int, protect: set[bytes] | None = None,
                owner: int = 0) -> int | None:
        state = self.state
        if nbytes > state.config.max_value_bytes:
            raise InvalidValueError(f"value of {nbytes} bytes exceeds max_value_bytes "
                                    f"({state.config.max_value_bytes})")
        with state.lock:
            state.check_open()
            t = self.t
            if t is None:
                return None
            offset = state.core.reserve(t, nbytes, owner, protect)
            if offset is not None:
                state.core.hold(t, offset, owner, nbytes)  # charged to its owner until committed
            return offset

    def commit(self, key: bytes, offset: int, nbytes: int, parent: bytes | None,
               owner: int = 0) -> bool:
        key = check_key(key)
        state = self.state
        with state.lock:
            state.check_open()
            if state.media.pins_old_record(key):
                return False
            self._commit(self.t, key, parent, offset, nbytes, owner)
            return True

    def release(self, offset: int) -> None:
        state = self.state
        with state.lock:
            if not state.closed:
                state.core.unhold(self.t, offset)
                state.tiers[self.t].release(offset)

    def pin(self, key: bytes) -> tuple[int, int, int] | None:
        key = check_key(key)
        state = self.state
        with state.lock:
            state.check_open()
            t, core = self.t, state.core
            block = core.lookup(key)
            if block < 0 or t is None or core.fastest(block) != t:
                return None
            core.touch(block)
            state.counters.queries += 1
            state.counters.hit(t)
            offset, nbytes = state.tiers[t].slot_of(key)
            return offset, nbytes, core.pin(block, state.config.lease_s)

    def pin_many(self, keys: list[bytes]) -> list[tuple[int, int, int] | None]:
        """`pin` of each key, under one hold of the lock (a loan of many blocks)."""
        keys = [check_key(key) for key in keys]
        state = self.state
        out: list[tuple[int, int, int] | None] = []
        with state.lock:
            state.check_open()
            t, core = self.t, state.core
            if t is None:
                return [None] * len(keys)
            slot_of, lease_s = state.tiers[t].slot_of, state.config.lease_s
            lookup, fastest, touch, pin = core.lookup, core.fastest, core.touch, core.pin
            for key in keys:
                block = lookup(key)
                if block < 0 or fastest(block) != t:
                    out.append(None)
                    continue
                touch(block)
                offset, nbytes = slot_of(key)
                out.append((offset, nbytes, pin(block, lease_s)))
            found = len(out) - out.count(None)
            state.counters.queries += found
            state.counters.hit(t, found)
        return out

    def touch(self, keys: list[bytes]) -> None:
        state = self.state
        with state.lock:
            state.check_open()
            t = self.t
            if t is None:
                return
            for key in keys:
                state.core.touch_key(check_key(key))
            state.counters.queries += len(keys)
            state.counters.hit(t, len(keys))

    def unpin_many(self, pins: list[tuple[bytes, int]], *, after_copy: bool = True
                   ) -> list[bool]:
        """`unpin` of each ``(key, pin)``, under one hold of the lock."""
        state = self.state
        with state.lock:
            out = []
            id_of, unpin = state.core.id_of, state.unpin
            for key, pin in pins:
                intact = unpin(id_of(key), pin)
                if not intact:
                    state.counters.torn_reads += after_copy
                out.append(intact)
            return out

    def unpin(self, key: bytes, pin: int, *, after_copy: bool = True) -> bool:
        state = self.state
        with state.lock:
            if not state.unpin(state.core.id_of(key), pin):
                state.counters.torn_reads += after_copy
                return False
            return True

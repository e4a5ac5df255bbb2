"""A tier over one preallocated memory pool: host DRAM or GPU HBM.

    pool  | span of slabs | slab | ...   (see `kvstore.tiers.slab`)
    key -> (offset, nbytes)              (committed values only; and offset -> key)

Writes go through reserve -> copy -> commit so the Store can copy outside its lock: a
reserved slot belongs to no key and cannot be evicted; `commit` makes it visible.

Invariants: a committed key owns exactly one slot; ``used_bytes`` (slot bytes of
committed and reserved values) never exceeds ``capacity_bytes``.
"""

from __future__ import annotations

from typing import Any, Protocol

from kvstore.buffers import ByteView, copy_bytes, output_view, to_bytes, value_view
from kvstore.errors import InvalidValueError, StoreClosedError
from kvstore.tiers.base import TierKind, check_key
from kvstore.tiers.slab import SlabAllocator


class Pool(Protocol):
    nbytes: int

    def view(self, offset: int, nbytes: int) -> ByteView: ...
    @property
    def base_address(self) -> int: ...
    def close(self) -> None: ...



class MemoryTier:
    """Values in slots of a pool; see the module docstring."""

    def __init__(self, kind: TierKind, pool: Pool, max_value_bytes: int) -> None:
        self.kind = kind
        self.pool = pool
        self.max_value_bytes = max_value_bytes
        self.allocator = SlabAllocator(pool.nbytes, max_value_bytes)
        self.capacity_bytes = self.allocator.capacity_bytes
        self._slots: dict[bytes, tuple[int, int]] = {}
        self._key_at: dict[int, bytes] = {}  # offset -> key of each committed slot
        self._parents: dict[bytes, bytes | None] = {}
        # A shared pool's directory (`kvstore.shm.directory`): told of every slot a
        # key gains, and of every slot it loses before that slot is freed.
        self.directory = getattr(pool, "directory", None)
        self._closed = False

    # -- reserve / commit: the Store's path -------------------------------------------------

    @property
    def used_bytes(self) -> int:
        return self.allocator.used_bytes

    def can_allocate(self, nbytes: int) -> bool:
        return self.allocator.can_allocate(nbytes)

    def reserve(self, nbytes: int) -> int | None:
        """A slot for ``nbytes`` owned by nobody yet, or None if the tier has no room."""
        self._check_open()
        if nbytes > self.max_value_bytes:
            raise InvalidValueError(f"value of {nbytes} bytes exceeds max_value_bytes "
                                    f"({self.max_value_bytes})")
        return self.allocator.allocate(nbytes)

    def view(self, offset: int, nbytes: int) -> ByteView:
        return self.pool.view(offset, nbytes)

    def release(self, offset: int) -> None:
        """Give back a reserved slot that was never committed."""
        self.allocator.free(offset)

    def commit(self, key: bytes, offset: int, nbytes: int, parent: bytes | None = None) -> None:
        """Make a reserved slot the value of ``key`` (replacing any earlier value)."""
        self.evict(key)
        self._slots[key] = (offset, nbytes)
        self._key_at[offset] = key
        self._parents[key] = parent
        if self.directory is not None:
            self.directory.insert(key, offset, nbytes)

    def slot_of(self, key: bytes) -> tuple[int, int] | None:
        return self._slots.get(key)

    def owners(self) -> dict[int, bytes]:
        """The key of each committed slot, by offset (reserved and detached slots have
        none): the tier's own map, kept as slots are committed and freed (read it, do not
        change it)."""
        return self._key_at

    # -- the Tier contract -------------------------------------------------------------------

    def put(self, key: bytes, value: Any, parent: bytes | None = None) -> bool:
        key = check_key(key)
        src = value_view(value)
        nbytes = int(src.shape[0])
        offset = self.reserve(nbytes)
        if offset is None:
            return False
        copy_bytes(self.pool.view(offset, nbytes), src)
        self.commit(key, offset, nbytes, parent)
        return True

    def get(self, key: bytes) -> bytes | None:
        return self.read_bytes(check_key(key))

    def read_bytes(self, key: bytes) -> bytes | None:
        """`get` for a caller that checked ``key``."""
        slot = self._slots.get(key)
        return None if slot is None else to_bytes(self.pool.view(*slot))

    def read_into(self, key: bytes, out: Any) -> bool:
        slot = self._slots.get(check_key(key))
        if slot is None:
            return False
        copy_bytes(output_view(out, slot[1]), self.pool.view(*slot))
        return True

    def read_exact(self, key: bytes, dst: Any) -> bool:
        """`read_into` for a checked key and a byte view of the value's size; a value of
        another size (changed since the caller looked) is a miss."""
        slot = self._slots.get(key)
        if slot is None or slot[1] != dst.shape[0]:
            return False
        copy_bytes(dst, self.pool.view(*slot))
        return True

    def nbytes_of(self, key: bytes) -> int | None:
        slot = self._slots.get(key)
        return None if slot is None else slot[1]

    def parent_of(self, key: bytes) -> bytes | None:
        return self._parents.get(key)

    def evict(self, key: bytes) -> bool:
        slot = self._slots.pop(key, None)
        if slot is None:
            return False
        del self._key_at[slot[0]]
        self._parents.pop(key, None)
        if self.directory is not None:
            self.directory.remove(key)
        self.allocator.free(slot[0])
        return True

    delete = evict  # memory is not durable: forgetting is deleting

    def detach(self, key: bytes) -> int | None:
        """Forget ``key`` but keep its slot allocated (readers are still copying from it);
        the caller gives the offset back with `release` later."""
        slot = self._slots.pop(key, None)
        self._parents.pop(key, None)
        if slot is None:
            return None
        del self._key_at[slot[0]]
        if self.directory is not None:
            self.directory.remove(key)
        return slot[0]

    def __contains__(self, key: object) -> bool:
        return key in self._slots

    def __len__(self) -> int:
        return len(self._slots)

    def flush(self) -> None:
        """Memory holds nothing durable; the Store writes it to NVMe on flush."""

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._slots.clear()
            self._key_at.clear()
            self.pool.close()

    def stats(self) -> dict[str, Any]:
        return {"capacity_bytes": self.capacity_bytes, "used_bytes": self.used_bytes,
                "blocks": len(self._slots), **self.allocator.stats(),
                "pinned": bool(getattr(self.pool, "is_pinned", False))}

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError(f"the {self.kind.value} tier is closed")

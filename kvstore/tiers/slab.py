"""A slab allocator with size classes over one preallocated pool (pure Python).

The pool is cut into equal slabs; a slab is handed to one size class on demand and cut
into equal slots of that class. Slot offsets are what the tiers store.

    pool  | slab 0 (class 4 KiB) | slab 1 (class 1 MiB) | slab 2 (free) | ...
    slab  | slot | slot | slot | ... |   (slot_bytes = the class size)

Size classes are 2**k * {1, 1.25, 1.5, 1.75}, rounded up to ``ALIGN_BYTES``, so a value
wastes at most about 20% of its slot (internal fragmentation, reported in ``stats``).
A slab with no used slot returns to the free-slab list and can serve any class, so there
is no external fragmentation beyond the slots of partly used slabs.

Invariants: ``used_bytes <= capacity_bytes``; a slot is either in its slab's free list or
allocated, never both; every offset is ``ALIGN_BYTES``-aligned (16-byte vector loads).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

ALIGN_BYTES = 64
_STEPS = (4, 5, 6, 7)  # quarters of a power of two


@lru_cache(maxsize=4096)
def size_class(nbytes: int) -> int:
    """The slot size that holds ``nbytes``: the smallest 2**k * step/4 >= nbytes, aligned."""
    nbytes = max(nbytes, ALIGN_BYTES)
    power = 1 << (nbytes - 1).bit_length() - 1  # largest power of two <= nbytes - 1 (>= 1)
    for step in _STEPS:
        size = power * step // 4
        if size >= nbytes:
            break
    else:
        size = power * 2
    return -(-size // ALIGN_BYTES) * ALIGN_BYTES


@dataclass(slots=True)
class _Slab:
    offset: int
    slot_bytes: int = 0
    free_slots: list[int] = field(default_factory=list)
    num_used: int = 0
    is_partial: bool = False  # listed in its class's stack of slabs with a free slot


class SlabAllocator:
    """Offsets into a pool of ``capacity_bytes``, for values up to ``max_value_bytes``."""

    def __init__(self, capacity_bytes: int, max_value_bytes: int) -> None:
        if max_value_bytes <= 0:
            raise ValueError("max_value_bytes must be positive")
        self.slab_bytes = size_class(max_value_bytes)
        self.num_slabs = capacity_bytes // self.slab_bytes
        self.capacity_bytes = self.num_slabs * self.slab_bytes
        self._slabs = [_Slab(i * self.slab_bytes) for i in range(self.num_slabs)]
        self._free_slabs = list(range(self.num_slabs - 1, -1, -1))
        # slot_bytes -> stack of slab ids with a free slot (a list: O(1) push and pop).
        self._partial: dict[int, list[int]] = {}
        self._allocated: dict[int, int] = {}  # offset -> requested bytes
        self.used_bytes = 0  # slot bytes handed out
        self.value_bytes = 0  # bytes actually requested

    def allocate(self, nbytes: int) -> int | None:
        """A free slot's offset for ``nbytes``, or None if no slot of its class is free."""
        slot_bytes = size_class(nbytes)
        if slot_bytes > self.slab_bytes:
            raise ValueError(f"{nbytes} bytes exceeds the largest slot ({self.slab_bytes})")
        partial = self._partial.get(slot_bytes)
        if partial is None:
            partial = self._partial[slot_bytes] = []
        if partial:
            slab = self._slabs[partial[-1]]
        elif self._free_slabs:
            slab_id = self._free_slabs.pop()
            slab = self._slabs[slab_id]
            slab.slot_bytes = slot_bytes
            count = self.slab_bytes // slot_bytes
            slab.free_slots = [slab.offset + i * slot_bytes for i in range(count - 1, -1, -1)]
            slab.is_partial = True
            partial.append(slab_id)
        else:
            return None
        offset = slab.free_slots.pop()
        slab.num_used += 1
        if not slab.free_slots:
            slab.is_partial = False
            partial.pop()
        self._allocated[offset] = nbytes
        self.used_bytes += slot_bytes
        self.value_bytes += nbytes
        assert self.used_bytes <= self.capacity_bytes, "slab allocator overcommitted"
        return offset

    def free(self, offset: int) -> None:
        nbytes = self._allocated.pop(offset, None)
        if nbytes is None:
            raise ValueError(f"offset {offset} is not allocated")
        slab_id = offset // self.slab_bytes
        slab = self._slabs[slab_id]
        slab.free_slots.append(offset)
        slab.num_used -= 1
        self.used_bytes -= slab.slot_bytes
        self.value_bytes -= nbytes
        partial = self._partial[slab.slot_bytes]
        if slab.num_used == 0:
            if slab.is_partial:
                partial.remove(slab_id)  # O(slabs of the class), only when a slab empties
            slab.is_partial = False
            slab.free_slots = []
            slab.slot_bytes = 0
            self._free_slabs.append(slab_id)
        elif not slab.is_partial:
            slab.is_partial = True
            partial.append(slab_id)

    def can_allocate(self, nbytes: int) -> bool:
        return bool(self._partial.get(size_class(nbytes))) or bool(self._free_slabs)

    def slot_bytes_of(self, offset: int) -> int:
        return self._slabs[offset // self.slab_bytes].slot_bytes

    def partition_of(self, nbytes: int) -> int:
        """The eviction partition of a value: its size class."""
        return size_class(nbytes)

    def slab_to_reclaim(self, exclude_class: int) -> list[int]:
        """Allocated offsets of the least-used slab of another class: evicting them frees it."""
        best: _Slab | None = None
        for slab in self._slabs:
            if slab.num_used and slab.slot_bytes != exclude_class:
                if best is None or slab.num_used < best.num_used:
                    best = slab
        if best is None:
            return []
        count = self.slab_bytes // best.slot_bytes
        free = set(best.free_slots)
        return [best.offset + i * best.slot_bytes for i in range(count)
                if best.offset + i * best.slot_bytes not in free]

    def stats(self) -> dict[str, float | int]:
        slabs_in_use = self.num_slabs - len(self._free_slabs)
        return {
            "slab_bytes": self.slab_bytes,
            "slabs": self.num_slabs,
            "slabs_in_use": slabs_in_use,
            "slot_bytes_used": self.used_bytes,
            "value_bytes": self.value_bytes,
            # Share of handed-out slot bytes not holding value bytes (size-class rounding).
            "internal_fragmentation": (1 - self.value_bytes / self.used_bytes
                                       if self.used_bytes else 0.0),
            # Share of bytes in assigned slabs not handed out (free slots of partly used slabs).
            "slab_fragmentation": (1 - self.used_bytes / (slabs_in_use * self.slab_bytes)
                                   if slabs_in_use else 0.0),
        }

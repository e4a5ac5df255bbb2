"""A slab allocator with size classes over one preallocated pool (pure Python).

The pool is cut into equal slabs. A size class takes *spans* of contiguous slabs on
demand and cuts each into equal slots of that class; slot offsets are what the tiers
store.

    pool  | slab 0 | slab 1   slab 2   slab 3   slab 4 | slab 5 | ...
          | a span | one span of the 20 KiB class       | free   |
          | 4 KiB  | slot     | slot     | slot     |tail|        |   (16 KiB slabs)

Size classes are 2**k * {1, 1.25, 1.5, 1.75}, rounded up to ``ALIGN_BYTES``, so a value
wastes at most about 20% of its slot (internal fragmentation, reported in ``stats``).

Slabs (`slab_bytes_for`): a large pool uses slabs of the largest value's class, so every
span is one slab (memcached's rule). A pool with fewer than ``MIN_SLABS`` of those uses
smaller slabs, the largest power of two that leaves ``MIN_SLABS`` of them (not below
``MIN_SLAB_BYTES``), so that every size class in use can have some: with one slab per
largest value, a 1 MiB pool for 1 MiB values held one value of any size.

Spans (`SlabAllocator.span_slabs`): the fewest whole slabs that hold a slot and leave at
most an eighth of the span past its last slot (20 KiB slots in 16 KiB slabs: 4 slabs,
3 slots), but not more than an eighth of the pool's slabs unless one slot needs more
(a pool of a few slabs keeps one slab per span). A value larger than a slab takes a run
of contiguous slabs. One-slab spans are taken from the bottom of the pool and longer ones
from the top, so that free slabs stay contiguous; slots are handed out lowest first, so
the values of a chain put one after another (a fetch's blocks) lie at ascending addresses,
which a GPU fetch from HBM copies in runs of one DMA each.

A span with no used slot returns its slabs to the free ones, which can serve any class.
When no span of a class has a free slot and no run of free slabs is long enough, the
caller frees room with `SlabAllocator.reclaim_window`: the cheapest window of contiguous
slabs whose values may all go.

Invariants (checked in ``tests/tiers/test_slab.py``): ``used_bytes`` is the sum of the
slot bytes handed out and never exceeds ``capacity_bytes``; a slab is free or in exactly
one span; a slot is either in its span's free list or allocated, never both, and lies
inside its span; every offset is ``ALIGN_BYTES``-aligned (16-byte vector loads).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

ALIGN_BYTES = 64
MIN_SLABS = 64  # a pool smaller than this many slabs of the largest value gets smaller ones
MIN_SLAB_BYTES = 4096
_STEPS = (4, 5, 6, 7)  # quarters of a power of two
_TAIL_FRACTION = 8  # a span leaves at most 1/8 of itself past its last slot


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


def slab_bytes_for(pool_bytes: int, max_value_bytes: int) -> int:
    """The slab size of a pool for values up to ``max_value_bytes`` (module docstring)."""
    largest = size_class(max_value_bytes)
    if pool_bytes // largest >= MIN_SLABS:
        return largest
    share = max(pool_bytes // MIN_SLABS, 1)
    return min(largest, max(MIN_SLAB_BYTES, 1 << share.bit_length() - 1))


def pool_holds(pool_bytes: int, max_value_bytes: int) -> bool:
    """Whether a pool of ``pool_bytes`` has room for one value of ``max_value_bytes``."""
    slab_bytes = slab_bytes_for(pool_bytes, max_value_bytes)
    return -(-size_class(max_value_bytes) // slab_bytes) <= pool_bytes // slab_bytes


@dataclass(slots=True, eq=False)  # identity: spans are hashed and compared as objects
class _Span:
    first_slab: int
    num_slabs: int
    slot_bytes: int
    free_slots: list[int] = field(default_factory=list)
    num_used: int = 0
    is_partial: bool = False  # listed in its class's stack of spans with a free slot


class SlabAllocator:
    """Offsets into a pool of ``capacity_bytes``, for values up to ``max_value_bytes``."""

    def __init__(self, capacity_bytes: int, max_value_bytes: int) -> None:
        if max_value_bytes <= 0:
            raise ValueError("max_value_bytes must be positive")
        self.max_slot_bytes = size_class(max_value_bytes)
        self.slab_bytes = slab_bytes_for(capacity_bytes, max_value_bytes)
        self.num_slabs = capacity_bytes // self.slab_bytes
        self.capacity_bytes = self.num_slabs * self.slab_bytes
        self.num_free_slabs = self.num_slabs
        self._free = bytearray(b"\x01" * self.num_slabs)  # 1 where a slab is in no span
        self._span_at: list[_Span | None] = [None] * self.num_slabs  # the span of each slab
        self._span_slabs: dict[int, int] = {}  # slot_bytes -> slabs per span
        # slot_bytes -> stack of spans with a free slot (a list: O(1) push and pop).
        self._partial: dict[int, list[_Span]] = {}
        self._allocated: dict[int, int] = {}  # offset -> requested bytes
        self.used_bytes = 0  # slot bytes handed out
        self.value_bytes = 0  # bytes actually requested

    def span_slabs(self, slot_bytes: int) -> int:
        """How many contiguous slabs a span of ``slot_bytes`` slots takes."""
        num_slabs = self._span_slabs.get(slot_bytes)
        if num_slabs is None:
            fewest = -(-slot_bytes // self.slab_bytes)  # one slot
            num_slabs = fewest
            while True:
                span_bytes = num_slabs * self.slab_bytes
                if span_bytes % slot_bytes * _TAIL_FRACTION <= span_bytes:
                    break
                # A few rounds at most: slots and slabs are both 2**k times a quarter step
                # (slots of 4 slabs or more fill whole slabs, 1.25 slabs take 4 for 3).
                num_slabs += 1
            num_slabs = max(fewest, min(num_slabs, self.num_slabs // _TAIL_FRACTION))
            self._span_slabs[slot_bytes] = num_slabs
        return num_slabs

    def allocate(self, nbytes: int) -> int | None:
        """A free slot's offset for ``nbytes``, or None if no slot of its class is free and
        no run of free slabs can take a new span of it."""
        slot_bytes = size_class(nbytes)
        if slot_bytes > self.max_slot_bytes:
            raise ValueError(f"{nbytes} bytes exceeds the largest slot ({self.max_slot_bytes})")
        partial = self._partial.get(slot_bytes)
        if partial is None:
            partial = self._partial[slot_bytes] = []
        if partial:
            span = partial[-1]
        else:
            span = self._new_span(slot_bytes)
            if span is None:
                return None
            span.is_partial = True
            partial.append(span)
        offset = span.free_slots.pop()
        span.num_used += 1
        if not span.free_slots:
            span.is_partial = False
            partial.pop()
        self._allocated[offset] = nbytes
        self.used_bytes += slot_bytes
        self.value_bytes += nbytes
        assert self.used_bytes <= self.capacity_bytes, "slab allocator overcommitted"
        return offset

    def _new_span(self, slot_bytes: int) -> _Span | None:
        num_slabs = self.span_slabs(slot_bytes)
        if num_slabs > self.num_free_slabs:
            return None
        # One-slab spans from the bottom (ascending: chains put in order lie in order, as
        # the copy engines' DMA runs want), runs from the top: free slabs stay together.
        first = self._free.find(1) if num_slabs == 1 else self._free.rfind(b"\x01" * num_slabs)
        if first < 0:
            return None
        self._free[first:first + num_slabs] = bytes(num_slabs)
        self.num_free_slabs -= num_slabs
        span = _Span(first, num_slabs, slot_bytes)
        self._span_at[first:first + num_slabs] = [span] * num_slabs
        start = first * self.slab_bytes
        count = num_slabs * self.slab_bytes // slot_bytes
        span.free_slots = list(range(start + (count - 1) * slot_bytes, start - 1, -slot_bytes))
        return span

    def free(self, offset: int) -> None:
        nbytes = self._allocated.pop(offset, None)
        if nbytes is None:
            raise ValueError(f"offset {offset} is not allocated")
        span = self._span_at[offset // self.slab_bytes]
        assert span is not None, "an allocated slot lies in a span"
        span.free_slots.append(offset)
        span.num_used -= 1
        self.used_bytes -= span.slot_bytes
        self.value_bytes -= nbytes
        if span.num_used == 0:
            if span.is_partial:
                # O(spans of the class), only when a span empties
                self._partial[span.slot_bytes].remove(span)
            first, num_slabs = span.first_slab, span.num_slabs
            self._span_at[first:first + num_slabs] = [None] * num_slabs
            self._free[first:first + num_slabs] = b"\x01" * num_slabs
            self.num_free_slabs += num_slabs
        elif not span.is_partial:
            span.is_partial = True
            self._partial[span.slot_bytes].append(span)

    def can_allocate(self, nbytes: int) -> bool:
        slot_bytes = size_class(nbytes)
        if self._partial.get(slot_bytes):
            return True
        num_slabs = self.span_slabs(slot_bytes)
        return (num_slabs <= self.num_free_slabs
                and self._free.find(b"\x01" * num_slabs) >= 0)

    def slot_bytes_of(self, offset: int) -> int:
        span = self._span_at[offset // self.slab_bytes]
        return 0 if span is None else span.slot_bytes

    def partition_of(self, nbytes: int) -> int:
        """The eviction partition of a value: its size class. Freeing any value of a class
        leaves a slot for another of that class."""
        return size_class(nbytes)

    def reclaim_window(self, nbytes: int, can_free: Callable[[int], bool]) -> list[int] | None:
        """The allocated offsets to free so that a value of ``nbytes`` finds room: those of
        the spans over the cheapest window of contiguous slabs that a new span of its class
        needs, among the windows whose every allocated slot passes ``can_free``; None if no
        window does ([] if a window is free already). Cheapest: the fewest slot bytes to
        free, then the fewest values.

        Freeing them frees every span over the window, each whole, so the window's slabs
        are then free. Only windows that start where a span or a run of free slabs starts
        are weighed: one that starts inside a segment covers that segment's window's
        spans and maybe more. ``can_free`` is asked about the cheapest windows' slots
        only, until one passes. O(segments x width) steps: a few ms for thousands of slabs,
        15-20 ms for 32768 (512 GiB in 16 MiB slabs); the Store calls it only when a size
        class has no victim.
        """
        width = self.span_slabs(size_class(nbytes))
        segments = self._segments()
        num_segments = len(segments)
        windows = []  # (slot bytes, values, first segment, end segment): a heap
        for a in range(num_segments):
            used = values = covered = 0
            b = a
            while covered < width and b < num_segments:
                _, num_slabs, span = segments[b]
                if span is not None:
                    used += span.num_used * span.slot_bytes
                    values += span.num_used
                covered += num_slabs
                b += 1
            if covered < width:
                break  # this window and every later one run past the pool's end
            windows.append((used, values, a, b))
        heapq.heapify(windows)  # popped cheapest first: the first usually passes
        passes: dict[int, bool] = {}  # first slab of a span -> all its slots may be freed
        while windows:
            _, _, a, b = heapq.heappop(windows)
            spans = [span for _, _, span in segments[a:b] if span is not None]
            if all(self._may_free(span, can_free, passes) for span in spans):
                return [offset for span in spans for offset in self._used_slots(span)]
        return None

    def _segments(self) -> list[tuple[int, int, _Span | None]]:
        """The pool as (first slab, slabs, span), a run of free slabs having span None."""
        segments: list[tuple[int, int, _Span | None]] = []
        span_at, free, first = self._span_at, self._free, 0
        while first < self.num_slabs:
            span = span_at[first]
            if span is None:
                end = free.find(0, first)
                end = self.num_slabs if end < 0 else end
                segments.append((first, end - first, None))
                first = end
            else:
                segments.append((first, span.num_slabs, span))
                first += span.num_slabs
        return segments

    def _may_free(self, span: _Span, can_free: Callable[[int], bool],
                  passes: dict[int, bool]) -> bool:
        verdict = passes.get(span.first_slab)
        if verdict is None:
            verdict = passes[span.first_slab] = all(map(can_free, self._used_slots(span)))
        return verdict

    def _used_slots(self, span: _Span) -> list[int]:
        start = span.first_slab * self.slab_bytes
        count = span.num_slabs * self.slab_bytes // span.slot_bytes
        free = set(span.free_slots)
        return [offset for offset in range(start, start + count * span.slot_bytes,
                                           span.slot_bytes) if offset not in free]

    def stats(self) -> dict[str, float | int]:
        slabs_in_use = self.num_slabs - self.num_free_slabs
        return {
            "slab_bytes": self.slab_bytes,
            "slabs": self.num_slabs,
            "slabs_in_use": slabs_in_use,
            "slot_bytes_used": self.used_bytes,
            "value_bytes": self.value_bytes,
            # Share of handed-out slot bytes not holding value bytes (size-class rounding).
            "internal_fragmentation": (1 - self.value_bytes / self.used_bytes
                                       if self.used_bytes else 0.0),
            # Share of bytes in spans not handed out (free slots, the tails of spans).
            "slab_fragmentation": (1 - self.used_bytes / (slabs_in_use * self.slab_bytes)
                                   if slabs_in_use else 0.0),
        }

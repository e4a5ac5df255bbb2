"""Tests for `kvstore.tiers.slab`: size classes and the slab allocator's invariants."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
)

from kvstore.tiers.slab import (
    ALIGN_BYTES,
    MIN_SLAB_BYTES,
    MIN_SLABS,
    SlabAllocator,
    pool_holds,
    size_class,
    slab_bytes_for,
)


def reference_size_class(nbytes: int) -> int:
    """Smallest 2**k * {1, 1.25, 1.5, 1.75} >= max(nbytes, 64), rounded up to 64 bytes."""
    nbytes = max(nbytes, 64)
    best = None
    for k in range(5, 64):
        for quarters in (4, 5, 6, 7):
            size = (1 << k) * quarters // 4
            if size >= nbytes and (best is None or size < best):
                best = size
        if best is not None and (1 << k) >= nbytes:
            break
    assert best is not None
    return (best + 63) // 64 * 64


# -- size classes ---------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(nbytes=st.integers(0, 1 << 40))
def test_size_class_holds_value_and_is_aligned(nbytes: int) -> None:
    slot = size_class(nbytes)
    assert slot >= nbytes
    assert slot >= ALIGN_BYTES
    assert slot % 64 == 0
    assert ALIGN_BYTES == 64


@settings(max_examples=300, deadline=None)
@given(nbytes=st.integers(256, 1 << 40))
def test_size_class_waste_is_bounded(nbytes: int) -> None:
    assert size_class(nbytes) * 4 <= nbytes * 5  # at most 25% over, exactly


@settings(max_examples=300, deadline=None)
@given(nbytes=st.integers(0, 1 << 34))
def test_size_class_matches_reference(nbytes: int) -> None:
    assert size_class(nbytes) == reference_size_class(nbytes)


@pytest.mark.parametrize("k", range(6, 41))
def test_powers_of_two_are_exact(k: int) -> None:
    assert size_class(1 << k) == 1 << k
    assert size_class((1 << k) + 1) > 1 << k


@pytest.mark.parametrize(("nbytes", "expected"), [
    (-5, 64), (0, 64), (1, 64), (64, 64), (65, 128), (100, 128), (129, 192), (193, 256),
    (256, 256), (257, 320), (320, 320), (321, 384), (449, 512), (1000, 1024), (1025, 1280),
    (3000, 3072), (4096, 4096), (2 * 1024 * 1024, 2 * 1024 * 1024),
    (2 * 1024 * 1024 + 1, 2621440),
])
def test_size_class_known_values(nbytes: int, expected: int) -> None:
    assert size_class(nbytes) == expected


@settings(max_examples=200, deadline=None)
@given(a=st.integers(0, 1 << 30), b=st.integers(0, 1 << 30))
def test_size_class_is_monotonic(a: int, b: int) -> None:
    if a <= b:
        assert size_class(a) <= size_class(b)
    else:
        assert size_class(a) >= size_class(b)


# -- slabs and spans -----------------------------------------------------------------------------

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


@pytest.mark.parametrize(("pool_bytes", "max_value_bytes", "slab_bytes"), [
    (1 * GiB, 16 * MiB, 16 * MiB),  # 64 slabs of the largest value: as before
    (64 * GiB, 16 * MiB, 16 * MiB),
    (1 * MiB, 1 * MiB, 16 * KiB),  # a small pool: 64 slabs smaller than the largest value
    (8 * MiB, 2 * MiB, 128 * KiB),
    (16 * MiB, 1 * MiB, 256 * KiB),
    (3 * 4096, 4096, 4096),  # not below 4 KiB, so a tiny pool keeps few slabs ...
    (10 * KiB, 1 * KiB, 1 * KiB),  # ... but never above the largest value's class
    (100 * MiB, 3 * MiB, 1 * MiB),  # 1.5 MiB slabs would be 66: a power of two below
])
def test_slab_bytes_for(pool_bytes: int, max_value_bytes: int, slab_bytes: int) -> None:
    assert slab_bytes_for(pool_bytes, max_value_bytes) == slab_bytes
    alloc = SlabAllocator(pool_bytes, max_value_bytes)
    assert alloc.slab_bytes == slab_bytes
    assert alloc.capacity_bytes == pool_bytes // slab_bytes * slab_bytes


@settings(max_examples=300, deadline=None)
@given(pool_bytes=st.one_of(st.integers(0, 1 << 22), st.integers(0, 1 << 36)),
       max_value_bytes=st.one_of(st.integers(1, 1 << 20), st.integers(1, 1 << 26)))
def test_slabs_are_aligned_and_many_unless_the_pool_is_tiny(pool_bytes: int,
                                                            max_value_bytes: int) -> None:
    slab = slab_bytes_for(pool_bytes, max_value_bytes)
    largest = size_class(max_value_bytes)
    assert slab % ALIGN_BYTES == 0
    assert slab <= largest
    if pool_bytes // largest >= MIN_SLABS:
        assert slab == largest  # a large pool: one slab per largest value, as before
    elif pool_bytes // slab < MIN_SLABS:
        assert slab == min(MIN_SLAB_BYTES, largest)  # a tiny pool
    else:  # the largest power of two that leaves MIN_SLABS slabs
        assert slab & (slab - 1) == 0 and pool_bytes // (2 * slab) < MIN_SLABS
    # pool_holds: a value of max_value_bytes gets a slot, exactly when it says so.
    alloc = SlabAllocator(pool_bytes, max_value_bytes) if pool_bytes < 1 << 26 else None
    if alloc is not None:
        offset = alloc.allocate(max_value_bytes)
        assert (offset is not None) == pool_holds(pool_bytes, max_value_bytes)
        if size_class(max_value_bytes) <= pool_bytes // 2:
            assert pool_holds(pool_bytes, max_value_bytes)


@settings(max_examples=300, deadline=None)
@given(pool_bytes=st.integers(4 * KiB, 1 << 31), max_value_bytes=st.integers(1, 1 << 25),
       data=st.data())
def test_span_is_the_fewest_slabs_wasting_at_most_an_eighth(pool_bytes: int,
                                                            max_value_bytes: int,
                                                            data: st.DataObject) -> None:
    alloc = SlabAllocator(pool_bytes, max_value_bytes)
    slot = size_class(data.draw(st.integers(1, max_value_bytes)))
    slab = alloc.slab_bytes

    def tail_ok(num_slabs: int) -> bool:
        return num_slabs * slab % slot * 8 <= num_slabs * slab

    fewest = -(-slot // slab)
    got = alloc.span_slabs(slot)
    assert got >= fewest  # one slot fits
    assert got * slab // slot >= 1
    assert all(not tail_ok(n) for n in range(fewest, got))  # none fewer would do
    cap = max(fewest, alloc.num_slabs // 8)  # an eighth of the pool beyond one slot's
    assert tail_ok(got) or got == cap
    assert got <= cap
    assert got <= max(fewest, 7)  # slot classes of power-of-two quarters: a short search


# -- the allocator: a model-checked random workload -----------------------------------------------


@dataclass
class ModelSpan:
    slot_bytes: int
    num_slabs: int
    num_slots: int
    live: set[int] = field(default_factory=set)


class AllocatorMachine(RuleBasedStateMachine):
    """Random allocate/free/reclaim against a model of the spans the answers imply.

    The model learns a span where the allocator opens one (a slot of a class with no
    span that has a free slot: the span's first slot) and forgets it when its last slot
    is freed; every answer is checked against it.
    """

    POOL_BYTES = 24 * 4096 + 1000  # the odd tail is not usable
    MAX_VALUE_BYTES = 64 * KiB  # 16 slabs of 4 KiB: values larger than a slab take runs
    SIZES = st.one_of(st.integers(0, 64 * KiB),
                      st.sampled_from([64, 100, 1000, 3000, 4096, 5000, 6000, 10_000,
                                       20_000, 64 * KiB]))

    offsets = Bundle("offsets")

    def __init__(self) -> None:
        super().__init__()
        self.alloc = SlabAllocator(self.POOL_BYTES, self.MAX_VALUE_BYTES)
        self.slab = self.alloc.slab_bytes
        self.live: dict[int, int] = {}  # offset -> requested bytes
        self.spans: dict[int, ModelSpan] = {}  # first slab -> span

    # -- the model ------------------------------------------------------------------------------

    def span_of_slab(self) -> dict[int, int]:
        return {first + i: first for first, span in self.spans.items()
                for i in range(span.num_slabs)}

    def has_free_run(self, num_slabs: int) -> bool:
        taken = self.span_of_slab()
        return any(all(s not in taken for s in range(first, first + num_slabs))
                   for first in range(self.alloc.num_slabs - num_slabs + 1))

    def span_containing(self, offset: int) -> int:
        return self.span_of_slab()[offset // self.slab]

    def forget(self, offset: int) -> None:
        first = self.span_containing(offset)
        self.spans[first].live.discard(offset)
        if not self.spans[first].live:
            del self.spans[first]
        del self.live[offset]

    # -- rules ----------------------------------------------------------------------------------

    @rule(target=offsets, data=st.data())
    def allocate(self, data: st.DataObject) -> int:
        nbytes = data.draw(self.SIZES)  # the machine's own (a subclass's) sizes
        slot = reference_size_class(nbytes)
        num_slabs = self.alloc.span_slabs(slot)
        partial = {first for first, span in self.spans.items()
                   if span.slot_bytes == slot and len(span.live) < span.num_slots}
        can_open = self.has_free_run(num_slabs)
        offset = self.alloc.allocate(nbytes)
        if offset is None:
            assert not partial and not can_open, "None while a slot was available"
            assert not self.alloc.can_allocate(nbytes)
            return -1
        assert offset not in self.live, "offset handed out twice"
        if partial:
            first = self.span_containing(offset)
            assert first in partial, "a new span while one of the class had room"
        else:
            assert offset % self.slab == 0, "a new span starts at a slab"
            first = offset // self.slab
            taken = self.span_of_slab()
            assert all(s not in taken for s in range(first, first + num_slabs)), \
                "a new span over slabs of another"
            assert first + num_slabs <= self.alloc.num_slabs
            self.spans[first] = ModelSpan(slot, num_slabs, num_slabs * self.slab // slot)
        span = self.spans[first]
        inside = offset - first * self.slab
        assert inside % slot == 0 and inside + slot <= span.num_slabs * self.slab, \
            "a slot off its span's grid"
        span.live.add(offset)
        self.live[offset] = nbytes
        assert self.alloc.slot_bytes_of(offset) == slot
        return offset

    @rule(offset=consumes(offsets))
    def free(self, offset: int) -> None:
        if offset == -1:
            return
        if offset not in self.live:  # already freed by another rule
            with pytest.raises(ValueError):
                self.alloc.free(offset)
            return
        self.alloc.free(offset)
        self.forget(offset)
        with pytest.raises(ValueError):
            self.alloc.free(offset)  # double free

    @precondition(lambda self: len(self.live) > 0)
    @rule(data=st.data())
    def free_random_many(self, data: st.DataObject) -> None:
        victims = data.draw(st.lists(st.sampled_from(sorted(self.live)), unique=True,
                                     max_size=8))
        for offset in victims:
            self.alloc.free(offset)
            self.forget(offset)

    @rule(data=st.data())
    def reclaim(self, data: st.DataObject) -> None:
        """reclaim_window names the live slots of the spans over the cheapest window whose
        slots may all be freed; freeing them makes room for the value."""
        nbytes = data.draw(self.SIZES)
        pinned = set(data.draw(st.lists(st.sampled_from(sorted(self.live)), max_size=6))
                     if self.live else [])
        asked: list[int] = []

        def can_free(offset: int) -> bool:
            assert offset in self.live, "asked about a slot that is not allocated"
            asked.append(offset)
            return offset not in pinned

        got = self.alloc.reclaim_window(nbytes, can_free)
        width = self.alloc.span_slabs(reference_size_class(nbytes))
        taken = self.span_of_slab()
        costs = {}  # cost -> spans, for every window whose spans may all be freed
        for start in range(self.alloc.num_slabs - width + 1):
            firsts = {taken[s] for s in range(start, start + width) if s in taken}
            spans = [self.spans[f] for f in firsts]
            if not any(span.live & pinned for span in spans):
                cost = (sum(s.slot_bytes * len(s.live) for s in spans),
                        sum(len(s.live) for s in spans))
                costs.setdefault(cost, []).append(firsts)
        if not costs:
            assert got is None
            return
        assert got is not None, "no window named while one could be freed"
        assert not set(got) & pinned
        firsts = {self.span_containing(offset) for offset in got}
        assert sorted(got) == sorted(o for f in firsts for o in self.spans[f].live), \
            "not whole spans"
        cheapest = min(costs)
        assert firsts in costs[cheapest], "not the cheapest window"
        if data.draw(st.booleans()):
            for offset in got:
                self.alloc.free(offset)
                self.forget(offset)
            assert self.has_free_run(width)
            offset = self.alloc.allocate(nbytes)
            assert offset is not None, "no room after freeing the window"
            self.alloc.free(offset)

    # -- invariants -----------------------------------------------------------------------------

    @invariant()
    def accounting(self) -> None:
        a = self.alloc
        assert a.capacity_bytes == a.num_slabs * a.slab_bytes <= self.POOL_BYTES
        assert a.used_bytes == sum(reference_size_class(n) for n in self.live.values())
        assert a.value_bytes == sum(self.live.values())
        assert a.used_bytes <= a.capacity_bytes
        stats = a.stats()
        assert stats["slot_bytes_used"] == a.used_bytes
        assert stats["slabs_in_use"] == sum(s.num_slabs for s in self.spans.values())

    @invariant()
    def placement(self) -> None:
        ordered = sorted(self.live)
        for off in ordered:
            slot = reference_size_class(self.live[off])
            assert off % ALIGN_BYTES == 0
            assert off >= 0 and off + slot <= self.alloc.capacity_bytes
        for a, b in itertools.pairwise(ordered):
            assert a + reference_size_class(self.live[a]) <= b, "slots overlap"
        classes: dict[int, set[int]] = {}
        for off, n in self.live.items():
            slot = reference_size_class(n)
            for slab in range(off // self.slab, (off + slot - 1) // self.slab + 1):
                classes.setdefault(slab, set()).add(slot)
        assert all(len(c) == 1 for c in classes.values()), "a slab serves two classes"

    def teardown(self) -> None:
        for offset in list(self.live):
            self.alloc.free(offset)
        assert self.alloc.used_bytes == 0
        assert self.alloc.value_bytes == 0
        assert self.alloc.stats()["slabs_in_use"] == 0
        # Every slab is free again: the largest value finds a run.
        assert self.alloc.allocate(self.MAX_VALUE_BYTES) is not None


class LargePoolAllocatorMachine(AllocatorMachine):
    """A pool of 64+ slabs of the largest value: each slab one span, but for the classes
    whose slots would leave more than an eighth of one slab (0.375, 0.625, 0.75 of it)."""

    POOL_BYTES = 70 * 4096
    MAX_VALUE_BYTES = 4096
    SIZES = st.one_of(st.integers(0, 4096),
                      st.sampled_from([64, 100, 1000, 1500, 2500, 3000, 4096]))


_machine_settings = settings(max_examples=60, stateful_step_count=60, deadline=None)
TestAllocatorMachine = AllocatorMachine.TestCase
TestAllocatorMachine.settings = _machine_settings
TestLargePoolAllocatorMachine = LargePoolAllocatorMachine.TestCase
TestLargePoolAllocatorMachine.settings = _machine_settings


@pytest.mark.parametrize(("pool_bytes", "max_value_bytes"),
                         [(16 * 64 * KiB, 64 * KiB), (1 * MiB, 1 * MiB)])
def test_random_workload_loop(pool_bytes: int, max_value_bytes: int) -> None:
    """A long seeded loop on top of the hypothesis machines: many slabs, many classes."""
    rng = random.Random(1234)
    alloc = SlabAllocator(pool_bytes, max_value_bytes)
    live: dict[int, int] = {}
    for _ in range(4000):
        if live and rng.random() < 0.45:
            off = rng.choice(list(live))
            alloc.free(off)
            del live[off]
            continue
        nbytes = rng.choice([rng.randint(1, 512), rng.randint(1, 8192),
                             rng.randint(1, max_value_bytes // 4),
                             rng.randint(1, max_value_bytes)])
        off = alloc.allocate(nbytes)
        if off is None:
            continue
        assert off not in live
        live[off] = nbytes
        assert off % 64 == 0 and off + size_class(nbytes) <= alloc.capacity_bytes
    ordered = sorted(live)
    for a, b in itertools.pairwise(ordered):
        assert a + reference_size_class(live[a]) <= b
    assert alloc.used_bytes == sum(reference_size_class(n) for n in live.values())
    assert alloc.used_bytes <= alloc.capacity_bytes
    for off in ordered:
        alloc.free(off)
    assert alloc.used_bytes == 0 and alloc.stats()["slabs_in_use"] == 0


# -- the allocator: specific behaviour ------------------------------------------------------------

SLAB = 4096


def test_a_small_pool_holds_values_of_mixed_sizes() -> None:
    """The issue's case: one slab per largest value (1 MiB) held one value of any size."""
    alloc = SlabAllocator(1 * MiB, 1 * MiB)
    rng = random.Random(15)
    sizes = [rng.randint(1 * KiB, 8 * KiB) for _ in range(50)]
    offsets = [alloc.allocate(n) for n in sizes]
    assert None not in offsets
    assert alloc.value_bytes == sum(sizes)
    # and a value as large as the pool still fits once they are gone
    assert alloc.allocate(1 * MiB) is None
    for offset in offsets:
        alloc.free(offset)
    assert alloc.allocate(1 * MiB) == 0


def test_a_large_pool_keeps_one_slab_per_span() -> None:
    alloc = SlabAllocator(1 * GiB, 16 * MiB)
    assert (alloc.slab_bytes, alloc.num_slabs) == (16 * MiB, 64)
    for nbytes in (1, 4 * KiB, 1 * MiB, 7 * MiB, 14 * MiB, 16 * MiB):
        assert alloc.span_slabs(size_class(nbytes)) == 1
    # Slots of 6, 10 and 12 MiB left 4, 6 and 4 MiB of a slab unused: spans of 2, 2, 3.
    assert [alloc.span_slabs(size_class(n) ) for n in (6 * MiB, 10 * MiB, 12 * MiB)] == [2, 2, 3]


def test_values_larger_than_a_slab_take_runs_of_slabs() -> None:
    alloc = SlabAllocator(64 * SLAB, 32 * SLAB)
    assert alloc.slab_bytes == SLAB
    run = alloc.allocate(32 * SLAB)
    assert run == 32 * SLAB and alloc.slot_bytes_of(run) == 32 * SLAB  # runs: from the top
    small = alloc.allocate(100)  # one-slab spans come from the bottom
    assert small == 0
    assert alloc.allocate(28 * SLAB) == 4 * SLAB  # the highest run that fits: 4..31
    assert alloc.stats()["slabs_in_use"] == 61
    assert alloc.allocate(4 * SLAB) is None  # 3 slabs free (1..3): no run of 4
    assert alloc.allocate(3 * SLAB) == 1 * SLAB
    alloc.free(run)
    assert alloc.allocate(4 * SLAB) == 60 * SLAB


@pytest.mark.parametrize(("pool_bytes", "max_value_bytes", "holds"), [
    (1 * MiB, 1 * MiB, True), (1 * MiB, 1 * MiB + 1, False),  # a slot of 1.25 MiB
    (6000, 5000, False), (8192, 5000, True),  # 4 KiB slabs: a 5 KiB slot takes two
    (64, 1, True), (63, 1, False),  # the smallest slot: 64 bytes
])
def test_pool_holds(pool_bytes: int, max_value_bytes: int, holds: bool) -> None:
    assert pool_holds(pool_bytes, max_value_bytes) is holds
    offset = SlabAllocator(pool_bytes, max_value_bytes).allocate(max_value_bytes)
    assert (offset is not None) is holds


def test_capacity_is_rounded_down_to_whole_slabs() -> None:
    alloc = SlabAllocator(10_000, 4096)
    assert alloc.slab_bytes == 4096
    assert alloc.num_slabs == 2
    assert alloc.capacity_bytes == 8192
    alloc = SlabAllocator(10_000, 3000)  # slab = size_class(3000) = 3072
    assert alloc.slab_bytes == 3072
    assert alloc.num_slabs == 3


def test_allocate_returns_none_when_full() -> None:
    alloc = SlabAllocator(2 * SLAB, SLAB)
    a = alloc.allocate(SLAB)
    b = alloc.allocate(SLAB - 1)
    assert {a, b} == {0, SLAB}
    assert alloc.allocate(SLAB) is None
    assert alloc.allocate(1) is None  # no free slab for another class either
    assert not alloc.can_allocate(1)
    alloc.free(a)
    assert alloc.can_allocate(1)
    smalls = [alloc.allocate(64) for _ in range(SLAB // 64)]
    assert None not in smalls
    assert sorted(smalls) == list(range(a, a + SLAB, 64))
    assert alloc.allocate(64) is None
    assert alloc.used_bytes == alloc.capacity_bytes == 2 * SLAB


def test_zero_capacity_allocates_nothing() -> None:
    alloc = SlabAllocator(100, SLAB)
    assert alloc.capacity_bytes == 0
    assert alloc.allocate(1) is None
    assert alloc.reclaim_window(1, lambda offset: True) is None


def test_too_large_value_raises() -> None:
    alloc = SlabAllocator(4 * SLAB, SLAB)
    with pytest.raises(ValueError):
        alloc.allocate(SLAB + 1)
    with pytest.raises(ValueError):
        SlabAllocator(4 * SLAB, 0)


def test_double_free_and_unknown_offset_raise() -> None:
    alloc = SlabAllocator(4 * SLAB, SLAB)
    off = alloc.allocate(100)
    other = alloc.allocate(100)
    alloc.free(off)
    with pytest.raises(ValueError):
        alloc.free(off)
    with pytest.raises(ValueError):
        alloc.free(other + 64 * 1000)  # never handed out
    with pytest.raises(ValueError):
        alloc.free(other + 1)  # inside a slot, not its start
    assert alloc.used_bytes == 128  # the failed frees changed nothing
    alloc.free(other)
    assert alloc.used_bytes == 0


def test_empty_span_serves_another_class() -> None:
    alloc = SlabAllocator(1 * SLAB, SLAB)
    small = [alloc.allocate(64) for _ in range(3)]
    assert alloc.allocate(1024) is None  # the one slab serves 64-byte slots
    assert alloc.slot_bytes_of(small[0]) == 64
    for off in small:
        alloc.free(off)
    assert alloc.stats()["slabs_in_use"] == 0
    big = alloc.allocate(1024)
    assert big == 0
    assert alloc.slot_bytes_of(big) == 1024
    assert alloc.partition_of(1000) == 1024


def test_reclaim_window_frees_the_cheapest_evictable_run() -> None:
    alloc = SlabAllocator(32 * SLAB, 4 * SLAB)  # 32 slabs of 4 KiB
    assert alloc.slab_bytes == SLAB
    # From the bottom: a 64-byte slot (slab 0), two 1 KiB slots (1), a 4 KiB slot (2);
    # from the top a span of 3 slabs for 3 KiB slots (29..31).
    a = alloc.allocate(64)
    b1, b2 = alloc.allocate(1024), alloc.allocate(1024)
    c = alloc.allocate(4096)
    d = alloc.allocate(3000)
    assert [o // SLAB for o in (a, b1, b2, c, d)] == [0, 1, 1, 2, 29]
    assert alloc.span_slabs(size_class(3000)) == 3
    assert alloc.reclaim_window(4096, lambda offset: True) == []  # room already
    fill = [alloc.allocate(4096) for _ in range(26)]  # slabs 3..28: the pool is full
    assert sorted(o // SLAB for o in fill) == list(range(3, 29))
    assert alloc.allocate(4096) is None
    everything = {a, b1, b2, c, d, *fill}

    def unless(*pinned: int) -> Callable[[int], bool]:
        return lambda offset: offset not in pinned

    # One slab: the 64-byte slot's is the cheapest, then the two 1 KiB slots'.
    assert alloc.reclaim_window(4096, unless()) == [a]
    assert sorted(alloc.reclaim_window(4096, unless(a))) == sorted([b1, b2])
    # Two slabs: 0..1 hold 64 + 2048 bytes, the cheapest pair.
    assert sorted(alloc.reclaim_window(8 * KiB, unless())) == sorted([a, b1, b2])
    # With b2 pinned: the 3 KiB span goes whole for a window over two of its slabs (3 KiB
    # to free), cheaper than 1..2 (3 KiB + 4 KiB) or any two 4 KiB slabs.
    assert alloc.reclaim_window(8 * KiB, unless(b2)) == [d]
    assert alloc.reclaim_window(8 * KiB, unless(b2, d)) is not None
    assert alloc.reclaim_window(4096, unless(*everything)) is None
    # Whatever it names, freed, leaves room.
    for offset in alloc.reclaim_window(16 * KiB, unless(a)):
        alloc.free(offset)
    assert alloc.allocate(16 * KiB) is not None


def test_stats_fragmentation_small_example() -> None:
    alloc = SlabAllocator(4 * SLAB, SLAB)  # too few slabs for spans of more than one
    empty = alloc.stats()
    assert empty["internal_fragmentation"] == 0.0
    assert empty["slab_fragmentation"] == 0.0
    assert empty["slabs_in_use"] == 0
    for nbytes in (100, 1000, 3000):  # slots 128, 1024 and 3072, each in its own slab
        assert alloc.allocate(nbytes) is not None
    stats = alloc.stats()
    assert stats["slab_bytes"] == 4096
    assert stats["slabs"] == 4
    assert stats["slabs_in_use"] == 3
    assert stats["slot_bytes_used"] == 128 + 1024 + 3072 == 4224
    assert stats["value_bytes"] == 4100
    assert stats["internal_fragmentation"] == pytest.approx(float(Fraction(124, 4224)))
    assert stats["slab_fragmentation"] == pytest.approx(float(1 - Fraction(4224, 3 * 4096)))
    # A second 100-byte value shares the 128-class slab: no new slab.
    assert alloc.allocate(100) is not None
    stats = alloc.stats()
    assert stats["slabs_in_use"] == 3
    assert stats["internal_fragmentation"] == pytest.approx(float(1 - Fraction(4200, 4352)))
    assert stats["slab_fragmentation"] == pytest.approx(float(1 - Fraction(4352, 12288)))


@pytest.mark.parametrize(("pool_bytes", "value_bytes"), [
    (64 * MiB, 1 * MiB),   # one slot per slab: a large pool of KV blocks
    (1 * MiB, 16 * KiB),   # a small pool, several slots per slab
])
def test_values_put_one_after_another_lie_at_ascending_contiguous_offsets(pool_bytes,
                                                                          value_bytes):
    """A GPU fetch from HBM copies blocks that lie in order in one DMA per run (engines'
    uva_copy): a chain's blocks, put in order into a fresh pool, must lie in order."""
    alloc = SlabAllocator(pool_bytes, value_bytes)
    slot = size_class(value_bytes)
    offsets = []
    while (offset := alloc.allocate(value_bytes)) is not None:
        offsets.append(offset)
    assert len(offsets) >= 8
    gaps = sum(1 for a, b in itertools.pairwise(offsets) if b != a + slot)
    assert offsets == sorted(offsets) and gaps <= len(offsets) // 4, offsets

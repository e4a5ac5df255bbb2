"""Tests for `kvstore.tiers.slab`: size classes and the slab allocator's invariants."""

from __future__ import annotations

import itertools
import random
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

from kvstore.tiers.slab import ALIGN_BYTES, SlabAllocator, size_class


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


# -- the allocator: a model-checked random workload -----------------------------------------------

SLAB = 4096


class AllocatorMachine(RuleBasedStateMachine):
    """Random allocate/free against a plain dict of live allocations."""

    offsets = Bundle("offsets")

    def __init__(self) -> None:
        super().__init__()
        self.alloc = SlabAllocator(6 * SLAB + 1000, SLAB)  # the odd tail is not usable
        self.live: dict[int, int] = {}  # offset -> requested bytes

    @rule(target=offsets,
          nbytes=st.one_of(st.integers(0, SLAB), st.sampled_from([64, 100, 1000, 3000, SLAB])))
    def allocate(self, nbytes: int) -> int:
        slot = reference_size_class(nbytes)
        # Could the request be served? Some slab is free, or a slab of its class has room.
        per_slab: dict[int, list[int]] = {}
        for off, n in self.live.items():
            per_slab.setdefault(off // SLAB, []).append(reference_size_class(n))
        has_free_slab = len(per_slab) < 6
        has_room = any(classes[0] == slot and len(classes) < SLAB // slot
                       for classes in per_slab.values())
        offset = self.alloc.allocate(nbytes)
        if offset is None:
            assert not has_free_slab and not has_room, "None while a slot was available"
            assert not self.alloc.can_allocate(nbytes)
            return -1
        assert has_free_slab or has_room
        assert offset not in self.live, "offset handed out twice"
        self.live[offset] = nbytes
        assert self.alloc.slot_bytes_of(offset) == slot
        return offset

    @rule(offset=consumes(offsets))
    def free(self, offset: int) -> None:
        if offset == -1:
            return
        if offset not in self.live:  # already freed by free_random_many
            with pytest.raises(ValueError):
                self.alloc.free(offset)
            return
        self.alloc.free(offset)
        del self.live[offset]
        with pytest.raises(ValueError):
            self.alloc.free(offset)  # double free

    @precondition(lambda self: len(self.live) > 0)
    @rule(data=st.data())
    def free_random_many(self, data: st.DataObject) -> None:
        victims = data.draw(st.lists(st.sampled_from(sorted(self.live)), unique=True,
                                     max_size=8))
        for offset in victims:
            self.alloc.free(offset)
            del self.live[offset]

    @rule(data=st.data())
    def reclaim(self, data: st.DataObject) -> None:
        exclude = data.draw(st.sampled_from([64, 128, 1024, 3072, SLAB]))
        got = self.alloc.slab_to_reclaim(exclude_class=exclude)
        per_slab: dict[int, list[int]] = {}
        for off, n in self.live.items():
            if reference_size_class(n) != exclude:
                per_slab.setdefault(off // SLAB, []).append(off)
        if not per_slab:
            assert got == []
            return
        fewest = min(len(v) for v in per_slab.values())
        candidates = [sorted(v) for v in per_slab.values() if len(v) == fewest]
        assert sorted(got) in candidates

    @invariant()
    def accounting(self) -> None:
        a = self.alloc
        assert a.capacity_bytes == 6 * SLAB
        slots = {off: reference_size_class(n) for off, n in self.live.items()}
        assert a.used_bytes == sum(slots.values())
        assert a.value_bytes == sum(self.live.values())
        assert a.used_bytes <= a.capacity_bytes
        stats = a.stats()
        assert stats["slot_bytes_used"] == a.used_bytes
        assert stats["slabs_in_use"] == len({off // SLAB for off in self.live})

    @invariant()
    def placement(self) -> None:
        ordered = sorted(self.live)
        for off in ordered:
            slot = reference_size_class(self.live[off])
            assert off % ALIGN_BYTES == 0
            assert off >= 0 and off + slot <= self.alloc.capacity_bytes
            # A slot never straddles two slabs.
            assert off // SLAB == (off + slot - 1) // SLAB
        for a, b in itertools.pairwise(ordered):
            assert a + reference_size_class(self.live[a]) <= b, "slots overlap"
        classes: dict[int, set[int]] = {}
        for off, n in self.live.items():
            classes.setdefault(off // SLAB, set()).add(reference_size_class(n))
        assert all(len(c) == 1 for c in classes.values()), "a slab serves two classes"

    def teardown(self) -> None:
        for offset in list(self.live):
            self.alloc.free(offset)
        assert self.alloc.used_bytes == 0
        assert self.alloc.value_bytes == 0
        assert self.alloc.stats()["slabs_in_use"] == 0
        # Every slab is free again: each can now take a value of any class.
        whole = [self.alloc.allocate(SLAB) for _ in range(6)]
        assert sorted(whole) == [i * SLAB for i in range(6)]
        assert self.alloc.allocate(64) is None


TestAllocatorMachine = AllocatorMachine.TestCase
TestAllocatorMachine.settings = settings(max_examples=60, stateful_step_count=60,
                                         deadline=None)


def test_random_workload_loop() -> None:
    """A long seeded loop on top of the hypothesis machine: many slabs, many classes."""
    rng = random.Random(1234)
    max_value = 64 * 1024
    alloc = SlabAllocator(16 * max_value, max_value)
    live: dict[int, int] = {}
    for _ in range(4000):
        if live and rng.random() < 0.45:
            off = rng.choice(list(live))
            alloc.free(off)
            del live[off]
            continue
        nbytes = rng.choice([rng.randint(1, 512), rng.randint(1, 8192),
                             rng.randint(1, max_value)])
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


def test_empty_slab_serves_another_class() -> None:
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


def test_slab_to_reclaim_returns_the_allocated_offsets_of_the_least_used_other_slab() -> None:
    alloc = SlabAllocator(4 * SLAB, SLAB)
    assert alloc.slab_to_reclaim(exclude_class=64) == []
    mids = [alloc.allocate(1000) for _ in range(3)]  # class 1024: one slab, 3 of 4 slots
    smalls = [alloc.allocate(64) for _ in range(70)]  # class 64: one full slab + 6
    assert None not in mids and None not in smalls
    by_slab: dict[int, list[int]] = {}
    for off in smalls:
        by_slab.setdefault(off // SLAB, []).append(off)
    assert sorted(len(v) for v in by_slab.values()) == [6, 64]
    full_slab = next(s for s, v in by_slab.items() if len(v) == 64)
    part_slab = next(s for s, v in by_slab.items() if len(v) == 6)

    # Excluding class 64: the only other slab is the 1024 one.
    assert sorted(alloc.slab_to_reclaim(exclude_class=1024)) == sorted(by_slab[part_slab])
    assert sorted(alloc.slab_to_reclaim(exclude_class=64)) == sorted(mids)
    # Excluding a class nobody uses: the least used of all slabs (3 < 6 < 64).
    assert sorted(alloc.slab_to_reclaim(exclude_class=128)) == sorted(mids)

    # Free most of the full slab: now it is the least used 64-class slab.
    keep = by_slab[full_slab][:2]
    for off in by_slab[full_slab][2:]:
        alloc.free(off)
    assert sorted(alloc.slab_to_reclaim(exclude_class=1024)) == sorted(keep)
    assert sorted(alloc.slab_to_reclaim(exclude_class=128)) == sorted(keep)

    # Freeing what it names empties that slab, which can then serve the excluded class.
    in_use = alloc.stats()["slabs_in_use"]
    for off in alloc.slab_to_reclaim(exclude_class=1024):
        alloc.free(off)
    assert alloc.stats()["slabs_in_use"] == in_use - 1


def test_slab_to_reclaim_ignores_the_excluded_class() -> None:
    alloc = SlabAllocator(2 * SLAB, SLAB)
    for _ in range(3):
        alloc.allocate(64)
    assert alloc.slab_to_reclaim(exclude_class=64) == []


def test_stats_fragmentation_small_example() -> None:
    alloc = SlabAllocator(4 * SLAB, SLAB)
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

"""The placement core's index and policies (`kvstore.placement.Placement`), keyed, with
no byte media: tiers counted in blocks, large enough never to fill by themselves.

Ported from tests/test_index_policy.py (the deleted BlockIndex and TierPolicy): a put is
``insert`` (ensure + touch + add), an eviction is ``victim`` + ``remove``, a copy added to
one more tier without a use is ``store_in``.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore.placement import Admission, EvictionPolicy, Placement
from tests.conftest import make_key as k

LEAF = EvictionPolicy.LEAF_LRU
LRU = EvictionPolicy.LRU
BIG = 1 << 20  # blocks: no tier fills


def make_core(num_tiers: int = 1, kind: EvictionPolicy = LEAF,
              partition_of: Callable[[int], int] | None = None,
              admissions: list[Admission] | None = None,
              capacity: int = BIG) -> Placement:
    return Placement([kind] * num_tiers, capacity_blocks=[capacity] * num_tiers, keyed=True,
                     admissions=admissions,
                     partition_of=None if partition_of is None else [partition_of] * num_tiers)


def put(core: Placement, name: object, parent: object | None = None, *, tier: int = 0,
        nbytes: int = 100) -> int:
    return core.insert(k(name), None if parent is None else k(parent), nbytes, tier)


def put_chain(core: Placement, names: list[object], *, tier: int = 0) -> list[int]:
    ids, parent = [], None
    for name in names:
        ids.append(put(core, name, parent, tier=tier))
        parent = name
    return ids


def evict(core: Placement, tier: int = 0, partition: int = 0) -> bytes | None:
    victim = core.victim(tier, partition)
    if victim is not None:
        core.remove(core.lookup(victim), tier)
    return victim


def names_of(keys: list[bytes | None], universe: list[object]) -> list[object]:
    by_key = {k(n): n for n in universe}
    return [None if key is None else by_key[key] for key in keys]


def children(core: Placement, i: int) -> list[int]:
    return [core.children_in(i, t) for t in range(core.num_tiers)]


# -- construction -------------------------------------------------------------------------------


def test_one_admission_and_one_partition_rule_per_tier() -> None:
    with pytest.raises(ValueError):
        Placement([LEAF, LEAF], capacity_blocks=[1, 1], admissions=[Admission.ALWAYS])
    with pytest.raises(ValueError):
        Placement([LEAF, LEAF], capacity_blocks=[1, 1], partition_of=[None])
    with pytest.raises(ValueError):
        Placement([LEAF, LEAF], capacity_blocks=[1])


# -- the example ------------------------------------------------------------------------


def test_leaf_lru_evicts_the_chain_tail_not_the_shared_root() -> None:
    core = make_core(kind=LEAF)
    put_chain(core, ["A", "B", "C"])
    put(core, "D")
    assert core.victim(0) == k("C")


def test_plain_lru_evicts_the_root_first() -> None:
    core = make_core(kind=LRU)
    put_chain(core, ["A", "B", "C"])
    put(core, "D")
    assert core.victim(0) == k("A")


def test_victim_does_not_remove() -> None:
    core = make_core(kind=LEAF)
    _, b = put_chain(core, ["A", "B"])
    assert core.victim(0) == k("B")
    assert core.victim(0) == k("B")
    assert core.lookup(k("B")) == b
    assert len(core) == 2


def test_leaf_first_eats_a_chain_from_its_tail() -> None:
    core = make_core(kind=LEAF)
    chain = [f"c{i}" for i in range(6)]
    put_chain(core, chain)
    # Touch the tail so it is the most recently used: leaf-first still takes it first.
    core.touch(core.lookup(k("c5")))
    order = [evict(core) for _ in range(7)]
    assert names_of(order, chain) == ["c5", "c4", "c3", "c2", "c1", "c0", None]
    assert len(core) == 0
    assert all(core.id_of(k(name)) == -1 for name in chain)  # no ghost left


def test_plain_lru_eats_a_chain_from_its_head() -> None:
    core = make_core(kind=LRU)
    chain = [f"c{i}" for i in range(4)]
    put_chain(core, chain)
    order = [evict(core) for _ in range(5)]
    assert names_of(order, chain) == ["c0", "c1", "c2", "c3", None]


def test_shared_root_stays_while_any_child_remains() -> None:
    core = make_core(kind=LEAF)
    put(core, "root")  # the oldest block of all
    kids = [f"child{i}" for i in range(6)]
    for name in kids:
        put(core, name, "root")
    assert children(core, core.lookup(k("root"))) == [6]
    evicted = []
    for _ in range(len(kids)):
        evicted.append(evict(core))
        assert core.lookup(k("root")) >= 0
    assert names_of(evicted, kids) == kids  # LRU among the leaves
    assert evict(core) == k("root")
    assert evict(core) is None


def test_touch_reorders_lru() -> None:
    core = make_core(kind=LRU)
    for name in "ABC":
        put(core, name)
    core.touch(core.lookup(k("A")))
    assert names_of([evict(core) for _ in range(4)], list("ABC")) == ["B", "C", "A", None]


def test_touch_reorders_leaves() -> None:
    core = make_core(kind=LEAF)
    put_chain(core, ["r", "x1"])
    put(core, "y1", "r")
    core.touch(core.lookup(k("x1")))
    # Leaves are x1 (touched last) and y1: y1 goes first, then x1, then r.
    assert names_of([evict(core) for _ in range(4)], ["r", "x1", "y1"]) == [
        "y1", "x1", "r", None]


# -- children counts in two tiers ---------------------------------------------------------------


def test_children_counts_per_tier() -> None:
    core = make_core(num_tiers=2, kind=LEAF)
    parent = put(core, "P", tier=0)
    assert core.store_in(1, k("P"), None)
    a = put(core, "a", "P", tier=0)
    b = put(core, "b", "P", tier=0)
    assert core.store_in(1, k("b"), None)
    c = put(core, "c", "P", tier=1)
    assert children(core, parent) == [2, 2]
    assert [core.residency(i) for i in (a, b, c)] == [0b01, 0b11, 0b10]
    assert core.fastest(b) == 0 and core.fastest(c) == 1
    assert core.parent_of(c) == k("P")

    core.remove(b, 0)
    assert children(core, parent) == [1, 2]
    assert core.fastest(b) == 1
    core.remove(a, 0)  # a leaves every tier: its entry is gone
    assert children(core, parent) == [0, 2]
    assert core.id_of(k("a")) == -1
    # P is now a leaf of tier 0 (its children live only in tier 1) but not of tier 1.
    assert core.victim(0) == k("P")
    assert core.victim(1) == k("b")  # older than c
    assert evict(core, tier=1) == k("b")
    assert evict(core, tier=1) == k("c")
    assert children(core, parent) == [0, 0]
    assert evict(core, tier=1) == k("P")
    assert core.lookup(k("P")) >= 0  # still in tier 0
    assert evict(core, tier=1) is None


def test_adding_the_same_tier_twice_counts_once() -> None:
    core = make_core(num_tiers=2)
    parent = put(core, "P")
    put(core, "c", "P")
    put(core, "c", "P")  # again into tier 0: a use, no second copy
    core.remove(parent, 1)  # not there: a no-op
    assert children(core, parent) == [1, 0]
    assert core.residency(parent) == 0b01
    assert len(core) == 2


# -- ghosts -------------------------------------------------------------------------------------


def test_removed_parent_with_children_lives_on_as_ghost() -> None:
    core = make_core(kind=LEAF)
    a, b, _ = put_chain(core, ["A", "B", "C"])
    core.remove(b, 0)
    assert core.lookup(k("B")) == -1
    assert core.id_of(k("B")) == b  # the ghost
    assert children(core, b) == [1]
    assert children(core, a) == [0]
    assert len(core) == 2
    assert core.match_prefix([k("A"), k("B"), k("C")]) == 1
    assert core.match_prefix([k("B"), k("C")]) == 0
    assert core.match_prefix([k("A")]) == 1


def test_re_added_ghost_counts_its_resident_children() -> None:
    core = make_core(kind=LEAF)
    a, b, _ = put_chain(core, ["A", "B", "C"])
    core.remove(b, 0)
    assert put(core, "B", "A") == b  # the same entry, found through the ghost
    assert children(core, b) == [1]
    assert children(core, a) == [1]
    assert core.match_prefix([k("A"), k("B"), k("C")]) == 3
    # B is not a leaf while C is resident: C goes first, then B, then A.
    assert names_of([evict(core) for _ in range(4)], ["A", "B", "C"]) == ["C", "B", "A", None]


def test_re_added_ghost_is_not_a_leaf_even_if_most_recently_used_then_becomes_one() -> None:
    core = make_core(kind=LEAF)
    put_chain(core, ["A", "B", "C"])
    put(core, "D")
    core.remove(core.lookup(k("B")), 0)
    put(core, "B", "A")  # newest of all
    core.touch(core.lookup(k("A")))
    # Leaves: C (t=3) and D (t=4). Not B, not A.
    assert [evict(core) for _ in range(4)] == [k("C"), k("D"), k("B"), k("A")]


def test_removing_the_last_child_of_a_ghost_removes_the_ghost_chain() -> None:
    core = make_core(kind=LEAF)
    a, b, c = put_chain(core, ["A", "B", "C"])
    core.remove(a, 0)
    core.remove(b, 0)
    assert [core.id_of(k(n)) for n in "ABC"] == [a, b, c]
    assert len(core) == 1
    core.remove(c, 0)
    assert [core.id_of(k(n)) for n in "ABC"] == [-1, -1, -1]
    assert len(core) == 0


def test_ghost_stays_until_its_last_child_goes() -> None:
    core = make_core(kind=LEAF)
    root = put(core, "R")
    ghost = put(core, "G", "R")
    c1 = put(core, "c1", "G")
    c2 = put(core, "c2", "G")
    core.remove(ghost, 0)
    assert children(core, root) == [0]
    core.remove(c1, 0)
    assert core.id_of(k("G")) == ghost
    core.remove(c2, 0)
    assert core.id_of(k("G")) == -1
    assert core.held_keys() == [k("R")]  # the resident root stays
    assert core.id_of(k("R")) == root
    assert evict(core) == k("R")


def test_parent_unknown_at_insert_becomes_a_ghost_placeholder() -> None:
    core = make_core(kind=LEAF)
    child = put(core, "child", "parent")
    assert core.lookup(k("parent")) == -1
    assert children(core, core.id_of(k("parent"))) == [1]
    parent = put(core, "parent")
    assert children(core, parent) == [1]
    assert evict(core) == k("child")
    assert evict(core) == k("parent")
    assert core.id_of(k("child")) == core.id_of(k("parent")) == -1
    assert core.residency(child) == 0


# -- pins ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [LEAF, LRU])
def test_pinned_entries_are_never_victims(kind: EvictionPolicy) -> None:
    core = make_core(kind=kind)
    for name in "ABC":
        put(core, name)
    a = core.lookup(k("A"))
    pin = core.pin(a, 60)
    assert core.is_pinned(a)
    assert core.victim(0) == k("B")
    assert evict(core) == k("B")
    assert evict(core) == k("C")
    assert core.victim(0) is None
    assert core.unpin(a, pin) is True
    assert not core.is_pinned(a)
    assert core.victim(0) == k("A")


def test_two_pins_both_must_go() -> None:
    core = make_core(kind=LRU)
    a = put(core, "A")
    p1 = core.pin(a, 60)
    p2 = core.pin(a, 60)
    assert p1 != p2
    assert sorted(core.live_pins(a)) == sorted([p1, p2])
    assert core.unpin(a, p1) is True
    assert core.victim(0) is None
    assert core.unpin(a, p2) is True
    assert core.victim(0) == k("A")
    assert core.unpin(a, p2) is False  # already released


def test_pinned_leaf_protects_its_ancestors() -> None:
    core = make_core(kind=LEAF)
    put_chain(core, ["A", "B", "C"])
    pin = core.pin(core.lookup(k("C")), 60)
    assert core.victim(0) is None  # C pinned, B and A are not leaves
    put(core, "D")
    assert evict(core) == k("D")
    assert core.unpin(core.lookup(k("C")), pin)
    assert evict(core) == k("C")


def test_expired_lease_no_longer_protects() -> None:
    core = make_core(kind=LRU)
    a = put(core, "A")
    put(core, "B")
    pin = core.pin(a, 0.25)
    assert core.victim(0) == k("B")
    time.sleep(0.3)
    assert not core.is_pinned(a)
    assert core.live_pins(a) == []
    assert core.victim(0) == k("A")
    assert core.unpin(a, pin) is False


def test_expired_lease_unpin_false_without_a_victim_call() -> None:
    core = make_core(kind=LRU)
    a = put(core, "A")
    pin = core.pin(a, 0.02)
    time.sleep(0.05)
    assert core.unpin(a, pin) is False


def test_unexpired_pin_unpins_true() -> None:
    core = make_core(kind=LRU)
    a = put(core, "A")
    assert core.unpin(a, core.pin(a, 60)) is True


def test_revoked_pin_unpins_false() -> None:
    # A delete revokes pins: forget (which needs media; see tests/placement/media.py).
    from tests.placement.media import MemoryMedia, Value

    core = Placement([LRU], media=MemoryMedia([1000]))
    assert core.put_into(0, k("A"), None, 100, 0, Value(k("A")))
    assert core.put_into(0, k("B"), None, 100, 0, Value(k("B")))
    a = core.lookup(k("A"))
    pin = core.pin(a, 60)
    assert core.victim(0) == k("B")
    core.forget(k("A"), durable=True)
    assert core.lookup(k("A")) == -1
    assert core.unpin(a, pin) is False


def test_removal_revokes_pins() -> None:
    core = make_core(num_tiers=2, kind=LRU)
    a = put(core, "A")
    assert core.store_in(1, k("A"), None)
    pin = core.pin(a, 60)
    core.remove(a, 0)  # still held in tier 1: the pin stays
    assert core.is_pinned(a)
    core.remove(a, 1)  # its last copy: the pin is revoked
    assert core.unpin(a, pin) is False


def test_unknown_pin_id_unpins_false() -> None:
    core = make_core(kind=LRU)
    a = put(core, "A")
    real = core.pin(a, 60)
    assert core.unpin(a, real + 1000) is False
    assert core.is_pinned(a)


# -- partitions ---------------------------------------------------------------------------------


def _by_size(nbytes: int) -> int:
    return 0 if nbytes < 1000 else 1


@pytest.mark.parametrize("kind", [LEAF, LRU])
def test_victims_come_only_from_the_partition_asked_for(kind: EvictionPolicy) -> None:
    core = make_core(kind=kind, partition_of=_by_size)
    small = [f"s{i}" for i in range(4)]
    big = [f"b{i}" for i in range(3)]
    for i in range(4):  # interleave so LRU order mixes the partitions
        put(core, small[i], nbytes=100)
        if i < 3:
            put(core, big[i], nbytes=5000)
    assert core.victim(0, None) == k("s0")  # any partition: the least recently used
    got_big = [evict(core, partition=1) for _ in range(4)]
    assert names_of(got_big, small + big) == ["b0", "b1", "b2", None]
    assert len(core) == 4
    got_small = [evict(core, partition=0) for _ in range(5)]
    assert names_of(got_small, small + big) == ["s0", "s1", "s2", "s3", None]
    assert core.victim(0, 7) is None  # a partition never seen


def test_leaf_first_partition_respects_children_in_other_partitions() -> None:
    core = make_core(kind=LEAF, partition_of=_by_size)
    put(core, "big", nbytes=5000)
    put(core, "small", "big", nbytes=100)
    assert core.victim(0, 1) is None  # big has a resident child
    assert evict(core, partition=0) == k("small")
    assert evict(core, partition=1) == k("big")


# -- admission ----------------------------------------------------------------------------------


def test_uses_count_every_use_but_not_a_recovery() -> None:
    core = make_core()
    core.recover(k("x"), None, 100, 0)  # found at start: held, not used
    x = core.lookup(k("x"))
    assert core.uses(x) == 0
    core.touch(x)
    assert core.uses(x) == 1
    put(core, "x")  # a put is a use too
    assert core.uses(x) == 2


@pytest.mark.parametrize("num_uses", [1, 2, 3])
def test_second_use_admission_needs_two_uses(num_uses: int) -> None:
    admissions = [Admission.ALWAYS, Admission.SECOND_USE]
    core = make_core(num_tiers=2, admissions=admissions, capacity=1)
    assert core.reserve(0, 1) == 0
    x = put(core, "x")  # one use
    for _ in range(num_uses - 1):
        core.touch(x)
    assert core.evict_one(0)
    if num_uses >= 2:
        assert core.demotions == 1 and core.residency(x) == 0b10
    else:
        assert core.demotions == 0 and core.id_of(k("x")) == -1


def test_always_admission_demotes_a_block_used_once() -> None:
    core = make_core(num_tiers=2, capacity=1)
    assert core.reserve(0, 1) == 0
    x = put(core, "x")
    assert core.evict_one(0)
    assert core.demotions == 1 and core.residency(x) == 0b10


# -- model checks -------------------------------------------------------------------------------

NUM_KEYS = 10


@settings(max_examples=80, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["put", "touch", "evict", "delete"]),
                              st.integers(0, NUM_KEYS - 1)), min_size=20, max_size=150))
def test_plain_lru_matches_an_ordered_dict(ops: list[tuple[str, int]]) -> None:
    core = make_core(kind=LRU)
    model: OrderedDict[int, None] = OrderedDict()
    for op, i in ops:
        if op == "put":
            put(core, i)  # a put of a held key is a use
            model[i] = None
            model.move_to_end(i)
        elif op == "touch" and i in model:
            core.touch(core.lookup(k(i)))
            model.move_to_end(i)
        elif op == "delete" and i in model:
            core.remove(core.lookup(k(i)), 0)
            del model[i]
        elif op == "evict":
            got = evict(core)
            expected = k(next(iter(model))) if model else None
            if model:
                model.popitem(last=False)
            assert got == expected
        assert len(core) == len(model)
        assert core.held_keys() == [k(i) for i in model]
    # Drain: the rest comes out in model order.
    drained = [evict(core) for _ in range(len(model) + 1)]
    assert drained == [k(i) for i in model] + [None]


def _forest(draw: st.DrawFn) -> list[int | None]:
    parents: list[int | None] = [None]
    for i in range(1, NUM_KEYS):
        parents.append(draw(st.one_of(st.none(), st.integers(0, i - 1))))
    return parents


@st.composite
def forest_workload(draw: st.DrawFn) -> tuple[list[int | None], list[tuple[str, int, int]]]:
    parents = _forest(draw)
    ops = draw(st.lists(st.tuples(
        st.sampled_from(["put", "put", "put", "touch", "evict", "evict", "remove"]),
        st.integers(0, NUM_KEYS - 1), st.integers(0, 1)), min_size=30, max_size=200))
    return parents, ops


@settings(max_examples=80, deadline=None)
@given(workload=forest_workload())
def test_leaf_lru_matches_a_brute_force_model(
        workload: tuple[list[int | None], list[tuple[str, int, int]]]) -> None:
    parents, ops = workload
    num_tiers = 2
    core = make_core(num_tiers=num_tiers, kind=LEAF)
    resident: list[set[int]] = [set() for _ in range(num_tiers)]
    last_access: dict[int, int] = {}
    # The parent the core knows for each entry it holds: set when the key is put, None for
    # a placeholder created because a child named it before it was ever put.
    link: dict[int, int | None] = {}
    clock = 0

    def known_children(j: int) -> list[int]:
        return [c for c, p in link.items() if p == j]

    def model_victim(tier: int) -> int | None:
        leaves = [j for j in resident[tier]
                  if not any(c in resident[tier] for c in known_children(j))]
        return min(leaves, key=lambda j: last_access[j]) if leaves else None

    def settle() -> None:
        """Entries that exist: resident ones and every ancestor reachable through links."""
        alive: set[int] = set()
        todo = [j for r in resident for j in r]
        while todo:
            j = todo.pop()
            if j in alive:
                continue
            alive.add(j)
            link.setdefault(j, None)
            if link[j] is not None:
                todo.append(link[j])
        for j in list(link):
            if j not in alive:
                del link[j]

    for op, i, tier in ops:
        is_resident = any(i in r for r in resident)
        if op == "put":
            if i in resident[tier]:
                core.touch(core.lookup(k(i)))
            else:
                parent = parents[i]
                core.insert(k(i), None if parent is None else k(parent), 100, tier)
                resident[tier].add(i)
                if link.get(i) is None:
                    link[i] = parent
            clock += 1
            last_access[i] = clock
        elif op == "touch" and is_resident:
            core.touch(core.lookup(k(i)))
            clock += 1
            last_access[i] = clock
        elif op == "remove" and i in resident[tier]:
            core.remove(core.lookup(k(i)), tier)
            resident[tier].discard(i)
        elif op == "evict":
            expected = model_victim(tier)
            got = evict(core, tier=tier)
            assert got == (None if expected is None else k(expected)), (op, tier)
            if expected is not None:
                resident[tier].discard(expected)
        settle()
        # Structure: entries (ghosts included), residency and child counts match the model.
        for j in range(NUM_KEYS):
            assert (core.id_of(k(j)) >= 0) == (j in link), j
        for j, parent in link.items():
            entry = core.id_of(k(j))
            assert core.parent_of(entry) == (None if parent is None else k(parent))
            assert core.residency(entry) == sum(1 << t for t in range(num_tiers)
                                                if j in resident[t])
            assert children(core, entry) == [sum(c in resident[t] for c in known_children(j))
                                             for t in range(num_tiers)]
            assert (core.lookup(k(j)) >= 0) == bool(core.residency(entry))
    for tier in range(num_tiers):
        expected_order = []
        while (v := model_victim(tier)) is not None:
            expected_order.append(k(v))
            resident[tier].discard(v)
        drained = [evict(core, tier=tier) for _ in range(len(expected_order) + 1)]
        assert drained == [*expected_order, None]
    assert len(core) == 0
    assert all(core.id_of(k(j)) == -1 for j in range(NUM_KEYS))


@pytest.mark.parametrize("kind", [LEAF, LRU])
def test_many_touches_keep_victims_right(kind: EvictionPolicy) -> None:
    # Enough touches to make the lazy heap purge itself several times.
    core = make_core(kind=kind)
    names = [f"n{i}" for i in range(5)]
    for name in names:
        put(core, name)
    order = list(names)
    for step in range(600):
        name = names[(step * 7) % 5] if step % 3 else names[step % 5]
        core.touch(core.lookup(k(name)))
        order.remove(name)
        order.append(name)
    assert names_of([evict(core) for _ in range(6)], names) == [*order, None]


def test_placement_imports_no_torch() -> None:
    # The hit-rate simulator replays traces through this code; it must stay torch-free.
    code = "import sys, kvstore.placement; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2], check=True).stdout.split()
    assert out[0] == "False", "kvstore.placement pulled in torch"

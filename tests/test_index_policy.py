"""Tests for `kvstore.index.BlockIndex` and the eviction/admission policies of `kvstore.policy`.

The index is driven the way `kvstore.store.Store` drives it: ``ensure`` + ``add`` + ``touch``
for a put, ``policies[t].victim()`` + ``remove`` for an eviction.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore import Admission, EvictionPolicy
from kvstore.index import BlockEntry, BlockIndex
from kvstore.policy import LeafFirstLRU, TierPolicy, admits, make_policy

LEAF = EvictionPolicy.LEAF_LRU
LRU = EvictionPolicy.LRU


def k(name: object) -> bytes:
    return hashlib.blake2b(str(name).encode(), digest_size=16).digest()


def make_index(num_tiers: int = 1, kind: EvictionPolicy = LEAF,
               partition_of: Callable[[int], int] | None = None) -> BlockIndex:
    index = BlockIndex(num_tiers)
    index.attach([make_policy(kind, index, t, partition_of) for t in range(num_tiers)])
    return index


def put(index: BlockIndex, name: object, parent: object | None = None, *, tier: int = 0,
        nbytes: int = 100) -> BlockEntry:
    entry = index.ensure(k(name), None if parent is None else k(parent), nbytes)
    index.add(entry, tier)
    index.touch(entry)
    return entry


def put_chain(index: BlockIndex, names: list[object], *, tier: int = 0) -> list[BlockEntry]:
    entries, parent = [], None
    for name in names:
        entries.append(put(index, name, parent, tier=tier))
        parent = name
    return entries


def evict(index: BlockIndex, tier: int = 0, partition: int = 0) -> bytes | None:
    victim = index.policies[tier].victim(partition)
    if victim is None:
        return None
    index.remove(victim, tier)
    return victim.key


def names_of(keys: list[bytes | None], universe: list[object]) -> list[object]:
    by_key = {k(n): n for n in universe}
    return [None if key is None else by_key[key] for key in keys]


# -- construction ---------------------------------------------------------------------------------


def test_make_policy_builds_the_kind_asked_for() -> None:
    index = BlockIndex(2)
    leaf = make_policy(LEAF, index, 0)
    lru = make_policy(LRU, index, 1)
    assert isinstance(leaf, LeafFirstLRU) and leaf.kind is LEAF and leaf.tier == 0
    assert type(lru) is TierPolicy and lru.kind is LRU and lru.tier == 1


def test_attach_needs_one_policy_per_tier() -> None:
    index = BlockIndex(2)
    with pytest.raises(ValueError):
        index.attach([make_policy(LEAF, index, 0)])


# -- the example --------------------------------------------------------------------------


def test_leaf_lru_evicts_the_chain_tail_not_the_shared_root() -> None:
    index = make_index(kind=LEAF)
    put_chain(index, ["A", "B", "C"])
    put(index, "D")
    victim = index.policies[0].victim()
    assert victim is not None
    assert victim.key == k("C")


def test_plain_lru_evicts_the_root_first() -> None:
    index = make_index(kind=LRU)
    put_chain(index, ["A", "B", "C"])
    put(index, "D")
    victim = index.policies[0].victim()
    assert victim is not None
    assert victim.key == k("A")


def test_victim_does_not_remove() -> None:
    index = make_index(kind=LEAF)
    put_chain(index, ["A", "B"])
    first = index.policies[0].victim()
    assert first is not None and first.key == k("B")
    again = index.policies[0].victim()
    assert again is first
    assert index.get(k("B")) is first


def test_leaf_first_eats_a_chain_from_its_tail() -> None:
    index = make_index(kind=LEAF)
    chain = [f"c{i}" for i in range(6)]
    put_chain(index, chain)
    # Touch the tail so it is the most recently used: leaf-first still takes it first.
    index.touch(index.get(k("c5")))
    order = [evict(index) for _ in range(7)]
    assert names_of(order, chain) == ["c5", "c4", "c3", "c2", "c1", "c0", None]
    assert len(index) == 0
    assert index.entries == {}


def test_plain_lru_eats_a_chain_from_its_head() -> None:
    index = make_index(kind=LRU)
    chain = [f"c{i}" for i in range(4)]
    put_chain(index, chain)
    order = [evict(index) for _ in range(5)]
    assert names_of(order, chain) == ["c0", "c1", "c2", "c3", None]


def test_shared_root_stays_while_any_child_remains() -> None:
    index = make_index(kind=LEAF)
    put(index, "root")  # the oldest block of all
    children = [f"child{i}" for i in range(6)]
    for name in children:
        put(index, name, "root")
    assert index.get(k("root")).children == [6]
    evicted = []
    for _ in range(len(children)):
        evicted.append(evict(index))
        assert index.get(k("root")) is not None
    assert names_of(evicted, children) == children  # LRU among the leaves
    assert evict(index) == k("root")
    assert evict(index) is None


def test_touch_reorders_lru() -> None:
    index = make_index(kind=LRU)
    for name in "ABC":
        put(index, name)
    index.touch(index.get(k("A")))
    assert names_of([evict(index) for _ in range(4)], list("ABC")) == ["B", "C", "A", None]


def test_touch_reorders_leaves() -> None:
    index = make_index(kind=LEAF)
    put_chain(index, ["r", "x1"])
    put(index, "y1", "r")
    index.touch(index.get(k("x1")))
    # Leaves are x1 (touched last) and y1: y1 goes first, then x1, then r.
    assert names_of([evict(index) for _ in range(4)], ["r", "x1", "y1"]) == ["y1", "x1", "r",
                                                                               None]


# -- children counts in two tiers -----------------------------------------------------------------


def test_children_counts_per_tier() -> None:
    index = make_index(num_tiers=2, kind=LEAF)
    parent = put(index, "P", tier=0)
    index.add(parent, 1)
    a = put(index, "a", "P", tier=0)
    b = put(index, "b", "P", tier=0)
    index.add(b, 1)
    c = put(index, "c", "P", tier=1)
    assert parent.children == [2, 2]
    assert parent.num_child_entries == 3
    assert (a.residency, b.residency, c.residency) == (0b01, 0b11, 0b10)
    assert b.fastest_tier == 0 and c.fastest_tier == 1

    index.remove(b, 0)
    assert parent.children == [1, 2]
    assert b.fastest_tier == 1
    index.remove(a, 0)  # a leaves every tier: its entry is gone
    assert parent.children == [0, 2]
    assert k("a") not in index.entries
    assert parent.num_child_entries == 2
    # P is now a leaf of tier 0 (its children live only in tier 1) but not of tier 1.
    assert index.policies[0].victim().key == k("P")
    tier1 = index.policies[1].victim()
    assert tier1 is not None and tier1.key in {k("b"), k("c")}
    assert evict(index, tier=1) == k("b")  # older than c
    assert evict(index, tier=1) == k("c")
    assert parent.children == [0, 0]
    assert evict(index, tier=1) == k("P")
    assert index.get(k("P")) is not None  # still in tier 0
    assert evict(index, tier=1) is None


def test_adding_the_same_tier_twice_counts_once() -> None:
    index = make_index(num_tiers=2)
    parent = put(index, "P")
    child = put(index, "c", "P")
    index.add(child, 0)
    index.remove(parent, 1)  # not there: a no-op
    assert parent.children == [1, 0]
    assert parent.residency == 0b01


# -- ghosts ---------------------------------------------------------------------------------------


def test_removed_parent_with_children_lives_on_as_ghost() -> None:
    index = make_index(kind=LEAF)
    a, b, _ = put_chain(index, ["A", "B", "C"])
    index.remove(b, 0)
    assert index.get(k("B")) is None
    assert k("B") in index.entries  # the ghost
    assert b.children == [1]
    assert a.children == [0]
    assert len(index) == 2
    assert index.match_prefix([k("A"), k("B"), k("C")]) == 1
    assert index.match_prefix([k("B"), k("C")]) == 0
    assert index.match_prefix([k("A")]) == 1


def test_re_added_ghost_counts_its_resident_children() -> None:
    index = make_index(kind=LEAF)
    a, b, _ = put_chain(index, ["A", "B", "C"])
    index.remove(b, 0)
    again = put(index, "B", "A")
    assert again is b  # the same entry, found through the ghost
    assert b.children == [1]
    assert a.children == [1]
    assert index.match_prefix([k("A"), k("B"), k("C")]) == 3
    # B is not a leaf while C is resident: C goes first, then B, then A.
    assert names_of([evict(index) for _ in range(4)], ["A", "B", "C"]) == ["C", "B", "A", None]


def test_re_added_ghost_is_not_a_leaf_even_if_most_recently_used_then_becomes_one() -> None:
    index = make_index(kind=LEAF)
    put_chain(index, ["A", "B", "C"])
    put(index, "D")
    index.remove(index.get(k("B")), 0)
    put(index, "B", "A")  # newest of all
    index.touch(index.get(k("A")))
    # Leaves: C (t=3) and D (t=4). Not B, not A.
    assert evict(index) == k("C")
    assert evict(index) == k("D")
    assert evict(index) == k("B")
    assert evict(index) == k("A")


def test_removing_the_last_child_of_a_ghost_removes_the_ghost_chain() -> None:
    index = make_index(kind=LEAF)
    a, b, c = put_chain(index, ["A", "B", "C"])
    index.remove(a, 0)
    index.remove(b, 0)
    assert set(index.entries) == {k("A"), k("B"), k("C")}
    assert len(index) == 1
    index.remove(c, 0)
    assert index.entries == {}
    assert len(index) == 0


def test_ghost_stays_until_its_last_child_goes() -> None:
    index = make_index(kind=LEAF)
    root = put(index, "R")
    ghost = put(index, "G", "R")
    c1 = put(index, "c1", "G")
    c2 = put(index, "c2", "G")
    index.remove(ghost, 0)
    assert root.children == [0] and root.num_child_entries == 1
    index.remove(c1, 0)
    assert k("G") in index.entries and ghost.num_child_entries == 1
    index.remove(c2, 0)
    assert k("G") not in index.entries
    assert set(index.entries) == {k("R")}  # the resident root stays
    assert root.num_child_entries == 0
    assert evict(index) == k("R")


def test_parent_unknown_at_insert_becomes_a_ghost_placeholder() -> None:
    index = make_index(kind=LEAF)
    child = put(index, "child", "parent")
    assert index.get(k("parent")) is None
    assert index.entries[k("parent")].children == [1]
    parent = put(index, "parent")
    assert parent.children == [1]
    assert evict(index) == k("child")
    assert evict(index) == k("parent")
    assert child.residency == 0 and index.entries == {}


# -- pins -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [LEAF, LRU])
def test_pinned_entries_are_never_victims(kind: EvictionPolicy) -> None:
    index = make_index(kind=kind)
    for name in "ABC":
        put(index, name)
    a = index.get(k("A"))
    pin = index.pin(a, lease_s=60)
    assert index.is_pinned(a)
    assert index.policies[0].victim().key == k("B")
    assert evict(index) == k("B")
    assert evict(index) == k("C")
    assert index.policies[0].victim() is None
    assert index.unpin(a, pin) is True
    assert not index.is_pinned(a)
    assert index.policies[0].victim() is a


def test_two_pins_both_must_go() -> None:
    index = make_index(kind=LRU)
    a = put(index, "A")
    p1 = index.pin(a, lease_s=60)
    p2 = index.pin(a, lease_s=60)
    assert p1 != p2
    assert index.unpin(a, p1) is True
    assert index.policies[0].victim() is None
    assert index.unpin(a, p2) is True
    assert index.policies[0].victim() is a
    assert index.unpin(a, p2) is False  # already released


def test_pinned_leaf_protects_its_ancestors() -> None:
    index = make_index(kind=LEAF)
    put_chain(index, ["A", "B", "C"])
    pin = index.pin(index.get(k("C")), lease_s=60)
    assert index.policies[0].victim() is None  # C pinned, B and A are not leaves
    put(index, "D")
    assert evict(index) == k("D")
    assert index.unpin(index.get(k("C")), pin)
    assert evict(index) == k("C")


def test_expired_lease_no_longer_protects() -> None:
    index = make_index(kind=LRU)
    a = put(index, "A")
    put(index, "B")
    pin = index.pin(a, lease_s=0.25)
    assert index.policies[0].victim().key == k("B")
    time.sleep(0.3)
    assert not index.is_pinned(a)
    assert index.policies[0].victim() is a
    assert index.unpin(a, pin) is False


def test_expired_lease_unpin_false_without_a_victim_call() -> None:
    index = make_index(kind=LRU)
    a = put(index, "A")
    pin = index.pin(a, lease_s=0.02)
    time.sleep(0.05)
    assert index.unpin(a, pin) is False


def test_unexpired_pin_unpins_true() -> None:
    index = make_index(kind=LRU)
    a = put(index, "A")
    assert index.unpin(a, index.pin(a, lease_s=60)) is True


def test_revoked_pin_unpins_false() -> None:
    index = make_index(kind=LRU)
    a = put(index, "A")
    pin = index.pin(a, lease_s=60)
    index.revoke_pins(a)
    assert not index.is_pinned(a)
    assert index.policies[0].victim() is a
    assert index.unpin(a, pin) is False


def test_removal_revokes_pins() -> None:
    index = make_index(num_tiers=1, kind=LRU)
    a = put(index, "A")
    pin = index.pin(a, lease_s=60)
    index.remove(a, 0)
    assert index.unpin(a, pin) is False


def test_unknown_pin_id_unpins_false() -> None:
    index = make_index(kind=LRU)
    a = put(index, "A")
    real = index.pin(a, lease_s=60)
    assert index.unpin(a, real + 1000) is False
    assert index.is_pinned(a)


# -- partitions -----------------------------------------------------------------------------------


def _by_size(nbytes: int) -> int:
    return 0 if nbytes < 1000 else 1


@pytest.mark.parametrize("kind", [LEAF, LRU])
def test_victims_come_only_from_the_partition_asked_for(kind: EvictionPolicy) -> None:
    index = make_index(kind=kind, partition_of=_by_size)
    small = [f"s{i}" for i in range(4)]
    big = [f"b{i}" for i in range(3)]
    for i in range(4):  # interleave so LRU order mixes the partitions
        put(index, small[i], nbytes=100)
        if i < 3:
            put(index, big[i], nbytes=5000)
    assert sorted(index.policies[0].partitions()) == [0, 1]
    got_big = [evict(index, partition=1) for _ in range(4)]
    assert names_of(got_big, small + big) == ["b0", "b1", "b2", None]
    assert index.policies[0].partitions() == [0]
    assert len(index) == 4
    got_small = [evict(index, partition=0) for _ in range(5)]
    assert names_of(got_small, small + big) == ["s0", "s1", "s2", "s3", None]
    assert index.policies[0].victim(7) is None  # a partition never seen


def test_leaf_first_partition_respects_children_in_other_partitions() -> None:
    index = make_index(kind=LEAF, partition_of=_by_size)
    put(index, "big", nbytes=5000)
    put(index, "small", "big", nbytes=100)
    assert index.policies[0].victim(1) is None  # big has a resident child
    assert evict(index, partition=0) == k("small")
    assert evict(index, partition=1) == k("big")


# -- admission ------------------------------------------------------------------------------------


def test_second_use_admission_needs_two_uses() -> None:
    index = make_index()
    entry = index.ensure(k("x"), None, 100)
    index.add(entry, 0)
    assert entry.num_uses == 0
    assert admits(Admission.ALWAYS, entry)
    assert not admits(Admission.SECOND_USE, entry)
    index.touch(entry)
    assert entry.num_uses == 1
    assert not admits(Admission.SECOND_USE, entry)
    index.touch(entry)
    assert entry.num_uses == 2
    assert admits(Admission.SECOND_USE, entry)
    index.touch(entry)
    assert admits(Admission.SECOND_USE, entry)


# -- model checks ---------------------------------------------------------------------------------

NUM_KEYS = 10


@settings(max_examples=80, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["put", "touch", "evict", "delete"]),
                              st.integers(0, NUM_KEYS - 1)), min_size=20, max_size=150))
def test_plain_lru_matches_an_ordered_dict(ops: list[tuple[str, int]]) -> None:
    index = make_index(kind=LRU)
    model: OrderedDict[int, None] = OrderedDict()
    for op, i in ops:
        if op == "put":
            if i in model:
                index.touch(index.get(k(i)))
            else:
                put(index, i)
            model[i] = None
            model.move_to_end(i)
        elif op == "touch" and i in model:
            index.touch(index.get(k(i)))
            model.move_to_end(i)
        elif op == "delete" and i in model:
            index.remove(index.get(k(i)), 0)
            del model[i]
        elif op == "evict":
            got = evict(index)
            expected = k(next(iter(model))) if model else None
            if model:
                model.popitem(last=False)
            assert got == expected
        assert len(index) == len(model)
        assert {key for key, e in index.entries.items() if e.residency} == {k(i) for i in model}
    # Drain: the rest comes out in model order.
    drained = [evict(index) for _ in range(len(model) + 1)]
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
    index = make_index(num_tiers=num_tiers, kind=LEAF)
    resident: list[set[int]] = [set() for _ in range(num_tiers)]
    last_access: dict[int, int] = {}
    # The parent the index knows for each entry it holds: set when the key is put, None for
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
                index.touch(index.get(k(i)))
            else:
                parent = parents[i]
                entry = index.ensure(k(i), None if parent is None else k(parent), 100)
                index.add(entry, tier)
                index.touch(entry)
                resident[tier].add(i)
                if link.get(i) is None:
                    link[i] = parent
            clock += 1
            last_access[i] = clock
        elif op == "touch" and is_resident:
            index.touch(index.get(k(i)))
            clock += 1
            last_access[i] = clock
        elif op == "remove" and i in resident[tier]:
            index.remove(index.get(k(i)), tier)
            resident[tier].discard(i)
        elif op == "evict":
            expected = model_victim(tier)
            got = evict(index, tier=tier)
            assert got == (None if expected is None else k(expected)), (op, tier)
            if expected is not None:
                resident[tier].discard(expected)
        settle()
        # Structure: entries (ghosts included), residency and child counts match the model.
        assert set(index.entries) == {k(j) for j in link}
        for j, parent in link.items():
            entry = index.entries[k(j)]
            assert entry.parent == (None if parent is None else k(parent))
            assert entry.residency == sum(1 << t for t in range(num_tiers) if j in resident[t])
            assert entry.children == [sum(c in resident[t] for c in known_children(j))
                                      for t in range(num_tiers)]
            assert entry.num_child_entries == len(known_children(j))
            assert (index.get(k(j)) is not None) == bool(entry.residency)
    for tier in range(num_tiers):
        expected_order = []
        while (v := model_victim(tier)) is not None:
            expected_order.append(k(v))
            resident[tier].discard(v)
        drained = [evict(index, tier=tier) for _ in range(len(expected_order) + 1)]
        assert drained == [*expected_order, None]
    assert index.entries == {}


@pytest.mark.parametrize("kind", [LEAF, LRU])
def test_many_touches_keep_victims_right(kind: EvictionPolicy) -> None:
    # Enough touches to make the lazy heap purge itself several times.
    index = make_index(kind=kind)
    names = [f"n{i}" for i in range(5)]
    for name in names:
        put(index, name)
    order = list(names)
    for step in range(600):
        name = names[(step * 7) % 5] if step % 3 else names[step % 5]
        index.touch(index.get(k(name)))
        order.remove(name)
        order.append(name)
    assert names_of([evict(index) for _ in range(6)], names) == [*order, None]


def test_index_and_policy_import_no_torch() -> None:
    # The hit-rate simulator replays traces through this code; it must stay torch-free.
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys, kvstore.index, kvstore.policy; "
            "print('torch' in sys.modules, 'numpy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], check=True).stdout.split()
    assert out[0] == "False", "kvstore.index/policy pulled in torch"

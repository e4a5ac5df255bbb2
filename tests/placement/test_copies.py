"""A block being copied into a tier is *busy* while room is made for it: never a victim,
never forgotten. Two defects the reference model found, each as its smallest case:

1. *A promotion evicted the copy it read from.* Copying a hit block up to the write tier
   makes room there; the victims it demotes make room in the tiers below, and the victim
   there could be the promoted block itself. Its copy was dropped before it was read: in
   a memory tier the slot went to the block demoted into it, so the promoted copy would
   have held that block's bytes (a wrong value served on HBM + DRAM); with no child naming
   it, the entry was freed and the block lost (InvalidKeyError on the Store, a miss in
   the simulator for a block it had just promoted).
2. *A put of a ghost into a whole tier (NVMe) evicted the ghost's last child*, which freed
   the entry under the put: the value was written under key None.

Both were there before the compiled core (the Python BlockIndex lost the entry the same
way, without the crash); tests/placement/test_reference.py checks the rule at large.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kvstore import Store, StoreConfig
from kvstore.placement import EvictionPolicy, Placement
from kvstore.sim.replay import ReplayConfig, replay
from kvstore.sim.traces import Trace
from tests.conftest import make_key, make_value
from tests.placement.media import MemoryMedia, Value

LRU = EvictionPolicy.LRU
LEAF = EvictionPolicy.LEAF_LRU
KiB = 1024



def test_a_promotion_with_room_copies_the_block_up() -> None:
    """The control for the cases below: with room in the write tier nothing cascades."""
    core = Placement([LRU, LRU], capacity_blocks=[2, 2], keyed=True)
    for key in (b"A" * 16, b"B" * 16):
        core.reserve(0, 1)
        core.insert(key, None, 1, 0)
    assert core.evict_one(0)  # A goes down
    a = core.lookup(b"A" * 16)
    core.touch(a)
    assert core.promote(a, core.generation(a), 1, None)
    assert core.held_keys(0) == [b"B" * 16, b"A" * 16]
    assert core.held_keys(1) == [b"A" * 16]


def test_a_promoted_block_stays_held() -> None:
    # Tiers of one block each: A below, B above. A hit on A promotes it: B is demoted
    # towards tier 1, whose only block is A, busy being copied up: B is dropped, A is
    # held in both tiers.
    core = Placement([LRU, LRU], capacity_blocks=[1, 1], keyed=True)
    core.reserve(0, 1)
    core.insert(b"A" * 16, None, 1, 0)
    core.reserve(0, 1)  # A is demoted to tier 1
    core.insert(b"B" * 16, None, 1, 0)
    a = core.lookup(b"A" * 16)
    core.touch(a)
    assert core.promote(a, core.generation(a), 1, None)
    assert core.lookup(b"A" * 16) >= 0, "the promoted block is held nowhere"
    assert core.held_keys(0) == [b"A" * 16]
    assert core.held_keys(1) == [b"A" * 16]
    assert core.lookup(b"B" * 16) < 0 and (core.evictions, core.demotions) == (2, 1)


def test_a_promotion_reads_a_copy_that_is_still_there() -> None:
    # As above, but A has a child entry (C), so its entry lives on as a ghost and the
    # index looks right: the copy written to tier 0 was read from a dropped slot.
    media = MemoryMedia([200, 100])
    core = Placement([LRU, LRU], media=media)

    def put(key: bytes, parent: bytes | None = None) -> None:
        slot = core.reserve(0, 100, 0, {parent} if parent else None)
        media.commit(0, slot, key, parent, 100)
        core.insert(key, parent, 100, 0)

    put(b"A" * 16)
    put(b"C" * 16, b"A" * 16)
    put(b"B" * 16)  # A, the least recently used, goes down to tier 1
    a = core.lookup(b"A" * 16)
    core.touch(a)
    assert core.promote(a, core.generation(a), 1, media.source(1, b"A" * 16))
    assert media.torn == [], "the promoted copy was read from a dropped slot"


def test_replay_hits_a_block_it_has_just_promoted() -> None:
    a, b = make_key("A"), make_key("B")
    trace = Trace(block_tokens=1, timestamps_s=[0.0, 1.0, 2.0, 3.0], input_tokens=[1] * 4,
                  keys=[[a], [b], [a], [a]])
    result = replay(trace, ReplayConfig(capacity_blocks=(1, 1, 0), policy=LRU, window_s=1.0))
    assert result.promotions == 1
    # Request 3 promotes A (from DRAM to HBM); request 4 finds it in HBM.
    assert [row["hit_tokens"] for row in result.windows.rows()] == [0, 0, 1, 1]


def test_store_keeps_a_block_it_promotes_from_nvme(tmp_path: Path) -> None:
    # One DRAM slot, NVMe full of one chain whose tail is its only leaf. Reading the tail
    # promotes it to DRAM, which demotes the chain's head to NVMe, which evicts the tail.
    config = StoreConfig(dram_bytes=16 * KiB, max_value_bytes=16 * KiB,
                         nvme_path=str(tmp_path / "nvme"), nvme_bytes=512 * KiB,
                         nvme_segment_bytes=64 * KiB, eviction_policy=LEAF)
    with Store(config) as store:
        chain = [make_key(f"c{i}") for i in range(64)]
        stored = store.put_many(chain, [make_value(i, 16 * KiB) for i in range(64)])
        assert 2 < stored < 64  # the head in DRAM, the rest on NVMe until it filled
        tail = chain[stored - 1]
        assert store.tier_of(tail) == "nvme"
        assert store.get(tail) == make_value(stored - 1, 16 * KiB)
        assert store.tier_of(tail) == "dram", "the block read and promoted is held nowhere"
        assert store.put(make_key("next"), make_value("next", 16 * KiB))


def test_a_put_of_a_ghost_into_a_whole_tier_stores_it() -> None:
    media = MemoryMedia([200])
    core = Placement([LEAF], media=media)

    def put(key: bytes, parent: bytes | None = None) -> bool:
        return core.put_into(0, key, parent, 100, 0, Value(key))

    assert put(b"P" * 16) and put(b"C" * 16, b"P" * 16)
    core.forget(b"P" * 16, durable=True)  # P lives on as a ghost: C names it
    assert put(b"Y" * 16)  # full: C and Y
    assert put(b"P" * 16)  # evicts C, the oldest leaf and P's last child
    assert core.lookup(b"P" * 16) >= 0, "the block put is held nowhere"
    assert media.keys_in(0) == set(core.held_keys(0)) == {b"P" * 16, b"Y" * 16}


def _nvme_store(directory: Path) -> Store:
    return Store(StoreConfig(dram_bytes=0, max_value_bytes=16 * KiB,
                             nvme_path=str(directory / "nvme"), nvme_bytes=512 * KiB,
                             nvme_segment_bytes=64 * KiB))


def _ghost_beside_fillers(directory: Path, num_fillers: int) -> Store:
    store = _nvme_store(directory)
    store.put_many([make_key("P"), make_key("C")],
                   [make_value("P", 16 * KiB), make_value("C", 16 * KiB)])
    store.delete(make_key("P"))  # P lives on as a ghost: C names it
    for i in range(num_fillers):
        store.put(make_key(i), make_value(i, 16 * KiB))
    return store


def test_store_put_of_a_deleted_parent_on_nvme(tmp_path: Path) -> None:
    # An NVMe-only store filled up to the last block that leaves C on it; C is the
    # oldest leaf, so putting its parent P again evicts C.
    num_fillers = 0
    while True:
        with _ghost_beside_fillers(tmp_path / f"probe-{num_fillers}", num_fillers + 1) as store:
            if not store.contains(make_key("C")):
                break
        num_fillers += 1
    with _ghost_beside_fillers(tmp_path / "run", num_fillers) as store:
        assert store.contains(make_key("C"))
        assert store.put(make_key("P"), make_value("P2", 16 * KiB))
        assert store.get(make_key("P")) == make_value("P2", 16 * KiB)


@pytest.mark.gpu
def test_hbm_store_serves_the_value_it_promoted() -> None:
    # HBM of two blocks over DRAM of one, LRU. A goes down to DRAM; reading A promotes
    # it: C is demoted from HBM towards DRAM, where the only block is A, busy: C is
    # dropped, not A (before the fix, A's DRAM slot went to C before A was copied up).
    config = StoreConfig(hbm_bytes=2 * 4 * KiB, dram_bytes=4 * KiB, max_value_bytes=4 * KiB,
                         eviction_policy=LRU)
    a, c, b = make_key("A"), make_key("C"), make_key("B")
    with Store(config) as store:
        assert store.put_many([a, c], [make_value("A", 4 * KiB), make_value("C", 4 * KiB)]) == 2
        assert store.put(b, make_value("B", 4 * KiB))
        assert store.tier_of(a) == "dram"
        assert store.get(a) == make_value("A", 4 * KiB)
        assert store.tier_of(a) == "hbm"
        assert store.get(a) == make_value("A", 4 * KiB), "a wrong value was served"

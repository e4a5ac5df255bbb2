"""Readers racing writers on the same key, at the moments a review found unguarded: the
reader must never bring back or serve anything but the acknowledged value.

Each race is timed by wrapping the real NVMe tier's ``read_bytes`` (the read a `get` makes
outside the store lock) so that another client's calls run exactly while it is in flight.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kvstore import Store, StoreConfig
from kvstore.placement import EvictionPolicy, Placement
from tests.placement.media import MemoryMedia

KiB = 1024
K, C = b"K" * 16, b"C" * 16
V1, V2, VC = bytes([1]) * 4096, bytes([2]) * 4096, bytes([9]) * 4096


def race_reads_of(store: Store, key: bytes, during: object) -> None:
    """Run ``during(data)`` inside the first NVMe read of ``key``, after its I/O."""
    nvme = store._tiers[-1]
    read = nvme.read_bytes
    fired: list[bool] = []

    def racing_read(k: bytes) -> bytes | None:
        data = read(k)
        if k == key and not fired:
            fired.append(True)
            during()
        return data

    nvme.read_bytes = racing_read


def test_a_read_that_misses_does_not_evict_a_new_value_put_meanwhile(tmp_path: Path) -> None:
    # K has a child, so its entry lives on as a ghost after a delete, and a new put of K
    # reuses it: the racing read (which misses: K was deleted before its I/O) must not
    # take the new value for the copy it failed to read.
    config = StoreConfig(dram_bytes=0, nvme_path=str(tmp_path / "n"), nvme_bytes="64MiB",
                         max_value_bytes=4096, nvme_direct_io=False)
    with Store(config) as store:
        assert store.put_many([K, C], [V1, VC]) == 2
        nvme = store._tiers[-1]
        read = nvme.read_bytes
        fired: list[bool] = []

        def racing_read(key: bytes) -> bytes | None:
            if key == K and not fired:
                fired.append(True)
                store.delete(K)  # another client deletes K before this read's I/O ...
                data = read(key)  # ... so the read finds nothing
                assert store.put(K, V2)  # ... and its new value is acknowledged
                return data
            return read(key)

        nvme.read_bytes = racing_read
        assert store.get(K) in (None, V2)
        nvme.read_bytes = read
        assert store.get(K) == V2, "an acknowledged put was lost"


def test_a_slow_read_does_not_promote_the_old_value_over_a_new_one(tmp_path: Path) -> None:
    config = StoreConfig(dram_bytes="1MiB", nvme_path=str(tmp_path / "n"), nvme_bytes="64MiB",
                         max_value_bytes=4096, eviction_policy="lru", nvme_direct_io=False)
    with Store(config) as store:
        core = store.placement

        def to_nvme_only(key: bytes) -> None:
            store.flush()
            while core.fastest(core.lookup(key)) == 0:
                assert core.evict_one(0, 4096)

        assert store.put_many([K, C], [V1, VC]) == 2
        to_nvme_only(K)

        def overwrite() -> None:
            store.delete(K)
            assert store.put(K, V2)
            to_nvme_only(K)

        race_reads_of(store, K, overwrite)
        assert store.get(K) in (V1, V2)  # the racing read may give the old value, once
        assert store.get(K) == V2, "the old value was promoted over the acknowledged one"
        assert store.get(K) == V2


def test_a_promotion_does_not_copy_from_a_tier_that_dropped_the_block() -> None:
    # A reader found A in tier 1 and let go of the lock; meanwhile A left tier 1 (its slot
    # reused) but is still held in tier 2: the promotion must not copy tier 1's old slot.
    media = MemoryMedia([100, 100, 100])
    core = Placement([EvictionPolicy.LRU] * 3, media=media)
    a, b = b"A" * 16, b"B" * 16
    slot = core.reserve(1, 100)
    media.commit(1, slot, a, None, 100)
    core.insert(a, None, 100, 1)
    assert core.store_in(2, a, media.source(1, a))
    i = core.lookup(a)
    src, gen = media.source(1, a), core.generation(i)
    assert core.evict_one(1)  # A leaves tier 1 (held in tier 2 still) ...
    slot = core.reserve(1, 100)  # ... and its slot goes to B
    media.commit(1, slot, b, None, 100)
    core.insert(b, None, 100, 1)
    assert not core.promote(i, gen, 1, src)
    assert media.torn == []


class RetiringMedia(MemoryMedia):
    """Memory tiers that keep a retired slot for its readers (as the Store's do)."""

    def __init__(self, capacity_bytes: list[int]) -> None:
        super().__init__(capacity_bytes)
        self.retired: list[tuple[int, bytes]] = []

    def retire(self, t: int, key: bytes, pins: list[int]) -> bool:
        self.retired.append((t, key))
        self.drop(t, key, 0)
        return True


def test_an_overwrite_keeps_every_copy_a_pinned_reader_may_be_reading() -> None:
    # A reader pins A while its fastest copy is in tier 1; a hit then promotes A to tier
    # 0; A is overwritten. The reader copies from tier 1: that slot must be retired too.
    media = RetiringMedia([100, 100])
    core = Placement([EvictionPolicy.LRU] * 2, media=media)
    a = b"A" * 16
    slot = core.reserve(1, 100)
    media.commit(1, slot, a, None, 100)
    core.insert(a, None, 100, 1)
    i = core.lookup(a)
    core.pin(i, 3600)  # the reader, copying from tier 1
    assert core.promote(i, core.generation(i), 1, media.source(1, a))
    core.forget(a, durable=True)
    assert sorted(media.retired) == [(0, a), (1, a)]


@pytest.mark.parametrize("chain", [1000, 4000])
def test_put_many_marks_its_chain_once_not_per_block(chain: int) -> None:
    # Protecting a put_many's own blocks marked the whole chain again for every block
    # that needed room (quadratic in the chain); now each block is marked once.
    media = MemoryMedia([100 * 64])
    core = Placement([EvictionPolicy.LEAF_LRU], media=media)
    keys = [i.to_bytes(16, "little") for i in range(chain)]
    protect: list[bytes] = []
    parent = None
    for key in keys[:64]:  # fill the tier
        slot = core.reserve(0, 100)
        media.commit(0, slot, key, parent, 100)
        core.insert(key, parent, 100, 0)
        parent = key
    marked_before = core.protect_marks
    for key in keys[64:]:
        slot = core.reserve(0, 100, 0, protect)
        if slot is None:
            break
        media.commit(0, slot, key, None, 100)
        core.insert(key, None, 100, 0)
        protect.append(key)
    assert core.protect_marks - marked_before <= len(protect) + 1

"""What a Store tells a cluster node to publish: its inventory and the change feed
(`Store.inventory`, `Store.take_changes`, `Store.tier_bits`), through every way a block's
tiers change: put, demotion, eviction, promotion, delete, recovery from NVMe."""

from __future__ import annotations

from kvstore import Store, StoreConfig
from kvstore.tiers.base import TIER_BIT, TierKind

DRAM, NVME = TIER_BIT[TierKind.DRAM], TIER_BIT[TierKind.NVME]


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def test_the_change_feed_follows_puts_demotions_evictions_and_deletes(tmp_path) -> None:
    config = StoreConfig(dram_bytes="1MiB", nvme_path=str(tmp_path), nvme_bytes="4MiB",
                         max_value_bytes="256KiB")
    with Store(config) as store:
        store.put(key(0), b"a" * 1000)
        assert store.inventory(track=True) == [(key(0), DRAM)]
        assert store.take_changes() == []  # what came before is in the inventory
        store.put(key(1), b"b" * 1000)
        store.flush()  # key 0 and 1 now on NVMe too
        assert dict(store.take_changes()) == {key(1): DRAM | NVME, key(0): DRAM | NVME}
        assert store.tier_bits([key(0), key(9)]) == [DRAM | NVME, 0]
        store.delete(key(0))
        assert store.take_changes() == [(key(0), 0)]
        # Fill DRAM: the oldest blocks are demoted (DRAM bit gone) or stay on NVMe.
        for i in range(2, 40):
            store.put(key(i), bytes([i]) * (100 * 1024))
        changes = dict(store.take_changes())
        assert NVME in changes.values()  # demoted: on NVMe only now
        assert all(bits == bits_now for k, bits in changes.items()
                   for bits_now in store.tier_bits([k]))
        assert set(changes) >= {key(i) for i in range(2, 40)}
        assert sorted(store.inventory()) == sorted(
            (k, b) for k, b in zip([key(i) for i in range(40)],
                                   store.tier_bits([key(i) for i in range(40)]),
                                   strict=True) if b)


def test_a_reopened_store_has_its_recovered_blocks_in_its_inventory(tmp_path) -> None:
    config = StoreConfig(dram_bytes="1MiB", nvme_path=str(tmp_path), nvme_bytes="4MiB",
                         max_value_bytes="256KiB")
    with Store(config) as store:
        store.put_many([key(1), key(2)], [b"x" * 500, b"y" * 500])
    with Store(config) as store:
        assert sorted(store.inventory(track=True)) == [(key(1), NVME), (key(2), NVME)]
        assert store.get(key(1)) == b"x" * 500  # promoted to DRAM on a hit
        assert store.take_changes() == [(key(1), DRAM | NVME)]

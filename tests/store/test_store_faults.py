"""The Store on a failing NVMe tier: compaction that must not wedge, a disk that fills up.

Real files on real filesystems: the full-disk tests mount a small tmpfs (root only; they
skip elsewhere), so ENOSPC comes from the kernel, not from a stand-in.
"""

from __future__ import annotations

import pytest

import kvstore
from kvstore import StorageError
from tests.conftest import fill_disk, make_key, make_value

KiB, MiB = 1024, 1024 * 1024


def test_compaction_after_a_tombstone_on_a_4k_boundary_keeps_working(tmp_path):
    """Issue 15, finding 1: a tombstone whose header ends on a 4 KiB boundary has the
    payload offset of the detached record written next; compaction took the one for the
    other, stopped halfway and failed every later write that needed room."""
    config = kvstore.StoreConfig(dram_bytes=0, nvme_path=tmp_path, nvme_bytes="32MiB",
                                 max_value_bytes="1MiB")
    x, k = make_key("X"), make_key("K")
    with kvstore.Store(config) as store:
        assert store.put(x, make_value("x", 64 * KiB))
        assert store.put(k, make_value("k-small", 3936))  # its tombstone ends on 4 KiB
        assert store.put(k, make_value("k", 64 * KiB))
        assert store.delete(x)
        for i in range(200):
            assert store.put(make_key(i), make_value(i, 256 * KiB)), f"put #{i} failed"
            if i % 4:
                assert store.delete(make_key(i))
            assert store.get(k) == make_value("k", 64 * KiB)
        assert store.stats()["tiers"]["nvme"]["compactions"] > 0
        kept = [i for i in range(200) if i % 4 == 0 and store.contains(make_key(i))]
        for i in kept:
            assert store.get(make_key(i)) == make_value(i, 256 * KiB)
    with kvstore.Store(config) as store:
        assert store.get(k) == make_value("k", 64 * KiB)
        for i in kept:
            assert store.get(make_key(i)) in (None, make_value(i, 256 * KiB))


def test_nvme_larger_than_its_filesystem_is_sized_to_it(tmpfs):
    """Issue 15, finding 4: NVMe declared as 256 MiB on a 32 MiB disk. The tier takes what
    the disk holds; every put is acknowledged, and every acknowledged value is either served
    whole or counted as evicted."""
    disk = tmpfs("32m")
    config = kvstore.StoreConfig(dram_bytes="8MiB", nvme_path=disk / "kv", nvme_bytes="256MiB",
                                 max_value_bytes="1MiB")
    values = {}
    with kvstore.Store(config) as store:
        nvme = store.stats()["tiers"]["nvme"]
        assert nvme["disk_capacity_bytes"] == 256 * MiB
        assert nvme["capacity_bytes"] < 32 * MiB
        for i in range(160):
            values[make_key(i)] = make_value(i, 512 * KiB)
            assert store.put(make_key(i), values[make_key(i)])
        store.flush()
        stats = store.stats()
        assert not stats["tiers"]["nvme"]["read_only"]
        served = {k for k, v in values.items() if store.get(k) == v}
        assert all(store.get(k) is None for k in values.keys() - served)
        assert len(values) - len(served) <= stats["evictions"] - stats["demotions"]
        tiers = stats["tiers"]
        assert tiers["nvme"]["blocks"] > 8  # the disk's worth beside DRAM's
        assert len(served) == len(store.placement) >= tiers["dram"]["blocks"] + 8
    with kvstore.Store(config) as store:
        assert {k for k in values if store.get(k) == values[k]} == served


def test_a_disk_that_fills_up_stops_nvme_writes_and_dram_keeps_serving(tmpfs):
    """Issue 15, finding 4: another process fills the disk under the NVMe tier. The tier
    stops writing (read only, in its stats), what it held stays readable (also the records
    whose write failed, from memory), DRAM takes every new put, nothing acknowledged is
    lost without being counted as evicted, flush and close say the store is not durable,
    and a reopen serves what reached the disk."""
    disk = tmpfs("48m")
    config = kvstore.StoreConfig(dram_bytes="8MiB", nvme_path=disk / "kv", nvme_bytes="40MiB",
                                 max_value_bytes="1MiB")
    store = kvstore.Store(config)
    values = {}

    def put(i: int) -> None:
        values[make_key(i)] = make_value(i, 256 * KiB)
        assert store.put(make_key(i), values[make_key(i)]), f"put #{i} refused"

    for i in range(60):  # 15 MiB: half of it demoted to NVMe
        put(i)
    store.flush()
    fill_disk(disk / "filler")
    for i in range(60, 200):
        put(i)
    stats = store.stats()
    assert stats["tiers"]["nvme"]["read_only"]
    served = {k for k, v in values.items() if store.get(k) == v}
    assert all(store.get(k) is None for k in values.keys() - served), "wrong bytes served"
    assert len(values) - len(served) <= stats["evictions"] - stats["demotions"]
    for i in range(200, 240):  # still taking puts, into DRAM
        put(i)
        assert store.get(make_key(i)) == values[make_key(i)]
    with pytest.raises(StorageError, match="stopped writing"):
        store.flush()
    with pytest.raises(StorageError):
        store.close()
    with pytest.raises(kvstore.StoreClosedError):
        store.get(make_key(0))
    (disk / "filler").unlink()
    with kvstore.Store(config) as store:
        for key, value in values.items():
            assert store.get(key) in (None, value)
        assert store.put(make_key("after"), make_value("after", 256 * KiB))
        store.flush()


def test_a_read_only_nvme_tier_refuses_to_replace_what_a_reopen_would_bring_back(tmpfs):
    """From review: with the NVMe tier read only (its disk full), an overwrite or a delete
    of a key whose record is on that disk cannot write the tombstone that hides the old
    record, so a reopen would bring the old value back. Such an overwrite is refused (put
    returns False, the old value still served) and such a delete raises, changing nothing;
    keys with nothing on the disk are put and deleted as ever."""
    disk = tmpfs("48m")
    config = kvstore.StoreConfig(dram_bytes="4MiB", nvme_path=disk / "kv", nvme_bytes="40MiB",
                                 max_value_bytes="1MiB")
    old_key, gone_key = make_key("old"), make_key("gone")
    store = kvstore.Store(config)
    assert store.put(old_key, make_value("old", 200 * KiB))
    assert store.put(gone_key, make_value("gone", 200 * KiB))
    store.flush()  # both on the disk
    fill_disk(disk / "filler")
    for i in range(80):  # demotions hit the full disk: the tier stops writing
        assert store.put(make_key(i), make_value(i, 256 * KiB))
    assert store.stats()["tiers"]["nvme"]["read_only"]
    assert not store.put(old_key, make_value("new", 200 * KiB))
    assert store.put_many([make_key("chain"), old_key], [b"a", b"b"]) == 1
    assert store.get(old_key) == make_value("old", 200 * KiB)
    with pytest.raises(StorageError, match="cannot delete this key durably"):
        store.delete(gone_key)
    assert store.get(gone_key) == make_value("gone", 200 * KiB)
    assert store.put(make_key("fresh"), b"fresh") and store.delete(make_key("fresh"))
    with pytest.raises(StorageError):
        store.close()
    (disk / "filler").unlink()
    with kvstore.Store(config) as store:
        assert store.get(old_key) == make_value("old", 200 * KiB)
        assert store.get(gone_key) == make_value("gone", 200 * KiB)

"""The NVMe tier's log: compaction never resurrects old versions and keeps the disk
bound, a smaller capacity at reopen, a segment the disk cannot read."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kvstore.errors import StorageError
from kvstore.tiers.nvme import NvmeTier
from tests.conftest import make_key, make_value
from tests.tiers.nvme.disk import KiB, MiB, config, disk_bytes, segment_files

# -- compaction -----------------------------------------------------------------------------------

def _fill_segment(tier: NvmeTier, tag: str, nbytes: int = 60 * KiB) -> list[bytes]:
    """Puts until the active segment rotates; returns the keys written into it."""
    keys = []
    start = len(segment_files(Path(tier.config.path)))
    i = 0
    while True:
        key = make_key((tag, i))
        assert tier.put(key, make_value((tag, i), nbytes))
        tier.flush()
        if len(segment_files(Path(tier.config.path))) > start and keys:
            assert tier.evict(key)  # it went into the next segment
            return keys
        keys.append(key)
        i += 1


def _old_version_test(tmp_path: Path, forget: str) -> None:
    """Key k: v1 in segment A (kept: all live), then k is forgotten by a record in segment B
    (evict: v2 then an eviction; delete: a tombstone), and B, all dead, is compacted while
    A stays. v1 must not come back at reopen."""
    cfg = config(tmp_path, capacity_bytes=8 * MiB, segment_bytes=1 * MiB,
                 max_value_bytes=256 * KiB)
    k = make_key("k")
    with NvmeTier(cfg) as tier:
        assert tier.put(k, make_value("v1", 1000))
        _fill_segment(tier, "a")
        if forget == "evict":
            assert tier.put(k, make_value("v2", 1000)) and tier.evict(k)
        else:
            assert tier.delete(k)
        for key in _fill_segment(tier, "b"):
            assert tier.evict(key)
        seg_a, seg_b = segment_files(tmp_path)[:2]
        i = 0
        while tier.stats()["compactions"] == 0:
            assert tier.put(make_key(("c", i)), make_value(i, 60 * KiB))
            if i % 2:
                tier.evict(make_key(("c", i)))
            i += 1
        assert seg_a.exists() and not seg_b.exists(), "the dead segment B goes first"
    with NvmeTier(cfg) as tier:
        assert tier.get(k) is None, "a forgotten older value came back"


def test_compaction_never_resurrects_an_older_version_after_evict(tmp_path):
    _old_version_test(tmp_path, "evict")


def test_deleted_stays_deleted_after_compaction(tmp_path):
    _old_version_test(tmp_path, "delete")


def test_compaction_under_churn_keeps_disk_bound(tmp_path):
    cfg = config(tmp_path, capacity_bytes=4 * MiB, segment_bytes=512 * KiB,
                 max_value_bytes=128 * KiB, write_buffer_bytes=32 * KiB)
    rng = np.random.default_rng(7)
    live: dict[bytes, bytes] = {}
    with NvmeTier(cfg) as tier:
        for step in range(1500):
            key = make_key(int(rng.integers(300)))
            roll = rng.random()
            if roll < 0.65:
                value = make_value(step, int(rng.choice([0, 100, 5000, 40_000, 128 * KiB])))
                while not tier.put(key, value):
                    victim = next(iter(live))  # the store's job: evict the oldest
                    assert tier.evict(victim)
                    del live[victim]
                live[key] = value
            elif roll < 0.8:
                assert tier.evict(key) == (key in live)
                live.pop(key, None)
            elif roll < 0.95:
                assert tier.delete(key) == (key in live)
                live.pop(key, None)
            else:
                tier.flush()
            assert disk_bytes(tmp_path) <= cfg.capacity_bytes
            assert tier.used_bytes <= tier.capacity_bytes
            if step % 100 == 0:
                assert all(tier.get(k) == v for k, v in live.items())
        tier.flush()
        stats = tier.stats()
        assert stats["compactions"] > 10
        assert stats["disk_bytes"] == disk_bytes(tmp_path)
        assert stats["dead_bytes"] == stats["disk_bytes"] - stats["used_bytes"] >= 0
        assert all(tier.get(k) == v for k, v in live.items())
    with NvmeTier(cfg) as tier:
        # Evicted records may come back at reopen; if they overfill the tier, the oldest
        # records are dropped, so a live key may be missing then, but is never wrong.
        dropped = tier.stats()["records_dropped_at_open"]
        for k, v in live.items():
            got = tier.get(k)
            assert got == v or (got is None and dropped)
        assert disk_bytes(tmp_path) <= cfg.capacity_bytes
        assert tier.used_bytes <= tier.capacity_bytes


def test_capacity_shrink_drops_oldest_at_reopen(tmp_path):
    with NvmeTier(config(tmp_path, capacity_bytes=16 * MiB)) as tier:
        for i in range(100):
            assert tier.put(make_key(i), make_value(i, 100 * KiB))
    small = config(tmp_path, capacity_bytes=8 * MiB)
    with NvmeTier(small) as tier:
        stats = tier.stats()
        assert stats["records_dropped_at_open"] > 0
        assert tier.used_bytes <= tier.capacity_bytes
        assert disk_bytes(tmp_path) <= small.capacity_bytes
        kept = [r.key for r in tier.recovered()]
        assert kept == [make_key(i) for i in range(100 - len(kept), 100)]  # the newest stay
        assert all(tier.get(k) is not None for k in kept)


def test_a_segment_the_disk_cannot_read_is_left_and_writes_go_on(tmp_path, monkeypatch):
    """Compaction of a segment whose reads fail (a bad sector: EIO, injected at the pread
    boundary since no real disk here can fail on demand) must not wedge the tier: that
    segment is left as it is and later writes compact others (it failed every write
    needing room before, the same victim picked again and again)."""
    from kvstore.tiers.nvme.files import SegmentFiles

    cfg = config(tmp_path, capacity_bytes=16 * MiB, segment_bytes=2 * MiB)
    read_at = SegmentFiles.read_at
    bad: set[int] = set()

    def failing_read_at(self, seq, offset, buf):
        if seq in bad:
            raise StorageError(f"I/O error on NVMe segment {seq}: [Errno 5] Input/output error")
        return read_at(self, seq, offset, buf)

    monkeypatch.setattr(SegmentFiles, "read_at", failing_read_at)
    with NvmeTier(cfg) as tier:
        for i in range(6):
            assert tier.put(make_key(i), make_value(i, 256 * KiB))
        tier.flush()
        bad.add(1)
        for i in range(1, 6):
            tier.delete(make_key(i))  # segment 1 mostly dead: the first victim
        for i in range(100, 200):
            assert tier.put(make_key(i), make_value(i, 256 * KiB)), i
            if i % 4:
                tier.evict(make_key(i))  # 3 of 4 dead: segment 1 (5 of 6) goes first
        stats = tier.stats()
        assert stats["compactions"] > 0 and not stats["read_only"]
        bad.clear()
        for i in range(100, 200, 4):
            assert tier.get(make_key(i)) == make_value(i, 256 * KiB)

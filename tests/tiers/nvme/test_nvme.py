"""The NVMe tier on real files: round trips, reopen, corruption, compaction, crashes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings, target
from hypothesis import strategies as st

from kvstore.errors import (
    BufferSizeError,
    ConfigError,
    InvalidKeyError,
    InvalidValueError,
    StorageError,
    StoreClosedError,
)
from kvstore.tiers.nvme import Compression, NvmeTier, NvmeTierConfig
from kvstore.tiers.nvme.record import (
    DETACHED_MIN_BYTES,
    HEADER_BYTES,
    HEADERS_PER_PAGE,
    IO_ALIGN,
    FormatVersionError,
    HeaderMac,
    SegmentKey,
    is_detached,
    pack_header,
    record_disk_bound,
    record_footprint,
    unpack_header,
)
from tests.conftest import make_key, make_value

KiB = 1024
MiB = 1024 * KiB
ROOT = Path(__file__).resolve().parents[2]


def config(path: Path, **changes: object) -> NvmeTierConfig:
    fields: dict[str, object] = dict(path=str(path), capacity_bytes=16 * MiB,
                                     max_value_bytes=1 * MiB, segment_bytes=2 * MiB,
                                     write_buffer_bytes=64 * KiB)
    fields.update(changes)
    return NvmeTierConfig(**fields)  # type: ignore[arg-type]


def segment_files(path: Path) -> list[Path]:
    return sorted(path.glob("seg-*.log"))


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in segment_files(path))


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def find(path: Path, needle: bytes) -> int:
    offset = path.read_bytes().find(needle)
    assert offset >= 0, "value not found on disk"
    return offset


SIZES = [0, 1, 7, 4 * KiB, 4 * KiB + 1, 256 * KiB, 1 * MiB]


# -- round trips and reopen ---------------------------------------------------------------------

@pytest.mark.parametrize("direct_io", [True, False], ids=["direct", "buffered"])
def test_round_trip_and_reopen(tmp_path, direct_io):
    cfg = config(tmp_path / "nvme", direct_io=direct_io)
    with NvmeTier(cfg) as tier:
        for n in SIZES:
            assert tier.put(make_key(n), make_value(n, n), parent=make_key(("p", n)))
            assert tier.get(make_key(n)) == make_value(n, n)  # served from the write buffer
        for n in SIZES:
            out = bytearray(n)
            assert tier.read_into(make_key(n), out) and bytes(out) == make_value(n, n)
            assert tier.nbytes_of(make_key(n)) == n
        assert tier.stats()["direct_io"] is direct_io
        tier.flush()
    with NvmeTier(cfg) as tier:
        assert len(tier) == len(SIZES)
        assert [r.key for r in tier.recovered()] == [make_key(n) for n in SIZES]  # oldest first
        for n in SIZES:
            assert tier.get(make_key(n)) == make_value(n, n)
            assert tier.parent_of(make_key(n)) == make_key(("p", n))
        assert tier.stats()["corrupt_records_skipped"] == 0


def test_reads_span_disk_and_write_buffer(tmp_path):
    # A 4 KiB buffer: big values are partly written, partly still buffered; every flush
    # leaves a partial block that the next one rewrites.
    cfg = config(tmp_path, write_buffer_bytes=4 * KiB)
    with NvmeTier(cfg) as tier:
        for i in range(40):
            n = 997 * i + 13
            assert tier.put(make_key(i), make_value(i, n))
            assert tier.get(make_key(i)) == make_value(i, n)
            if i % 3 == 0:
                tier.flush()
        for i in range(40):
            assert tier.get(make_key(i)) == make_value(i, 997 * i + 13)
    with NvmeTier(cfg) as tier:
        for i in range(40):
            assert tier.get(make_key(i)) == make_value(i, 997 * i + 13)


def test_numpy_values_and_outputs(tmp_path):
    with NvmeTier(config(tmp_path)) as tier:
        array = np.arange(3000, dtype=np.float32).reshape(30, 100)
        assert tier.put(make_key("a"), array)
        assert tier.get(make_key("a")) == array.tobytes()
        out = np.empty_like(array)
        assert tier.read_into(make_key("a"), out)
        assert np.array_equal(out, array)
        with pytest.raises(BufferSizeError):
            tier.read_into(make_key("a"), bytearray(10))


def test_overwrite_and_delete_survive_reopen(tmp_path):
    cfg = config(tmp_path)
    with NvmeTier(cfg) as tier:
        for i in range(10):
            tier.put(make_key(i), make_value(("old", i), 5000))
        for i in range(0, 10, 2):
            tier.put(make_key(i), make_value(("new", i), 3000))
        for i in range(1, 10, 4):
            assert tier.delete(make_key(i))
        assert not tier.delete(make_key("never stored"))
    with NvmeTier(cfg) as tier:
        for i in range(10):
            got = tier.get(make_key(i))
            if i % 4 == 1:
                assert got is None
            elif i % 2 == 0:
                assert got == make_value(("new", i), 3000)
            else:
                assert got == make_value(("old", i), 5000)


def test_evicted_key_comes_back_with_its_last_value_only(tmp_path):
    cfg = config(tmp_path)
    with NvmeTier(cfg) as tier:
        tier.put(make_key("k"), make_value(1, 1000))
        tier.put(make_key("k"), make_value(2, 1000))
        assert tier.evict(make_key("k"))
        assert make_key("k") not in tier and tier.get(make_key("k")) is None
        assert not tier.evict(make_key("k"))
    with NvmeTier(cfg) as tier:
        assert tier.get(make_key("k")) == make_value(2, 1000)


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


# -- corruption ----------------------------------------------------------------------------------

def _three_records(tmp_path: Path) -> NvmeTierConfig:
    cfg = config(tmp_path)
    with NvmeTier(cfg) as tier:
        for i in range(3):
            tier.put(make_key(i), make_value(i, 10_000))
    return cfg


def _survivors(cfg: NvmeTierConfig) -> tuple[list[int], dict]:
    with NvmeTier(cfg) as tier:
        present = [i for i in range(3) if tier.get(make_key(i)) is not None]
        for i in present:
            assert tier.get(make_key(i)) == make_value(i, 10_000)
        # the survivors stay good across one more open (and new writes)
        tier.put(make_key("new"), b"x" * 100)
        return present, tier.stats()


def test_torn_tail_is_skipped(tmp_path):
    cfg = _three_records(tmp_path)
    seg = segment_files(tmp_path)[-1]
    start = find(seg, make_value(2, 10_000)) - HEADER_BYTES
    os.truncate(seg, start + HEADER_BYTES + 5000)
    present, stats = _survivors(cfg)
    assert present == [0, 1] and stats["corrupt_records_skipped"] == 1
    with NvmeTier(cfg) as tier:
        assert tier.get(make_key("new")) == b"x" * 100 and tier.get(make_key(1)) is not None


def test_flipped_payload_byte_is_skipped(tmp_path):
    cfg = _three_records(tmp_path)
    seg = segment_files(tmp_path)[-1]
    flip_byte(seg, find(seg, make_value(1, 10_000)) + 4321)
    present, stats = _survivors(cfg)
    assert present == [0, 2] and stats["corrupt_records_skipped"] == 1


@pytest.mark.parametrize("field_offset", [0, 5, 8, 45, 72])  # magic, flags, key, length, checksum
def test_flipped_header_byte_is_skipped(tmp_path, field_offset):
    cfg = _three_records(tmp_path)
    seg = segment_files(tmp_path)[-1]
    flip_byte(seg, find(seg, make_value(1, 10_000)) - HEADER_BYTES + field_offset)
    present, stats = _survivors(cfg)
    assert present == [0, 2] and stats["corrupt_records_skipped"] == 1


def test_flipped_byte_while_open_is_a_checksum_failure(tmp_path):
    with NvmeTier(config(tmp_path)) as tier:
        for i in range(3):
            tier.put(make_key(i), make_value(i, 10_000))
        tier.flush()
        seg = segment_files(tmp_path)[-1]
        flip_byte(seg, find(seg, make_value(1, 10_000)) + 10)
        assert tier.get(make_key(1)) is None
        assert tier.stats()["checksum_failures"] == 1
        assert make_key(1) not in tier  # forgotten: never counted as present again
        assert not tier.read_into(make_key(1), bytearray(10_000))
        assert tier.get(make_key(0)) == make_value(0, 10_000)
        assert tier.get(make_key(2)) == make_value(2, 10_000)
    with NvmeTier(config(tmp_path)) as tier:
        assert tier.get(make_key(1)) is None


def test_corrupt_newer_version_hides_the_older(tmp_path):
    cfg = config(tmp_path)
    with NvmeTier(cfg) as tier:
        tier.put(make_key("k"), make_value("v1", 10_000))
        tier.put(make_key("k"), make_value("v2", 10_000))
    seg = segment_files(tmp_path)[-1]
    flip_byte(seg, find(seg, make_value("v2", 10_000)) + 99)
    with NvmeTier(cfg) as tier:
        assert tier.get(make_key("k")) is None  # never the stale v1
        assert tier.stats()["corrupt_records_skipped"] == 1


# -- the aligned layout of large payloads -------------------------------------------------------

def aligned_array(nbytes: int, skew: int = 0) -> np.ndarray:
    """A uint8 array of ``nbytes`` starting ``skew`` bytes past a 4 KiB boundary."""
    base = np.zeros(nbytes + 2 * IO_ALIGN, dtype=np.uint8)
    start = -base.ctypes.data % IO_ALIGN + skew
    return base[start:start + nbytes]


# Detached sizes (large, some not a multiple of 4 KiB, and whole 4 KiB blocks) with inline
# records between them that leave the segment's end at every kind of offset.
_MIXED = [(i, n) for i, n in enumerate([DETACHED_MIN_BYTES, 13, 256 * KiB, 4 * KiB + 1,
                                        DETACHED_MIN_BYTES + 1, 4072, 1 * MiB - 8, 0, 4 * KiB,
                                        8 * KiB, 300_001, 10_000, 4 * KiB, 12 * KiB - 8])]


def segment_mac(segment: Path) -> HeaderMac:
    """The MAC of a segment's headers, from its directory's KEY (as the tier makes it)."""
    seq = int(segment.name[4:-4])
    return SegmentKey((segment.parent / "KEY").read_bytes()).for_segment(seq)


def header_of(segment: Path, key: bytes) -> tuple[int, object]:
    """Where the header of ``key`` is in a segment, and the header."""
    data = segment.read_bytes()
    at = data.find(key) - 8
    assert at >= 0 and at % 8 == 0, "header not found"
    header = unpack_header(data[at:at + HEADER_BYTES], segment_mac(segment), at)
    assert header is not None
    return at, header


@pytest.mark.parametrize("direct_io", [True, False], ids=["direct", "buffered"])
def test_detached_payloads_start_4k_aligned_and_inline_ones_stay_packed(tmp_path, direct_io):
    cfg = config(tmp_path, direct_io=direct_io, write_buffer_bytes=4 * KiB)
    with NvmeTier(cfg) as tier:
        for i, n in _MIXED:
            assert tier.put(make_key(i), make_value(i, n))
        assert tier.used_bytes == sum(record_footprint(n) for _, n in _MIXED)
    seg = segment_files(tmp_path)[-1]
    data = seg.read_bytes()
    end = 0
    for i, n in _MIXED:
        at, header = header_of(seg, make_key(i))
        offset = at + HEADER_BYTES
        if is_detached(n):
            offset = header.aux
            assert header.is_detached and offset % IO_ALIGN == 0, f"{n} bytes at {offset}"
            assert at < offset and (at % IO_ALIGN) % HEADER_BYTES == 0  # a header page slot
            assert offset - end < 2 * IO_ALIGN  # at most padding and one header page
        else:
            assert not header.is_detached and at == end  # right after the previous record
        assert data[offset:offset + n] == make_value(i, n)
        end = offset + n + (-n % 8)
    # The 4 KiB write buffer seals each header page at once: a page (and the padding in
    # front of it) per detached record, the most `record_disk_bound` allows.
    assert disk_bytes(tmp_path) <= sum(record_disk_bound(n) for _, n in _MIXED) + IO_ALIGN
    with NvmeTier(cfg) as tier:
        assert tier.stats()["corrupt_records_skipped"] == 0
        for i, n in _MIXED:
            for skew in (0, 16):
                out = aligned_array(n, skew)
                assert tier.read_into(make_key(i), out) and out.tobytes() == make_value(i, n)
            assert tier.get(make_key(i)) == make_value(i, n)


def test_one_header_page_serves_many_records(tmp_path):
    cfg = config(tmp_path, write_buffer_bytes=1 * MiB)
    n = 2 * HEADERS_PER_PAGE + 5
    with NvmeTier(cfg) as tier:
        for i in range(n):
            assert tier.put(make_key(i), make_value(i, 4 * KiB))
            if i == 7:
                tier.delete(make_key(3))  # an inline tombstone between payloads
        tier.flush()
        # Three header pages for n 4 KiB values, not a block of header per value.
        assert disk_bytes(tmp_path) == n * 4 * KiB + 3 * IO_ALIGN + IO_ALIGN
    assert header_of(segment_files(tmp_path)[-1], make_key(1))[0] == HEADER_BYTES  # page 1, slot 2
    with NvmeTier(cfg) as tier:
        assert tier.stats()["corrupt_records_skipped"] == 0
        assert make_key(3) not in tier and len(tier) == n - 1
        for i in range(n):
            if i != 3:
                assert tier.get(make_key(i)) == make_value(i, 4 * KiB)


def test_replay_keeps_write_order_across_inline_and_detached_records(tmp_path):
    cfg = config(tmp_path, write_buffer_bytes=1 * MiB)
    with NvmeTier(cfg) as tier:
        tier.put(make_key("k"), make_value("v1", 4 * KiB))  # detached, header in page 1
        tier.delete(make_key("k"))                         # inline tombstone after it
        tier.put(make_key("k"), make_value("v2", 4 * KiB))  # header in page 1, payload last
        tier.put(make_key("j"), make_value("j1", 4 * KiB))
        tier.put(make_key("j"), make_value("j2", 100))     # inline, after j1's payload
    with NvmeTier(cfg) as tier:
        assert tier.get(make_key("k")) == make_value("v2", 4 * KiB)
        assert tier.get(make_key("j")) == make_value("j2", 100)


@pytest.mark.parametrize("n", [4 * KiB, 256 * KiB], ids=["4KiB", "256KiB"])
def test_aligned_read_fetches_exactly_the_payload(tmp_path, n):
    with NvmeTier(config(tmp_path)) as tier:
        tier.put(make_key("small"), make_value("small", 100))
        tier.put(make_key("big"), make_value("big", n))
        tier.flush()
    with NvmeTier(config(tmp_path)) as tier:
        before = tier.stats()["bytes_read"]
        out = aligned_array(n)
        assert tier.read_into(make_key("big"), out) and out.tobytes() == make_value("big", n)
        assert tier.stats()["bytes_read"] - before == n  # not n + a block for the header
        before = tier.stats()["bytes_read"]
        assert tier.get(make_key("big")) == make_value("big", n)
        assert tier.stats()["bytes_read"] - before == n


def test_torn_detached_payload_is_skipped(tmp_path):
    cfg = config(tmp_path)
    with NvmeTier(cfg) as tier:
        for i in range(3):
            tier.put(make_key(i), make_value(i, 8 * KiB))
    seg = segment_files(tmp_path)[-1]
    os.truncate(seg, find(seg, make_value(2, 8 * KiB)) + 4 * KiB)  # half of the last payload
    with NvmeTier(cfg) as tier:
        assert [i for i in range(3) if make_key(i) in tier] == [0, 1]
        assert tier.stats()["corrupt_records_skipped"] == 1
        assert tier.put(make_key("new"), make_value("new", 8 * KiB))
    with NvmeTier(cfg) as tier:
        assert tier.get(make_key("new")) == make_value("new", 8 * KiB)
        assert tier.get(make_key(1)) == make_value(1, 8 * KiB)


@pytest.mark.parametrize("skew", [0, 16], ids=["aligned-out", "unaligned-out"])
def test_flipped_byte_in_aligned_payload_is_a_miss(tmp_path, skew):
    n = 256 * KiB
    with NvmeTier(config(tmp_path)) as tier:
        for i in range(3):
            tier.put(make_key(i), make_value(i, n))
        tier.flush()
        seg = segment_files(tmp_path)[-1]
        flip_byte(seg, find(seg, make_value(1, n)) + n - 1)  # the last byte of the payload
        assert not tier.read_into(make_key(1), aligned_array(n, skew))
        assert tier.stats()["checksum_failures"] == 1 and make_key(1) not in tier
        out = aligned_array(n, skew)
        assert tier.read_into(make_key(2), out) and out.tobytes() == make_value(2, n)
    with NvmeTier(config(tmp_path)) as tier:
        assert tier.get(make_key(1)) is None
        assert tier.stats()["corrupt_records_skipped"] == 1
        assert tier.get(make_key(0)) == make_value(0, n)


@pytest.mark.parametrize("field_offset", [0, 40, 72])  # magic, stored length, checksum
def test_flipped_header_byte_of_aligned_record_is_skipped(tmp_path, field_offset):
    n = 256 * KiB
    cfg = config(tmp_path)
    with NvmeTier(cfg) as tier:
        for i in range(3):
            tier.put(make_key(i), make_value(i, n))
    seg = segment_files(tmp_path)[-1]
    flip_byte(seg, header_of(seg, make_key(1))[0] + field_offset)
    with NvmeTier(cfg) as tier:
        assert [i for i in range(3) if make_key(i) in tier] == [0, 2]
        assert tier.stats()["corrupt_records_skipped"] == 1
        assert tier.get(make_key(2)) == make_value(2, n)


def _directory_key(path: Path) -> SegmentKey:
    """The key of a fresh NVMe directory, as its first open makes it."""
    NvmeTier(config(path)).close()
    for segment in segment_files(path):
        segment.unlink()
    return SegmentKey((path / "KEY").read_bytes())


def test_misplaced_detached_record_is_corrupt(tmp_path):
    mac = _directory_key(tmp_path).for_segment(1)
    # A large record inline after its header is not one this format writes, its MAC right
    # and all ...
    head = bytearray(pack_header(0, make_key("big"), None, 100_000, 100_000, 0))
    head[5] &= ~8  # not detached
    (tmp_path / "seg-0000000001.log").write_bytes(bytes(8) + mac.sign(bytes(head))
                                                  + bytes(100_000))
    with NvmeTier(config(tmp_path)) as tier:
        assert len(tier) == 0 and tier.stats()["corrupt_records_skipped"] == 1
    # ... nor a detached one whose payload would lie before its own header page.
    (tmp_path / "seg-0000000001.log").write_bytes(
        bytes(IO_ALIGN) + mac.sign(pack_header(0, make_key("big"), None, 100_000, 100_000, 0,
                                               payload_offset=0)) + bytes(100_000))
    with NvmeTier(config(tmp_path)) as tier:
        assert len(tier) == 0 and tier.stats()["corrupt_records_skipped"] == 1


def test_segment_of_another_format_version_is_refused(tmp_path):
    import struct

    import xxhash
    payload_checksum = xxhash.xxh3_64_intdigest(b"hello")
    head = bytearray(pack_header(0, make_key("old"), None, 5, 5, payload_checksum))
    head[4] = 3  # format 3: the header ended in an unkeyed xxh3 of its first 72 bytes
    header = bytes(head) + struct.pack("<Q", xxhash.xxh3_64_intdigest(bytes(head)))
    (tmp_path / "seg-0000000001.log").write_bytes(header + b"hello" + bytes(3))
    with pytest.raises(FormatVersionError, match="format version 3"):
        NvmeTier(config(tmp_path))
    with pytest.raises(StorageError):  # the same error, for callers that catch StorageError
        NvmeTier(config(tmp_path))


# -- records no client can forge ------------------------------------------------------------------

def _forged_record(key: bytes, value: bytes, mac: HeaderMac | str) -> bytes:
    """A complete inline record of ``key`` holding ``value``, as a tenant would build one
    inside a value of its own: magic, format, lengths and payload checksum all right, and
    for the header's last 8 bytes the best a forger has: ``"xxh3"``, the unkeyed checksum
    that format 3 took (what the attack of issue 15 used), ``"own-key"``, a MAC under a key
    of the forger's choosing, or a `HeaderMac` (of another segment, say)."""
    import struct

    import xxhash
    head = pack_header(0, key, None, len(value), len(value), xxhash.xxh3_64_intdigest(value))
    if mac == "xxh3":
        header = head + struct.pack("<Q", xxhash.xxh3_64_intdigest(head))
    elif mac == "own-key":
        header = SegmentKey(bytes(32)).for_segment(1).sign(head)
    else:
        header = mac.sign(head)
    return header + value + bytes(-len(value) % 8)


@pytest.mark.parametrize("forged_mac", ["xxh3", "own-key"])
@pytest.mark.parametrize("damage", ["header", "cut"])
def test_a_record_forged_inside_a_value_is_never_taken_for_one(tmp_path, damage, forged_mac):
    """Recovery resynchronises after a damaged header or a segment cut short by looking
    for the next header: one planted inside another value (finding 2 of issue 15) must not
    pass, or the victim's key reads the attacker's bytes as a hit."""
    cfg = config(tmp_path)
    victim_key, attacker_key = make_key("victim"), make_key("attacker")
    planted = b"ATTACKER" * 64
    # The attacker's value: padding, then a whole record of the victim's key, then more.
    attack = bytes(1000) + _forged_record(victim_key, planted, forged_mac) + bytes(3000)
    with NvmeTier(cfg) as tier:
        assert tier.put(make_key("before"), make_value("before", 300))
        assert tier.put(attacker_key, attack)
        tier.flush()
    seg = segment_files(tmp_path)[-1]
    at, _ = header_of(seg, attacker_key)
    if damage == "header":
        flip_byte(seg, at + 40)  # one byte of the attacker's own header
    else:
        os.truncate(seg, at + HEADER_BYTES + 2000)  # cut inside the attacker's value
    with NvmeTier(cfg) as tier:
        assert victim_key not in tier
        assert tier.get(victim_key) is None
        assert tier.get(make_key("before")) == make_value("before", 300)
        assert attacker_key not in tier


def test_a_record_with_a_right_mac_of_another_segment_is_not_one(tmp_path):
    """Even with the directory's MAC, a record copied from one segment into another does
    not pass: the MAC covers the segment's seqno."""
    key = _directory_key(tmp_path)
    planted = b"copied" * 10
    attack = bytes(64) + _forged_record(make_key("victim"), planted, key.for_segment(99))
    with NvmeTier(config(tmp_path)) as tier:
        assert tier.put(make_key("attacker"), attack)
        tier.flush()
    seg = segment_files(tmp_path)[-1]
    flip_byte(seg, header_of(seg, make_key("attacker"))[0] + 40)
    with NvmeTier(config(tmp_path)) as tier:
        assert make_key("victim") not in tier


def test_directory_and_files_are_private(tmp_path):
    path = tmp_path / "nvme"
    path.mkdir(mode=0o755)
    (path / "seg-0000000001.log").touch(mode=0o644)  # left by an older kvstore
    with NvmeTier(config(path)) as tier:
        assert tier.put(make_key(1), b"secret")
        tier.flush()
    assert path.stat().st_mode & 0o777 == 0o700
    for entry in path.iterdir():
        assert entry.stat().st_mode & 0o777 == 0o600, entry.name


def test_nvme_path_that_is_a_file_is_refused_by_name(tmp_path):
    path = tmp_path / "not-a-directory"
    path.write_bytes(b"x")
    with pytest.raises(StorageError, match="is a file, not a directory"):
        NvmeTier(config(path))


def test_a_damaged_key_file_is_refused(tmp_path):
    _directory_key(tmp_path)
    (tmp_path / "KEY").write_bytes(b"short")
    with pytest.raises(StorageError, match="KEY is damaged"):
        NvmeTier(config(tmp_path))


# -- options and misuse --------------------------------------------------------------------------

def test_lz4_round_trip_and_ratio(tmp_path):
    cfg = config(tmp_path, compression=Compression.LZ4)
    compressible = b"kv-cache " * 20_000
    noise = np.random.default_rng(1).bytes(50_000)
    with NvmeTier(cfg) as tier:
        assert tier.put(make_key("z"), compressible)
        assert tier.put(make_key("n"), noise)  # stored raw: compressing would not shrink it
        assert tier.used_bytes < len(compressible) // 10 + len(noise) + 4 * KiB
        assert tier.stats()["compression_ratio"] > 2
        assert tier.get(make_key("z")) == compressible
        out = bytearray(len(compressible))
        assert tier.read_into(make_key("z"), out) and out == compressible
    with NvmeTier(cfg) as tier:
        assert tier.get(make_key("z")) == compressible and tier.get(make_key("n")) == noise
    with NvmeTier(config(tmp_path)) as tier:  # compression off: old records still read
        assert tier.get(make_key("z")) == compressible


def test_bad_input_changes_nothing(tmp_path):
    with NvmeTier(config(tmp_path)) as tier:
        with pytest.raises(InvalidKeyError):
            tier.put(b"short", b"v")
        with pytest.raises(InvalidKeyError):
            tier.put(make_key(1), b"v", parent=b"bad")
        with pytest.raises(InvalidValueError):
            tier.put(make_key(1), bytes(MiB + 1))
        with pytest.raises(InvalidValueError):
            tier.put(make_key(1), "text")
        with pytest.raises(InvalidKeyError):
            tier.get(b"x" * 17)
        assert len(tier) == 0 and tier.used_bytes == 0


def test_full_tier_refuses_and_changes_nothing(tmp_path):
    with NvmeTier(config(tmp_path)) as tier:
        i = 0
        while tier.put(make_key(i), make_value(i, 200 * KiB)):
            i += 1
        used, n = tier.used_bytes, len(tier)
        assert not tier.put(make_key(0), make_value("other", 200 * KiB))
        assert tier.used_bytes == used and len(tier) == n
        assert tier.get(make_key(0)) == make_value(0, 200 * KiB)
        assert disk_bytes(tmp_path) <= tier.config.capacity_bytes


@pytest.mark.parametrize("changes", [
    dict(segment_bytes=1 * MiB),                      # cannot hold a 1 MiB value + header
    dict(capacity_bytes=7 * MiB),                     # fewer than 4 segments
    dict(capacity_bytes=0),
    dict(write_buffer_bytes=True),
    dict(compression="zstd"),
])
def test_bad_config_is_refused(tmp_path, changes):
    with pytest.raises(ConfigError):
        config(tmp_path, **changes)


def test_unusable_directory_and_double_open(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(StorageError):
        NvmeTier(config(tmp_path / "file" / "nvme"))
    tier = NvmeTier(config(tmp_path / "d"))
    with pytest.raises(StorageError):
        NvmeTier(config(tmp_path / "d"))
    tier.close()
    tier.close()
    with pytest.raises(StoreClosedError):
        tier.get(make_key(1))
    with pytest.raises(StoreClosedError):
        tier.put(make_key(1), b"v")
    NvmeTier(config(tmp_path / "d")).close()  # the lock went with close()


def test_threads_share_one_tier(tmp_path):
    errors: list[BaseException] = []
    with NvmeTier(config(tmp_path, capacity_bytes=16 * MiB)) as tier:
        def work(t: int) -> None:
            try:
                for i in range(150):
                    key = make_key((t, i % 20))
                    value = make_value((t, i), 1000 + 37 * i)
                    assert tier.put(key, value)
                    assert tier.get(key) == value
                    if i % 25 == 0:
                        tier.flush()
            except BaseException as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors
        assert len(tier) == 80


# -- a crash -------------------------------------------------------------------------------------

CHILD = """
import sys, time
sys.path.insert(0, {root!r})
from kvstore.tiers.nvme import NvmeTier, NvmeTierConfig
from tests.conftest import make_key, make_value
tier = NvmeTier(NvmeTierConfig(path={path!r}, capacity_bytes=32 << 20, max_value_bytes=64 << 10,
                               segment_bytes=1 << 20, write_buffer_bytes=64 << 10))
i = 0
while tier.put(make_key(i), make_value(i, 1 + i * 7919 % 20000)):
    i += 1
    if i % 25 == 0:
        tier.flush()
        print(i, flush=True)
time.sleep(60)
"""


def test_sigkill_keeps_every_flushed_value(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", CHILD.format(root=str(ROOT),
                                                                 path=str(tmp_path))],
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    flushed = 0
    for line in child.stdout:
        flushed = int(line)
        if flushed >= 1000:
            break
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert flushed >= 1000
    cfg = NvmeTierConfig(path=str(tmp_path), capacity_bytes=32 * MiB, max_value_bytes=64 * KiB,
                         segment_bytes=1 * MiB, write_buffer_bytes=64 * KiB)
    with NvmeTier(cfg) as tier:
        for i in range(flushed):
            assert tier.get(make_key(i)) == make_value(i, 1 + i * 7919 % 20000), i
        for i in range(flushed, flushed + 5000):
            got = tier.get(make_key(i))
            assert got is None or got == make_value(i, 1 + i * 7919 % 20000)


# -- the model -----------------------------------------------------------------------------------

NUM_KEYS = 10
OPS = st.lists(st.one_of(
    st.tuples(st.sampled_from(["put", "churn"]), st.integers(0, NUM_KEYS - 1),
              st.sampled_from([0, 1, 3000, 9000, 16 * KiB])),
    st.tuples(st.just("evict"), st.integers(0, NUM_KEYS - 1), st.just(0)),
    st.tuples(st.just("delete"), st.integers(0, NUM_KEYS - 1), st.just(0)),
    st.tuples(st.just("flush"), st.just(0), st.just(0)),
    st.tuples(st.just("reopen"), st.just(0), st.just(0)),
), min_size=10, max_size=100)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS)
def test_matches_a_dict_model(ops):
    """Live values are exact; an evicted key may come back at reopen, but only with its
    last value; a deleted key never does; the files stay within capacity."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        cfg = NvmeTierConfig(path=tmp, capacity_bytes=256 * KiB, max_value_bytes=16 * KiB,
                             segment_bytes=64 * KiB, write_buffer_bytes=8 * KiB)
        live: dict[bytes, bytes] = {}
        ghosts: dict[bytes, bytes] = {}  # evicted: may come back with exactly this value
        tier = NvmeTier(cfg)
        compactions = 0
        try:
            for step, (op, k, nbytes) in enumerate(ops):
                key = make_key(k)
                if op in ("put", "churn"):  # churn: overwrite a few times (dead bytes)
                    for i in range(6 if op == "churn" else 1):
                        value = make_value((step, k, i), nbytes)
                        source: object = value
                        if (step + i) % 2:  # page-aligned, as O_DIRECT could write it
                            source = aligned_array(nbytes)
                            source[:] = np.frombuffer(value, dtype=np.uint8)
                        stored = tier.put(key, source)
                        if source is not value:
                            source[:] = 0xFF  # the caller reuses its memory at once
                        if stored:
                            live[key] = value
                            ghosts.pop(key, None)
                        else:
                            assert (tier.used_bytes + tier.footprint_bytes(nbytes)
                                    > tier.capacity_bytes)
                elif op == "evict":
                    assert tier.evict(key) == (key in live)
                    if key in live:
                        ghosts[key] = live.pop(key)
                elif op == "delete":
                    assert tier.delete(key) == (key in live)
                    live.pop(key, None)
                    ghosts.pop(key, None)
                elif op == "flush":
                    tier.flush()
                else:
                    compactions += tier.stats()["compactions"]
                    tier.close()
                    tier = NvmeTier(cfg)
                    dropped = tier.stats()["records_dropped_at_open"]
                    for i in range(NUM_KEYS):
                        key = make_key(i)
                        got = tier.get(key)
                        if got is None:
                            if key in live:
                                assert dropped, "a live value was lost at reopen"
                                ghosts[key] = live.pop(key)
                        else:
                            assert got == live.get(key, ghosts.get(key)), "a wrong value"
                            live[key] = got
                            ghosts.pop(key, None)
                for i in range(NUM_KEYS):
                    key = make_key(i)
                    assert tier.get(key) == live.get(key)
                assert tier.used_bytes <= tier.capacity_bytes
                assert disk_bytes(path) <= cfg.capacity_bytes
            compactions += tier.stats()["compactions"]
            event(f"compactions: {min(compactions, 5)}")
            target(float(compactions))  # steer the search towards compaction
        finally:
            tier.close()


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

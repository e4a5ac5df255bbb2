"""The NVMe tier's records on disk: corrupt ones skipped, the aligned layout of large
payloads, another format refused, records no client can forge."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kvstore.errors import StorageError
from kvstore.tiers.nvme import NvmeTier, NvmeTierConfig
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
from tests.tiers.nvme.disk import (
    KiB,
    MiB,
    aligned_array,
    config,
    directory_key,
    disk_bytes,
    find,
    flip_byte,
    segment_files,
)

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


def test_misplaced_detached_record_is_corrupt(tmp_path):
    mac = directory_key(tmp_path).for_segment(1)
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
    key = directory_key(tmp_path)
    planted = b"copied" * 10
    attack = bytes(64) + _forged_record(make_key("victim"), planted, key.for_segment(99))
    with NvmeTier(config(tmp_path)) as tier:
        assert tier.put(make_key("attacker"), attack)
        tier.flush()
    seg = segment_files(tmp_path)[-1]
    flip_byte(seg, header_of(seg, make_key("attacker"))[0] + 40)
    with NvmeTier(config(tmp_path)) as tier:
        assert make_key("victim") not in tier

"""The NVMe tier's on-disk record format, and the scanner that reads a segment back.

A segment file is a sequence of records, each starting at a multiple of 8 bytes:

    offset  size  field
    0       4     magic b"KVSR"
    4       1     format version (2)
    5       1     flags: 1 = payload is LZ4-compressed, 2 = tombstone, 4 = has a parent
    6       2     reserved, zero
    8       16    key
    24      16    parent key (zeros when there is none)
    40      8     stored length: payload bytes on disk
    48      8     raw length: value bytes once decompressed
    56      8     xxh3_64 of the stored payload
    64      8     tombstone: seqno of the segment that held the deleted record; else 0
    72      8     xxh3_64 of bytes 0..72 (the header checksum)
    80      ...   payload (stored length bytes), then zeros up to a multiple of 8

All integers are little-endian. A record is valid when its header checksum matches, it
ends inside the file and its payload checksum matches. Bytes after the last record of a
segment are zeros (the tail of the last 4 KiB block written).

Version 2 aligns large payloads: a record whose stored length is at least
`ALIGNED_PAYLOAD_MIN_BYTES` is placed so that its payload starts on a 4 KiB boundary, with
zeros between the previous record's end and its header. Then one O_DIRECT read of
exactly the payload's blocks fetches it, straight into a caller's aligned buffer:

         previous record | zeros ... | header (80) | payload, 4 KiB aligned ... | 0..7 zeros
                                                    ^ multiple of 4096

The gap is at most ``IO_ALIGN - RECORD_ALIGN`` bytes, so `record_footprint` (what the tier
accounts for a record wherever it lands) adds that much for an aligned record. Smaller
records stay packed (header then payload): the extra block they read costs less than the
padding would. A header whose checksum holds but whose version is not 2 is a segment
written by another format: opening fails with `FormatVersionError` rather than dropping
its records as corrupt.

The scanner reads a segment in large sequential windows and yields every record whose
header is valid; between valid records it skips zeros silently and counts anything else
(a torn write, flipped bits, also after a run of zeros) as one corrupt region, then resumes
at the next 8-byte aligned magic whose header checksum holds.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import xxhash

from kvstore.errors import StorageError

MAGIC = b"KVSR"
FORMAT_VERSION = 2
HEADER_BYTES = 80
RECORD_ALIGN = 8
IO_ALIGN = 4096  # O_DIRECT granularity: offsets, lengths and buffers of every disk I/O
ALIGNED_PAYLOAD_MIN_BYTES = 64 * 1024  # payloads this large start 4 KiB aligned

FLAG_COMPRESSED = 1
FLAG_TOMBSTONE = 2
FLAG_HAS_PARENT = 4
_KNOWN_FLAGS = FLAG_COMPRESSED | FLAG_TOMBSTONE | FLAG_HAS_PARENT

_HEAD = struct.Struct("<4sBBH16s16sQQQQ")  # everything the header checksum covers
_CHECKSUM = struct.Struct("<Q")
_NO_PARENT = bytes(16)
_ZEROS8 = bytes(8)
_ZERO_SCAN_BYTES = 64 * 1024  # how far `skip_zeros` looks per step
assert _HEAD.size + _CHECKSUM.size == HEADER_BYTES

checksum = xxhash.xxh3_64_intdigest


def align_up(n: int, align: int = IO_ALIGN) -> int:
    return -(-n // align) * align


def align_down(n: int, align: int = IO_ALIGN) -> int:
    return n - n % align


class FormatVersionError(StorageError):
    """A segment holds records of another on-disk format version."""


def is_payload_aligned(stored_bytes: int) -> bool:
    """Whether a record with ``stored_bytes`` of payload starts its payload 4 KiB aligned."""
    return stored_bytes >= ALIGNED_PAYLOAD_MIN_BYTES


def record_span(stored_bytes: int) -> int:
    """Bytes from a record's header to its end (the next record may start there)."""
    return HEADER_BYTES + align_up(stored_bytes, RECORD_ALIGN)


def record_offset(end: int, stored_bytes: int) -> int:
    """Where the header of a record with ``stored_bytes`` of payload goes when the segment's
    records so far end at ``end``: right there, or late enough to align its payload."""
    if is_payload_aligned(stored_bytes):
        return align_up(end + HEADER_BYTES) - HEADER_BYTES
    return end


def record_footprint(stored_bytes: int) -> int:
    """The most bytes a record with ``stored_bytes`` of payload takes in its segment, the
    alignment gap in front of it included: what the tier accounts for it."""
    gap = IO_ALIGN - RECORD_ALIGN if is_payload_aligned(stored_bytes) else 0
    return gap + record_span(stored_bytes)


TOMBSTONE_FOOTPRINT = record_footprint(0)


@dataclass(frozen=True, slots=True)
class RecordHeader:
    flags: int
    key: bytes
    parent: bytes | None
    stored_len: int
    raw_len: int
    payload_checksum: int
    deleted_seq: int  # tombstones: the segment that held the deleted record

    @property
    def is_tombstone(self) -> bool:
        return bool(self.flags & FLAG_TOMBSTONE)

    @property
    def is_compressed(self) -> bool:
        return bool(self.flags & FLAG_COMPRESSED)

    @property
    def span(self) -> int:
        return record_span(self.stored_len)


def pack_header(flags: int, key: bytes, parent: bytes | None, stored_len: int, raw_len: int,
                payload_checksum: int, deleted_seq: int = 0) -> bytes:
    if parent is not None:
        flags |= FLAG_HAS_PARENT
    head = _HEAD.pack(MAGIC, FORMAT_VERSION, flags, 0, key, parent or _NO_PARENT,
                      stored_len, raw_len, payload_checksum, deleted_seq)
    return head + _CHECKSUM.pack(checksum(head))


def tombstone_header(key: bytes, deleted_seq: int) -> bytes:
    return pack_header(FLAG_TOMBSTONE, key, None, 0, 0, checksum(b""), deleted_seq)


def unpack_header(buf: memoryview | bytes, offset: int | None = None) -> RecordHeader | None:
    """The header at the start of ``buf`` (at least 80 bytes), or None if it is not valid.

    With ``offset`` (where ``buf`` starts in its segment), a large record whose payload
    would not start 4 KiB aligned there is not valid either. A header of another format
    version whose checksum holds raises `FormatVersionError`.
    """
    if buf[:4] != MAGIC:
        return None
    head = buf[:_HEAD.size]
    if _CHECKSUM.unpack_from(buf, _HEAD.size)[0] != checksum(head):
        return None
    (_, version, flags, _, key, parent, stored_len, raw_len, payload_checksum,
     deleted_seq) = _HEAD.unpack(head)
    if version != FORMAT_VERSION:
        raise FormatVersionError(
            f"an NVMe segment holds records of on-disk format version {version}; this kvstore "
            f"reads version {FORMAT_VERSION} only (there is no migration: remove the segment "
            "files or point nvme_path at an empty directory)")
    if flags & ~_KNOWN_FLAGS:
        return None
    if (offset is not None and is_payload_aligned(stored_len)
            and (offset + HEADER_BYTES) % IO_ALIGN):
        return None
    if flags & FLAG_TOMBSTONE and stored_len:
        return None
    if not flags & FLAG_COMPRESSED and stored_len != raw_len:
        return None
    return RecordHeader(flags, key, parent if flags & FLAG_HAS_PARENT else None, stored_len,
                        raw_len, payload_checksum, deleted_seq)


# -- reading a segment back -----------------------------------------------------------------

ReadAt = Callable[[int, memoryview], int]  # (aligned offset, aligned buffer) -> bytes read


@dataclass
class ScanReport:
    """What one scan found besides its records."""

    num_corrupt: int = 0   # corrupt regions: torn or flipped records, garbage
    end_offset: int = 0    # end of the last record whose header was valid


@dataclass(frozen=True, slots=True)
class ScannedRecord:
    offset: int
    header: RecordHeader
    data: memoryview   # header + payload; valid only until the scan moves on
    is_intact: bool    # False: the header is valid but the payload checksum is not


class _Window:
    """An aligned buffer over ``[base, base + length)`` of a file, refilled on demand."""

    def __init__(self, read_at: ReadAt, file_bytes: int, window_bytes: int) -> None:
        self.read_at = read_at
        self.file_bytes = file_bytes
        self._alloc(align_up(max(window_bytes, IO_ALIGN)))
        self.base = 0
        self.length = 0

    def _alloc(self, nbytes: int) -> None:
        self.buf = mmap.mmap(-1, nbytes)  # page-aligned, as O_DIRECT wants
        self.view_all = memoryview(self.buf)

    def fill(self, pos: int, nbytes: int) -> bool:
        """Make ``[pos, pos + nbytes)`` readable; False if the file ends before that."""
        if pos + nbytes > self.file_bytes:
            return False
        if self.base <= pos and pos + nbytes <= self.base + self.length:
            return True
        base = align_down(pos)
        need = align_up(pos + nbytes) - base
        if need > len(self.buf):
            self._alloc(need)  # a record larger than the window (an older, larger config)
        want = min(len(self.buf), align_up(self.file_bytes) - base)
        self.base = base
        self.length = self.read_at(base, self.view_all[:want])
        return pos + nbytes <= base + self.length

    def view(self, pos: int, nbytes: int) -> memoryview:
        start = pos - self.base
        return self.view_all[start:start + nbytes]

    def skip_zeros(self, pos: int) -> int:
        """The first 8-aligned offset >= ``pos`` whose 8 bytes are not all zero (the file's
        end if there is none)."""
        pos = align_up(pos, RECORD_ALIGN)
        while self.fill(pos, RECORD_ALIGN):
            stop = min(self.base + self.length, pos + _ZERO_SCAN_BYTES)
            num_words = (stop - pos) // RECORD_ALIGN
            words = np.frombuffer(self.buf, dtype=np.uint64, count=num_words,
                                  offset=pos - self.base)
            nonzero = np.flatnonzero(words)
            if nonzero.size:
                return pos + RECORD_ALIGN * int(nonzero[0])
            pos += RECORD_ALIGN * num_words
        return min(pos, self.file_bytes)

    def find_header(self, pos: int) -> int | None:
        """The first aligned offset >= ``pos`` holding a valid header, or None."""
        pos = align_up(pos, RECORD_ALIGN)
        while self.fill(pos, HEADER_BYTES):
            end = self.base + self.length
            hit = self.buf.find(MAGIC, pos - self.base, end - self.base)
            if hit < 0:
                pos = align_down(end - HEADER_BYTES, RECORD_ALIGN) + RECORD_ALIGN
                continue
            hit += self.base
            if hit % RECORD_ALIGN:
                pos = align_up(hit, RECORD_ALIGN)
                continue
            if (self.fill(hit, HEADER_BYTES)
                    and unpack_header(self.view(hit, HEADER_BYTES), hit)):
                return hit
            pos = hit + RECORD_ALIGN
        return None


def scan_records(read_at: ReadAt, file_bytes: int, report: ScanReport,
                 window_bytes: int = 8 << 20) -> Iterator[ScannedRecord]:
    """Every record with a valid header in a segment of ``file_bytes``, in file order.

    Records whose payload fails its checksum are yielded with ``is_intact=False`` (their
    key is known, which recovery needs) and counted in ``report.num_corrupt``. Zeros between
    records (the gap in front of an aligned payload) are skipped without a count. Raises
    `FormatVersionError` for a segment of another format version.
    """
    win = _Window(read_at, file_bytes, window_bytes)
    pos: int | None = 0
    while pos is not None and win.fill(pos, HEADER_BYTES):
        head = win.view(pos, HEADER_BYTES)
        header = unpack_header(head, pos)
        if header is None:
            if head[:8] == _ZEROS8:  # the gap before an aligned record, or the tail
                pos = win.skip_zeros(pos)
                continue
            report.num_corrupt += 1  # one count per garbage region, not per 8 bytes
            pos = win.find_header(pos + RECORD_ALIGN)
            continue
        nbytes = HEADER_BYTES + header.stored_len
        if not win.fill(pos, nbytes):  # torn: the record runs past the end of the file
            report.num_corrupt += 1
            pos = win.find_header(pos + RECORD_ALIGN)
            continue
        data = win.view(pos, nbytes)
        is_intact = checksum(data[HEADER_BYTES:]) == header.payload_checksum
        if not is_intact:
            report.num_corrupt += 1
        report.end_offset = pos + header.span
        yield ScannedRecord(pos, header, data, is_intact)
        pos += header.span
    if pos is not None and 0 < file_bytes - pos < HEADER_BYTES:
        tail = file_bytes - pos
        if win.fill(pos, tail) and any(win.view(pos, tail)):
            report.num_corrupt += 1  # a torn header in the last few bytes

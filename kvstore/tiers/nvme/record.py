"""The NVMe tier's on-disk record format, and the scanner that reads a segment back.

Every record has an 80-byte header; headers start at multiples of 8 bytes:

    offset  size  field
    0       4     magic b"KVSR"
    4       1     format version (4)
    5       1     flags: 1 = payload is LZ4-compressed, 2 = tombstone, 4 = has a parent,
                  8 = detached (the payload is elsewhere, see below)
    6       2     reserved, zero
    8       16    key
    24      16    parent key (zeros when there is none)
    40      8     stored length: payload bytes on disk
    48      8     raw length: value bytes once decompressed
    56      8     xxh3_64 of the stored payload
    64      8     aux: a tombstone's deleted segment seqno; a detached record's payload
                  offset in its segment; else 0
    72      8     the header's MAC: BLAKE2b-64 keyed with the directory's key, of the
                  segment's seqno (8 bytes) and bytes 0..72

All integers are little-endian. The MAC is what makes a header a header: the directory's
key (`<path>/KEY`, 32 random bytes, mode 0600, made when the directory is first used) is
known to the tier alone, so no bytes a client stores (a value holding a complete record,
checksums and all) can pass for a record, wherever the scanner resynchronises after a
damaged header or a segment cut short; and with the seqno in it, a record copied into
another segment is not one either. A record comes in one of two shapes, chosen by its stored
length (`is_detached`):

- *Inline* (small payloads, tombstones): the payload follows the header, then zeros up to
  a multiple of 8. Reading it back reads the blocks around both.
- *Detached* (payloads of 64 KiB or more, and any whole number of 4 KiB blocks): the
  payload starts on a 4 KiB boundary and the header sits in a *header page*, a 4 KiB
  block of up to 51 headers written in front of their payloads. One O_DIRECT read of
  exactly the payload's blocks then fetches a value, straight into a caller's aligned
  buffer: a 4 KiB value is one 4 KiB read, not two blocks for header and payload.

      inline | zeros | header page: h1 h2 h3 zeros | payload 1 | payload 2 | inline | payload 3
                      ^ 4 KiB aligned                ^ each 4 KiB aligned

The writer keeps a header page open while it is still in its write buffer: later detached
records add their headers to it, and inline records may come between their payloads. Once
the buffer holding it is written out (when it fills, or at `flush()`) the page is sealed and
the next detached record opens a new one, so a page on disk is never rewritten. Log order
is payload order: the scanner yields a detached record when it reaches its payload, so a
record and the ones written before and after it replay in the order they were written.

A record is valid when its MAC holds, its shape fits its stored length, its
payload ends inside the file and the payload checksum matches. Space: an inline record takes
`HEADER_BYTES + align_up(stored, 8)`; a detached one `align_up(stored, 4 KiB)` plus its
header slot (what `record_footprint` accounts), and at most one more 4 KiB block of padding
and one header page when it starts a batch (`record_disk_bound`). A header of another version
whose own checksum holds (format 3 ended in an unkeyed xxh3_64 of bytes 0..72) is a segment
written by another format: opening fails with `FormatVersionError` rather than dropping its
records as corrupt.

The scanner reads a segment in large sequential windows. Between records it skips zeros
silently and counts anything else (a torn write, flipped bits, also after a run of zeros) as
one corrupt region, then resumes at the next 8-byte aligned magic whose MAC holds; a region
that a header found earlier says is a payload is never parsed for headers.
"""

from __future__ import annotations

import hashlib
import heapq
import mmap
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import xxhash

from kvstore.errors import StorageError

MAGIC = b"KVSR"
FORMAT_VERSION = 4
KEY_BYTES = 32  # the directory key of the headers' MACs
HEADER_BYTES = 80
RECORD_ALIGN = 8
IO_ALIGN = 4096  # O_DIRECT granularity: offsets, lengths and buffers of every disk I/O
DETACHED_MIN_BYTES = 64 * 1024  # payloads this large are detached whatever their length
HEADERS_PER_PAGE = IO_ALIGN // HEADER_BYTES

FLAG_COMPRESSED = 1
FLAG_TOMBSTONE = 2
FLAG_HAS_PARENT = 4
FLAG_DETACHED = 8
_KNOWN_FLAGS = FLAG_COMPRESSED | FLAG_TOMBSTONE | FLAG_HAS_PARENT | FLAG_DETACHED

_HEAD = struct.Struct("<4sBBH16s16sQQQQ")  # everything the MAC covers (with the seqno)
_MAC_BYTES = 8
_U64 = struct.Struct("<Q")
_MAC_PERSON = b"kvstore-rec-v4"
_NO_PARENT = bytes(16)
_ZEROS8 = bytes(8)
_ZERO_SCAN_BYTES = 64 * 1024  # how far `skip_zeros` looks per step
assert _HEAD.size + _MAC_BYTES == HEADER_BYTES

checksum = xxhash.xxh3_64_intdigest


def align_up(n: int, align: int = IO_ALIGN) -> int:
    return -(-n // align) * align


def align_down(n: int, align: int = IO_ALIGN) -> int:
    return n - n % align


class FormatVersionError(StorageError):
    """A segment holds records of another on-disk format version."""


def is_detached(stored_bytes: int) -> bool:
    """Whether a record with ``stored_bytes`` of payload is detached (see the module
    docstring): large, or whole 4 KiB blocks, which then cost no padding."""
    return stored_bytes >= DETACHED_MIN_BYTES or (stored_bytes > 0
                                                  and not stored_bytes % IO_ALIGN)


def record_footprint(stored_bytes: int) -> int:
    """The bytes a record with ``stored_bytes`` of payload is accounted for."""
    if is_detached(stored_bytes):
        return HEADER_BYTES + align_up(stored_bytes)
    return HEADER_BYTES + align_up(stored_bytes, RECORD_ALIGN)


def record_disk_bound(stored_bytes: int) -> int:
    """The most an append of such a record grows its segment by: for a detached one, the
    padding to a 4 KiB boundary and a new header page included."""
    if is_detached(stored_bytes):
        return 2 * IO_ALIGN + align_up(stored_bytes)
    return record_footprint(stored_bytes)


TOMBSTONE_FOOTPRINT = record_footprint(0)
HeaderFor = Callable[[int], bytes]  # payload offset -> the record's 72-byte head, unsigned


class HeaderMac:
    """Signs and checks the headers of one segment: a MAC keyed with the directory's key
    over the segment's seqno and the header (see the module docstring). Made by
    `SegmentKey.for_segment`."""

    __slots__ = ("_mac",)

    def __init__(self, mac: Any) -> None:
        self._mac = mac  # keyed BLAKE2b state that has absorbed the seqno

    def sign(self, head: bytes) -> bytes:
        """The 80-byte header of a 72-byte ``head``: the head and its MAC."""
        mac = self._mac.copy()  # a copy of the keyed state costs half a fresh keying
        mac.update(head)
        return head + mac.digest()

    def verifies(self, header: memoryview | bytes) -> bool:
        """Whether the last 8 bytes of an 80-byte ``header`` are the MAC of its first 72."""
        mac = self._mac.copy()
        mac.update(header[:_HEAD.size])
        return mac.digest() == header[_HEAD.size:HEADER_BYTES]


class SegmentKey:
    """The directory's key: the `HeaderMac` of each of its segments."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise StorageError(f"an NVMe directory key is {KEY_BYTES} bytes, got {len(key)}")
        self._keyed = hashlib.blake2b(key=key, digest_size=_MAC_BYTES, person=_MAC_PERSON)

    def for_segment(self, seq: int) -> HeaderMac:
        mac = self._keyed.copy()
        mac.update(_U64.pack(seq))
        return HeaderMac(mac)


@dataclass(frozen=True, slots=True)
class RecordHeader:
    flags: int
    key: bytes
    parent: bytes | None
    stored_len: int
    raw_len: int
    payload_checksum: int
    aux: int  # tombstones: the segment that held the deleted record; detached: payload offset

    @property
    def is_tombstone(self) -> bool:
        return bool(self.flags & FLAG_TOMBSTONE)

    @property
    def is_compressed(self) -> bool:
        return bool(self.flags & FLAG_COMPRESSED)

    @property
    def is_detached(self) -> bool:
        return bool(self.flags & FLAG_DETACHED)

    def header_for(self, payload_offset: int) -> bytes:
        """This data record's head again, for a copy whose payload is at ``payload_offset``."""
        assert not self.is_tombstone, "tombstones are written anew, not copied"
        return pack_header(self.flags & FLAG_COMPRESSED, self.key, self.parent,
                           self.stored_len, self.raw_len, self.payload_checksum, payload_offset)


def _pack(flags: int, key: bytes, parent: bytes | None, stored_len: int, raw_len: int,
          payload_checksum: int, aux: int) -> bytes:
    return _HEAD.pack(MAGIC, FORMAT_VERSION, flags, 0, key, parent or _NO_PARENT,
                      stored_len, raw_len, payload_checksum, aux)


def pack_header(flags: int, key: bytes, parent: bytes | None, stored_len: int, raw_len: int,
                payload_checksum: int, payload_offset: int = 0) -> bytes:
    """A data record's head, unsigned (`HeaderMac.sign` makes it a header); ``payload_offset``
    is kept only if it is detached (an inline payload follows its header). A tombstone's
    is `tombstone_header`'s."""
    if parent is not None:
        flags |= FLAG_HAS_PARENT
    aux = 0
    if is_detached(stored_len):
        flags |= FLAG_DETACHED
        aux = payload_offset
    return _pack(flags, key, parent, stored_len, raw_len, payload_checksum, aux)


def tombstone_header(key: bytes, deleted_seq: int) -> bytes:
    """A tombstone's head, unsigned."""
    return _pack(FLAG_TOMBSTONE, key, None, 0, 0, checksum(b""), deleted_seq)


def unpack_header(buf: memoryview | bytes, mac: HeaderMac,
                  offset: int | None = None) -> RecordHeader | None:
    """The header at the start of ``buf`` (at least 80 bytes), or None if it is not valid:
    its MAC is not ``mac``'s (its segment's), or it is not a shape this format writes.

    With ``offset`` (where ``buf`` starts in its segment), a detached header whose payload
    is not after its own page is not valid either. A header of another format version whose
    own checksum holds raises `FormatVersionError`.
    """
    if buf[:4] != MAGIC:
        return None
    head = buf[:_HEAD.size]
    version = buf[4]
    if version != FORMAT_VERSION:
        if version == 3 and _U64.unpack_from(buf, _HEAD.size)[0] == checksum(head):
            raise FormatVersionError(
                f"an NVMe segment holds records of on-disk format version {version}; this "
                f"kvstore reads version {FORMAT_VERSION} only (there is no migration: remove "
                "the segment files or point nvme_path at an empty directory)")
        return None
    if not mac.verifies(buf):
        return None
    (_, _, flags, _, key, parent, stored_len, raw_len, payload_checksum,
     aux) = _HEAD.unpack(head)
    if flags & ~_KNOWN_FLAGS:
        return None
    if bool(flags & FLAG_DETACHED) != is_detached(stored_len):
        return None
    if flags & FLAG_DETACHED and (aux % IO_ALIGN or (
            offset is not None and aux < align_up(offset + HEADER_BYTES))):
        return None
    if flags & FLAG_TOMBSTONE and stored_len:
        return None
    if not flags & FLAG_COMPRESSED and stored_len != raw_len:
        return None
    return RecordHeader(flags, key, parent if flags & FLAG_HAS_PARENT else None, stored_len,
                        raw_len, payload_checksum, aux)


# -- reading a segment back -----------------------------------------------------------------

ReadAt = Callable[[int, memoryview], int]  # (aligned offset, aligned buffer) -> bytes read


@dataclass
class ScanReport:
    """What one scan found besides its records."""

    num_corrupt: int = 0   # corrupt regions: torn or flipped records, garbage
    end_offset: int = 0    # end of the last record whose header was valid


@dataclass(frozen=True, slots=True)
class ScannedRecord:
    offset: int          # where its payload starts (inline: right after its header)
    header: RecordHeader
    payload: memoryview  # valid only until the scan moves on
    is_intact: bool      # False: the header is valid but the payload checksum is not


class _Window:
    """An aligned buffer over ``[base, base + length)`` of a file, refilled on demand."""

    def __init__(self, read_at: ReadAt, file_bytes: int, window_bytes: int,
                 mac: HeaderMac) -> None:
        self.read_at = read_at
        self.mac = mac
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
                    and unpack_header(self.view(hit, HEADER_BYTES), self.mac, hit)):
                return hit
            pos = hit + RECORD_ALIGN
        return None


def scan_records(read_at: ReadAt, file_bytes: int, report: ScanReport, mac: HeaderMac,
                 window_bytes: int = 8 << 20) -> Iterator[ScannedRecord]:
    """Every record with a valid header (signed by ``mac``, its segment's) in a segment of
    ``file_bytes``, in log order (the order of their payloads, see the module docstring).

    Records whose payload fails its checksum are yielded with ``is_intact=False`` (their
    key is known, which recovery needs) and counted in ``report.num_corrupt``; so is a
    record whose payload runs past the end of the file (a torn write), which is not
    yielded. Zeros between records are skipped without a count. Raises
    `FormatVersionError` for a segment of another format version.
    """
    win = _Window(read_at, file_bytes, window_bytes, mac)
    pending: list[tuple[int, int, RecordHeader]] = []  # detached: (payload offset, n, header)
    pos = 0
    while True:
        while pending and pending[0][0] <= pos:  # reached a detached payload: its record
            offset, _, header = heapq.heappop(pending)
            record = _checked(win, offset, header, report)
            if record is not None:
                yield record
            pos = max(pos, offset + align_up(header.stored_len, RECORD_ALIGN))
        if not win.fill(pos, HEADER_BYTES):
            break
        head = win.view(pos, HEADER_BYTES)
        header = unpack_header(head, mac, pos)
        if header is None:
            if head[:8] == _ZEROS8:  # padding, the rest of a header page, or the tail
                pos = win.skip_zeros(pos)
                continue
            report.num_corrupt += 1  # one count per garbage region, not per 8 bytes
            found = win.find_header(pos + RECORD_ALIGN)
            pos = file_bytes if found is None else found
            continue
        if header.is_detached:
            heapq.heappush(pending, (header.aux, len(pending), header))
            pos += HEADER_BYTES
            continue
        record = _checked(win, pos + HEADER_BYTES, header, report)
        if record is None:  # torn: the record runs past the end of the file
            found = win.find_header(pos + RECORD_ALIGN)
            pos = file_bytes if found is None else found
            continue
        yield record
        pos += HEADER_BYTES + align_up(header.stored_len, RECORD_ALIGN)
    report.num_corrupt += len(pending)  # payloads past the end of the file: torn
    if 0 < file_bytes - pos < HEADER_BYTES:
        tail = file_bytes - pos
        if win.fill(pos, tail) and any(win.view(pos, tail)):
            report.num_corrupt += 1  # a torn header in the last few bytes


def _checked(win: _Window, offset: int, header: RecordHeader,
             report: ScanReport) -> ScannedRecord | None:
    """The record whose payload is at ``offset``, checked; None (counted) if the file ends
    before the payload does."""
    if not win.fill(offset, header.stored_len):
        report.num_corrupt += 1
        return None
    payload = win.view(offset, header.stored_len)
    is_intact = checksum(payload) == header.payload_checksum
    if not is_intact:
        report.num_corrupt += 1
    report.end_offset = max(report.end_offset,
                            offset + align_up(header.stored_len, RECORD_ALIGN))
    return ScannedRecord(offset, header, payload, is_intact)

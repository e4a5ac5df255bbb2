"""The NVMe tier: values in checksummed records, appended to segment files.

    <path>/seg-0000000001.log     sealed: read, then compacted away
    <path>/seg-0000000002.log     sealed
    <path>/seg-0000000003.log     active: records are appended here

    active segment   [ on disk ................ | write buffer (aligned mmap) ]
                     0                     buffer offset                   end

Records (format in `kvstore.tiers.nvme_record`) are copied into the write buffer and
written with one aligned `pwrite` of `write_buffer_bytes` when it fills, through an
O_DIRECT descriptor where the filesystem takes one. `flush()` writes the partial buffer
rounded up to 4 KiB with zeros and keeps its unfinished last block, which the next flush
rewrites (same bytes, plus new records), so flushing often wastes no space.

Invariants
- `_index` maps a key to its one *live* record. Every other record of a key still on disk
  (overwritten, evicted, corrupt, tombstones) is *stale*; `_stale[key]` lists the segments
  that hold them (one entry per record).
- Log order is (segment seqno, offset). Every write, compaction copies included, goes to
  the active segment, the one with the highest seqno, so a key's newest record is in the
  highest segment among its records. Reopen replays the log in order: the newest record
  wins, a tombstone or a rotted record hides the older ones.
- A key that is not live but has records in two or more segments is *pinned*: dropping its
  newest record would let an older one win at the next open, so compaction writes a
  tombstone in its place. `used_bytes` = live footprint + one tombstone per pinned key, and
  `used_bytes <= capacity_bytes` after every call.
- `_disk_bytes`, the sum of the segment file sizes once the buffer is written, never exceeds
  `config.capacity_bytes`. Plain writes stay one segment (plus slack) below it: that is
  where compaction copies a victim's live records before it unlinks the victim. The logical
  `capacity_bytes` keeps back one more segment, so when plain writes reach their limit the
  dead bytes add up to at least a segment and greedy compaction always makes progress.
- Durability: `flush()` writes the buffer, fsyncs each segment written since the last flush,
  then the directory. Compaction flushes its copies before it unlinks its victim.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import functools
import logging
import mmap
import os
import re
import threading
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from kvstore.buffers import copy_bytes, output_view, value_view
from kvstore.config import Compression
from kvstore.errors import ConfigError, InvalidValueError, StorageError, StoreClosedError
from kvstore.tiers.base import check_key
from kvstore.tiers.nvme_record import (
    FLAG_COMPRESSED,
    HEADER_BYTES,
    IO_ALIGN,
    TOMBSTONE_FOOTPRINT,
    ScannedRecord,
    ScanReport,
    align_down,
    align_up,
    checksum,
    pack_header,
    record_footprint,
    scan_records,
    tombstone_header,
)

__all__ = ["Compression", "NvmeTier", "NvmeTierConfig", "RecoveredRecord"]

log = logging.getLogger(__name__)

MiB = 1024 * 1024
_SEGMENT_NAME = re.compile(r"^seg-(\d+)\.log$")
_MAX_OPEN_FILES = 64
_SCAN_WINDOW_BYTES = 8 * MiB
_ZERO_BLOCK = bytes(IO_ALIGN)


def _lz4() -> Any:
    try:
        import lz4.block
    except ImportError as e:
        raise ConfigError("NVMe compression LZ4 needs the lz4 package "
                          "(pip install 'kvstore[lz4]')") from e
    return lz4.block


@dataclass(frozen=True)
class NvmeTierConfig:
    """Where and how big the NVMe tier is.

    ``capacity_bytes`` bounds the segment files on disk; the tier offers less than that to
    live records (see `NvmeTier.capacity_bytes`). Sizes that O_DIRECT needs aligned are
    rounded to 4 KiB: ``segment_bytes`` down, ``write_buffer_bytes`` up.
    """

    path: str
    capacity_bytes: int
    max_value_bytes: int = 16 * MiB
    segment_bytes: int = 64 * MiB
    write_buffer_bytes: int = 4 * MiB
    compression: Compression = Compression.NONE
    direct_io: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.path, os.PathLike):
            object.__setattr__(self, "path", os.fspath(self.path))
        if not isinstance(self.path, str) or not self.path:
            raise ConfigError(f"NvmeTierConfig.path must be a directory path, got {self.path!r}")
        for name in ("capacity_bytes", "max_value_bytes", "segment_bytes", "write_buffer_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"NvmeTierConfig.{name} must be a positive int, got {value!r}")
        if not isinstance(self.compression, Compression):
            try:
                object.__setattr__(self, "compression", Compression(self.compression))
            except ValueError:
                raise ConfigError("NvmeTierConfig.compression must be a Compression, "
                                  f"got {self.compression!r}") from None
        if self.compression is Compression.LZ4:
            _lz4()
        if not isinstance(self.direct_io, bool):
            raise ConfigError(f"NvmeTierConfig.direct_io must be a bool, got {self.direct_io!r}")
        _Layout.of(self)


@dataclass(frozen=True)
class _Layout:
    """Sizes derived from a config: what the tier computes once and lives by."""

    segment_bytes: int
    write_buffer_bytes: int
    max_footprint: int
    write_limit: int      # disk bytes plain writes may reach
    capacity_bytes: int   # logical capacity offered to live records

    @classmethod
    def of(cls, config: NvmeTierConfig) -> _Layout:
        segment_bytes = align_down(config.segment_bytes)
        max_footprint = record_footprint(config.max_value_bytes)
        if max_footprint > segment_bytes:
            raise ConfigError(
                f"NvmeTierConfig.segment_bytes ({config.segment_bytes}) must hold one record of "
                f"max_value_bytes: use at least {align_up(max_footprint)}")
        num_slots = config.capacity_bytes // segment_bytes
        if num_slots < 4:
            raise ConfigError(
                f"NvmeTierConfig.capacity_bytes ({config.capacity_bytes}) must hold at least 4 "
                f"segments of {segment_bytes} bytes: grow it or lower segment_bytes")
        # One segment of headroom for compaction copies (+ the alignment of two files) ...
        write_limit = config.capacity_bytes - segment_bytes - 2 * IO_ALIGN
        # ... and one more kept from live data so that a full disk is at least a segment dead.
        # Each file's last block may be part empty: never count on that slack as room.
        slack_bytes = 2 * IO_ALIGN * (num_slots + 4)
        capacity_bytes = write_limit - IO_ALIGN - max(segment_bytes, slack_bytes)
        if capacity_bytes < max_footprint:
            raise ConfigError(
                f"NvmeTierConfig.capacity_bytes ({config.capacity_bytes}) leaves no room for a "
                f"value of max_value_bytes after the compaction reserve: grow it")
        return cls(segment_bytes, align_up(config.write_buffer_bytes), max_footprint,
                   write_limit, capacity_bytes)


class RecoveredRecord(NamedTuple):
    """A live record found when the tier opened."""

    key: bytes
    parent: bytes | None
    nbytes: int


class _Segment:
    __slots__ = ("disk_bytes", "live_bytes", "num_live", "num_stale", "pinned_bytes", "seq")

    def __init__(self, seq: int, disk_bytes: int = 0) -> None:
        self.seq = seq
        self.disk_bytes = disk_bytes   # file size (for the active one: once its buffer is written)
        self.live_bytes = 0
        self.num_live = 0
        self.num_stale = 0
        self.pinned_bytes = 0          # tombstones owed for pinned keys whose newest record is here

    @property
    def reclaimable_bytes(self) -> int:
        return self.disk_bytes - self.live_bytes - self.pinned_bytes


class _Loc:
    """Where a live record is, and what its header said."""

    __slots__ = ("flags", "offset", "parent", "payload_checksum", "raw_len", "seq", "stored_len")

    def __init__(self, seq: int, offset: int, stored_len: int, raw_len: int, flags: int,
                 parent: bytes | None, payload_checksum: int) -> None:
        self.seq = seq
        self.offset = offset
        self.stored_len = stored_len
        self.raw_len = raw_len
        self.flags = flags
        self.parent = parent
        self.payload_checksum = payload_checksum

    @property
    def footprint(self) -> int:
        return record_footprint(self.stored_len)


class NvmeTier:
    """A log-structured NVMe tier; see the module docstring. Thread-safe (one lock)."""

    kind_name = "nvme"

    def __init__(self, config: NvmeTierConfig) -> None:
        self.config = config
        self._layout = layout = _Layout.of(config)
        self.capacity_bytes = layout.capacity_bytes
        self._lock = threading.Lock()
        self._closed = False
        self._direct = config.direct_io and hasattr(os, "O_DIRECT")
        self._fds: collections.OrderedDict[int, int] = collections.OrderedDict()
        self._segments: dict[int, _Segment] = {}
        self._index: dict[bytes, _Loc] = {}
        self._stale: dict[bytes, list[int]] = {}
        self._pinned: dict[bytes, int] = {}  # key -> segment of its newest record
        self._live_bytes = self._pinned_bytes = self._disk_bytes = 0
        self._live_raw_bytes = self._live_stored_bytes = 0
        self._active: _Segment | None = None
        self._end = self._buffer_offset = self._written_end = 0
        self._dirty: set[int] = set()
        self._dir_dirty = False
        self._next_seq = 1
        self._compacting = False
        self._num_compactions = self._checksum_failures = self._corrupt_skipped = 0
        self._num_dropped_at_open = self._bytes_written = self._bytes_read = 0
        self._wbuf = mmap.mmap(-1, layout.write_buffer_bytes)
        self._wview = memoryview(self._wbuf)
        self._rbuf = mmap.mmap(-1, align_up(layout.max_footprint) + 2 * IO_ALIGN)
        self._rview = memoryview(self._rbuf)
        self._recovered: list[RecoveredRecord] = []
        self._dir_fd = self._lock_fd = -1
        try:
            self._open_dir()
            self._recover()
        except BaseException:
            self._release()
            raise

    # -- sizes -------------------------------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        return self._live_bytes + self._pinned_bytes

    def footprint_bytes(self, nbytes: int) -> int:
        """The most a value of ``nbytes`` adds to ``used_bytes`` (compression only shrinks it)."""
        return record_footprint(nbytes)

    # -- the Tier contract -------------------------------------------------------------------

    def put(self, key: bytes, value: Any, parent: bytes | None = None) -> bool:
        """Store ``value`` (replacing any earlier one); False, changing nothing, if no room."""
        key = check_key(key)
        if parent is not None:
            parent = check_key(parent)
        src = value_view(value)
        if not isinstance(src, np.ndarray):
            src = src.cpu().numpy()  # a device tensor
        nbytes = int(src.shape[0])
        if nbytes > self.config.max_value_bytes:
            raise InvalidValueError(f"value of {nbytes} bytes exceeds max_value_bytes "
                                    f"({self.config.max_value_bytes})")
        payload: memoryview = memoryview(src)
        flags = 0
        if self.config.compression is Compression.LZ4 and nbytes:
            packed = _lz4().compress(payload, store_size=False)
            if len(packed) < nbytes:
                payload, flags = memoryview(packed), FLAG_COMPRESSED
        payload_checksum = checksum(payload)
        header = pack_header(flags, key, parent, len(payload), nbytes, payload_checksum)
        with self._lock:
            self._check_open()
            if self.used_bytes + record_footprint(nbytes) > self.capacity_bytes:
                return False
            seq, offset = self._append((header, payload), record_footprint(len(payload)),
                                       self._layout.write_limit)
            if key in self._index:
                old = self._take_live(key)
                self._stale_add(key, old.seq)
            self._put_live(key, _Loc(seq, offset, len(payload), nbytes, flags, parent,
                                     payload_checksum))
            if key in self._pinned:
                self._repin(key)
            return True

    def get(self, key: bytes) -> bytes | None:
        """The value, or None if absent or if it fails its checksum (then it is forgotten)."""
        key = check_key(key)
        with self._lock:
            self._check_open()
            loc = self._index.get(key)
            if loc is None:
                return None
            data = self._load(key, loc)
            return data if data is None or isinstance(data, bytes) else bytes(data)

    def read_into(self, key: bytes, out: Any) -> bool:
        """Copy the value into ``out`` (exactly `nbytes_of(key)` bytes); False on a miss."""
        key = check_key(key)
        with self._lock:
            self._check_open()
            loc = self._index.get(key)
            if loc is None:
                return False
            dst = output_view(out, loc.raw_len)
            data = self._load(key, loc)
            if data is None:
                return False
            copy_bytes(dst, np.frombuffer(data, dtype=np.uint8))
            return True

    def nbytes_of(self, key: bytes) -> int | None:
        with self._lock:
            self._check_open()
            loc = self._index.get(check_key(key))
            return None if loc is None else loc.raw_len

    def parent_of(self, key: bytes) -> bytes | None:
        with self._lock:
            self._check_open()
            loc = self._index.get(check_key(key))
            return None if loc is None else loc.parent

    def __contains__(self, key: object) -> bool:
        with self._lock:
            self._check_open()
            return isinstance(key, bytes | bytearray | memoryview) and bytes(key) in self._index

    def __len__(self) -> int:
        with self._lock:
            self._check_open()
            return len(self._index)

    def evict(self, key: bytes) -> bool:
        """Forget ``key``; its record stays on disk until compacted and may be found again
        by the next open (as the key's last durable value)."""
        key = check_key(key)
        with self._lock:
            self._check_open()
            if key not in self._index:
                return False
            self._forget(key)
            return True

    def delete(self, key: bytes) -> bool:
        """Forget ``key`` and write a tombstone so no record of it comes back at reopen.
        True if it was present."""
        key = check_key(key)
        with self._lock:
            self._check_open()
            was_live = key in self._index
            if was_live:
                self._forget(key)
            if key not in self._stale:
                return was_live
            self._make_room(TOMBSTONE_FOOTPRINT, self._layout.write_limit)
            stale = self._stale.get(key)
            if not stale:
                return was_live
            assert self._active is not None
            if (key not in self._pinned and min(stale) < self._active.seq
                    and self.used_bytes + TOMBSTONE_FOOTPRINT > self.capacity_bytes):
                # The tombstone would pin bytes the tier does not have: compact the key's
                # old records away instead (the key has records in one segment only).
                for seq in sorted(set(stale)):
                    self._compact(self._segments[seq], self.config.capacity_bytes)
                stale = self._stale.get(key)
            if stale:
                self._write_tombstone(key, max(stale), self._layout.write_limit)
                self._repin(key)
            return was_live

    def recovered(self) -> list[RecoveredRecord]:
        """The live records found at open, oldest first."""
        return list(self._recovered)

    def flush(self) -> None:
        """Make everything put or deleted so far durable."""
        with self._lock:
            self._check_open()
            self._flush_locked()

    def close(self) -> None:
        """Flush, then release the files; later calls raise `StoreClosedError`."""
        with self._lock:
            if self._closed:
                return
            try:
                self._flush_locked()
            finally:
                self._release()

    def __enter__(self) -> NvmeTier:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "capacity_bytes": self.capacity_bytes,
                "used_bytes": self.used_bytes,
                "live_bytes": self._live_bytes,
                "tombstone_bytes": self._pinned_bytes,
                "dead_bytes": self._disk_bytes - self.used_bytes,
                "disk_bytes": self._disk_bytes,
                "disk_capacity_bytes": self.config.capacity_bytes,
                "segments": len(self._segments),
                "blocks": len(self._index),
                "compactions": self._num_compactions,
                "checksum_failures": self._checksum_failures,
                "corrupt_records_skipped": self._corrupt_skipped,
                "records_dropped_at_open": self._num_dropped_at_open,
                "compression_ratio": (self._live_raw_bytes / self._live_stored_bytes
                                      if self._live_stored_bytes else 1.0),
                "bytes_written": self._bytes_written,
                "bytes_read": self._bytes_read,
                "direct_io": self._direct,
            }

    # -- live and stale bookkeeping ------------------------------------------------------------

    def _put_live(self, key: bytes, loc: _Loc) -> None:
        self._index[key] = loc
        segment = self._segments[loc.seq]
        segment.live_bytes += loc.footprint
        segment.num_live += 1
        self._live_bytes += loc.footprint
        self._live_raw_bytes += loc.raw_len
        self._live_stored_bytes += loc.stored_len

    def _take_live(self, key: bytes) -> _Loc:
        loc = self._index.pop(key)
        segment = self._segments[loc.seq]
        segment.live_bytes -= loc.footprint
        segment.num_live -= 1
        self._live_bytes -= loc.footprint
        self._live_raw_bytes -= loc.raw_len
        self._live_stored_bytes -= loc.stored_len
        return loc

    def _stale_add(self, key: bytes, seq: int) -> None:
        self._stale.setdefault(key, []).append(seq)
        self._segments[seq].num_stale += 1

    def _stale_remove(self, key: bytes, seq: int) -> None:
        stale = self._stale[key]
        stale.remove(seq)
        self._segments[seq].num_stale -= 1
        if not stale:
            del self._stale[key]

    def _repin(self, key: bytes) -> None:
        """Recompute whether ``key`` is pinned (see the module docstring)."""
        old = self._pinned.pop(key, None)
        if old is not None:
            self._segments[old].pinned_bytes -= TOMBSTONE_FOOTPRINT
            self._pinned_bytes -= TOMBSTONE_FOOTPRINT
        stale = self._stale.get(key)
        if key in self._index or not stale:
            return
        newest = max(stale)
        if min(stale) != newest:
            self._pinned[key] = newest
            self._segments[newest].pinned_bytes += TOMBSTONE_FOOTPRINT
            self._pinned_bytes += TOMBSTONE_FOOTPRINT

    def _forget(self, key: bytes) -> None:
        loc = self._take_live(key)
        self._stale_add(key, loc.seq)
        self._repin(key)

    # -- reading -------------------------------------------------------------------------------

    def _load(self, key: bytes, loc: _Loc) -> memoryview | bytes | None:
        """The value's bytes, checked; None (and the key forgotten) if they are corrupt."""
        data = self._read_stored(loc)
        if data is not None and checksum(data) == loc.payload_checksum:
            if not loc.flags & FLAG_COMPRESSED:
                return data
            try:
                raw = _lz4().decompress(data, uncompressed_size=loc.raw_len)
            except Exception:
                raw = None
            if raw is not None and len(raw) == loc.raw_len:
                return raw
        self._checksum_failures += 1
        log.warning("NVMe record of key %s in segment %d failed its checksum; dropped",
                    key.hex(), loc.seq)
        self._forget(key)  # its record now hides older ones at reopen; compaction keeps it so
        return None

    def _read_stored(self, loc: _Loc) -> memoryview | None:
        """The stored payload of a live record (a view valid until the next I/O)."""
        start = loc.offset + HEADER_BYTES
        end = start + loc.stored_len
        if start == end:
            return memoryview(b"")
        in_buffer = self._active is not None and loc.seq == self._active.seq
        if in_buffer and start >= self._buffer_offset:
            return self._wview[start - self._buffer_offset:end - self._buffer_offset]
        base = align_down(start)
        disk_end = min(align_up(end), self._buffer_offset) if in_buffer else align_up(end)
        scratch = self._scratch(align_up(end) - base)
        got = self._read_at(loc.seq, base, scratch[:disk_end - base])
        if got < min(end, disk_end) - base:
            return None  # the file is shorter than the index says
        if in_buffer and end > disk_end:  # the record's tail is still in the write buffer
            scratch[disk_end - base:end - base] = self._wview[:end - disk_end]
        return scratch[start - base:end - base]

    def _scratch(self, nbytes: int) -> memoryview:
        if nbytes <= len(self._rbuf):
            return self._rview
        return memoryview(mmap.mmap(-1, align_up(nbytes)))  # a record from a larger config

    # -- writing -------------------------------------------------------------------------------

    def _append(self, parts: tuple[Any, ...], footprint: int, limit: int) -> tuple[int, int]:
        """Append one record made of ``parts``; returns (segment seqno, offset)."""
        self._make_room(footprint, limit)
        segment = self._active
        assert segment is not None
        offset = self._end
        written = 0
        for part in parts:
            self._buffer_write(part)
            written += len(part)
        if footprint > written:
            self._buffer_write(_ZERO_BLOCK[:footprint - written])
        disk_bytes = align_up(self._end)
        self._disk_bytes += disk_bytes - segment.disk_bytes
        segment.disk_bytes = disk_bytes
        return segment.seq, offset

    def _buffer_write(self, data: Any) -> None:
        data = memoryview(data)
        size = len(self._wbuf)
        pos, nbytes = 0, len(data)
        while pos < nbytes:
            used = self._end - self._buffer_offset
            take = min(size - used, nbytes - pos)
            self._wview[used:used + take] = data[pos:pos + take]
            self._end += take
            pos += take
            if used + take == size:  # a full buffer: one large aligned write
                assert self._active is not None
                self._pwrite(self._active.seq, self._wview, self._buffer_offset)
                self._buffer_offset += size
                self._written_end = self._end

    def _write_buffer(self) -> None:
        """Write what the buffer holds, zero-padded to 4 KiB; keep its unfinished block."""
        if self._active is None or self._end == self._written_end:
            return
        used = self._end - self._buffer_offset
        nbytes = align_up(used)
        self._wview[used:nbytes] = _ZERO_BLOCK[:nbytes - used]
        self._pwrite(self._active.seq, self._wview[:nbytes], self._buffer_offset)
        self._written_end = self._end
        keep = align_down(used)
        if keep:
            self._wbuf.move(0, keep, used - keep)
            self._buffer_offset += keep

    def _write_tombstone(self, key: bytes, deleted_seq: int, limit: int) -> None:
        seq, _ = self._append((tombstone_header(key, deleted_seq),), TOMBSTONE_FOOTPRINT, limit)
        self._stale_add(key, seq)

    def _make_room(self, footprint: int, limit: int) -> None:
        """Make the active segment able to take ``footprint`` bytes with the files' total
        staying within ``limit``, compacting as needed."""
        segment_bytes = self._layout.segment_bytes
        for _ in range(4 * len(self._segments) + 16):
            if self._active is not None and self._end + footprint <= segment_bytes:
                grow = align_up(self._end + footprint) - align_up(self._end)
                if self._disk_bytes + grow <= limit:
                    return
            elif self._disk_bytes + align_up(footprint) <= limit:
                self._start_segment()
                return
            if self._compacting:
                break
            self._compact_once(self.config.capacity_bytes)
        raise StorageError(
            f"NVMe tier: no room for a {footprint}-byte record in {self.config.path} after "
            "compaction (disk accounting is broken; please report this)")

    def _start_segment(self) -> None:
        if self._active is not None:
            self._write_buffer()
            self._active = None
        seq = self._next_seq
        self._next_seq += 1
        self._fds[seq] = self._open_file(seq, create=True)
        self._segments[seq] = self._active = _Segment(seq)
        self._end = self._buffer_offset = self._written_end = 0
        self._dir_dirty = True

    def _flush_locked(self) -> None:
        self._write_buffer()
        for seq in sorted(self._dirty):
            if seq in self._segments:
                self._io(os.fsync, seq)
        self._dirty.clear()
        if self._dir_dirty:
            self._fsync_dir()

    # -- compaction ----------------------------------------------------------------------------

    def _compact_once(self, hard_limit: int) -> None:
        victim = self._pick_victim(hard_limit)
        if victim is None:
            raise StorageError(
                f"NVMe tier: nothing left to compact in {self.config.path} "
                "(disk accounting is broken; please report this)")
        self._compact(victim, hard_limit)

    def _pick_victim(self, hard_limit: int) -> _Segment | None:
        """The segment with the most reclaimable bytes whose copies fit under the limit."""
        best: _Segment | None = None
        for segment in self._segments.values():
            gain = segment.reclaimable_bytes
            copies = segment.disk_bytes - gain
            if gain <= 0 or self._disk_bytes + copies + 2 * IO_ALIGN > hard_limit:
                continue
            if best is None or gain > best.reclaimable_bytes:
                best = segment
        return best

    def _compact(self, victim: _Segment, hard_limit: int) -> None:
        """Copy the live records (and owed tombstones) of ``victim`` to the active segment,
        make the copies durable, then delete the victim's file."""
        self._compacting = True
        try:
            if victim is self._active:
                self._write_buffer()
                self._active = None
            seq = victim.seq
            newest_of: dict[bytes, int] = {}  # stale keys seen -> their newest segment before
            report = ScanReport()
            read = functools.partial(self._read_at, seq)
            for record in scan_records(read, victim.disk_bytes, report, _SCAN_WINDOW_BYTES):
                key = record.header.key
                loc = self._index.get(key)
                if loc is not None and loc.seq == seq and loc.offset == record.offset:
                    if record.is_intact:
                        self._copy_live(key, loc, record, hard_limit)
                        continue
                    self._checksum_failures += 1  # rotted since written: it is stale now
                    self._take_live(key)
                    self._stale_add(key, seq)
                stale = self._stale.get(key)
                if stale is not None and seq in stale:
                    newest_of.setdefault(key, max(stale))
                    self._stale_remove(key, seq)
            self._sweep_unseen(victim, newest_of)
            for key, newest in newest_of.items():
                stale = self._stale.get(key)
                if newest == seq and stale and key not in self._index:
                    # The victim held the key's newest record and older ones remain elsewhere.
                    self._write_tombstone(key, max(stale), hard_limit)
                self._repin(key)
            assert victim.num_live == 0 and victim.num_stale == 0 and victim.pinned_bytes == 0
            self._flush_locked()
            self._close_file(seq)
            try:
                os.unlink(self._path_of(seq))
            except FileNotFoundError:
                pass
            except OSError as e:
                raise StorageError(f"cannot delete NVMe segment {self._path_of(seq)}: {e}") from e
            self._fsync_dir()
            del self._segments[seq]
            self._dirty.discard(seq)
            self._disk_bytes -= victim.disk_bytes
            self._num_compactions += 1
        finally:
            self._compacting = False

    def _copy_live(self, key: bytes, loc: _Loc, record: ScannedRecord, limit: int) -> None:
        footprint = loc.footprint
        seq, offset = self._append((record.data,), footprint, limit)
        old, new = self._segments[loc.seq], self._segments[seq]
        old.live_bytes -= footprint
        old.num_live -= 1
        new.live_bytes += footprint
        new.num_live += 1
        loc.seq, loc.offset = seq, offset

    def _sweep_unseen(self, victim: _Segment, newest_of: dict[bytes, int]) -> None:
        """Account for records of ``victim`` the scan could not read (a header that rotted
        after it was written): its live ones are lost, its stale ones go with the file."""
        seq = victim.seq
        if victim.num_live:
            for key in [k for k, loc in self._index.items() if loc.seq == seq]:
                self._checksum_failures += 1
                self._take_live(key)
                self._stale_add(key, seq)
        if victim.num_stale:
            for key in [k for k, stale in self._stale.items() if seq in stale]:
                newest_of.setdefault(key, max(self._stale[key]))
                while key in self._stale and seq in self._stale[key]:
                    self._stale_remove(key, seq)

    # -- opening and recovery ------------------------------------------------------------------

    def _open_dir(self) -> None:
        path = self.config.path
        try:
            os.makedirs(path, exist_ok=True)
            self._dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            self._lock_fd = os.open(os.path.join(path, "LOCK"), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise StorageError(f"cannot use {path!r} as the NVMe directory: {e}") from e
        if not os.access(path, os.W_OK):
            raise StorageError(f"the NVMe directory {path!r} is not writable")
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            raise StorageError(f"the NVMe directory {path!r} is in use by another open tier; "
                               "close it first") from e

    def _recover(self) -> None:
        """Rebuild the index by replaying every segment in log order."""
        try:
            seqs = sorted(int(m.group(1)) for name in os.listdir(self.config.path)
                          if (m := _SEGMENT_NAME.match(name)))
            sizes = [os.stat(self._path_of(seq)).st_size for seq in seqs]
            for seq, file_bytes in zip(seqs[:-1], sizes[:-1], strict=True):
                if file_bytes == 0:  # created just before a crash: nothing to replay
                    os.unlink(self._path_of(seq))
                    self._dir_dirty = True
        except OSError as e:
            raise StorageError(f"cannot list the NVMe directory {self.config.path}: {e}") from e
        last_report: ScanReport | None = None
        for seq, file_bytes in zip(seqs, sizes, strict=True):
            if file_bytes == 0 and seq != seqs[-1]:
                continue
            self._segments[seq] = _Segment(seq, file_bytes)
            self._disk_bytes += file_bytes
            last_report = ScanReport()
            read = functools.partial(self._read_at, seq)
            for record in scan_records(read, file_bytes, last_report, _SCAN_WINDOW_BYTES):
                self._replay(seq, record)
            self._corrupt_skipped += last_report.num_corrupt
            self._next_seq = seq + 1
        for key in list(self._stale):
            self._repin(key)
        by_age = sorted(self._index.items(), key=lambda item: (item[1].seq, item[1].offset))
        dropped = 0
        while self.used_bytes > self.capacity_bytes and dropped < len(by_age):
            self._forget(by_age[dropped][0])  # the capacity shrank: the oldest go first
            dropped += 1
        self._num_dropped_at_open = dropped
        self._recovered = [RecoveredRecord(key, loc.parent, loc.raw_len)
                           for key, loc in by_age[dropped:]]
        if seqs and last_report is not None and last_report.num_corrupt == 0:
            self._resume_segment(seqs[-1], last_report.end_offset)
        for _ in range(4 * len(self._segments) + 16):
            if self._disk_bytes <= self._layout.write_limit:
                break
            # Over the limit: a smaller capacity than before, or a crash mid-compaction.
            victim = self._pick_victim(max(self.config.capacity_bytes, self._disk_bytes
                                           + self._layout.segment_bytes + 2 * IO_ALIGN))
            if victim is None:
                log.warning("NVMe tier %s: %d bytes of segments exceed capacity and cannot be "
                            "compacted now", self.config.path, self._disk_bytes)
                break
            self._compact(victim, self._disk_bytes + self._layout.segment_bytes + 2 * IO_ALIGN)
        if self._corrupt_skipped or dropped:
            log.warning("NVMe tier %s: skipped %d corrupt records, dropped %d over capacity",
                        self.config.path, self._corrupt_skipped, dropped)

    def _replay(self, seq: int, record: ScannedRecord) -> None:
        header = record.header
        key = header.key
        if key in self._index:
            old = self._take_live(key)
            self._stale_add(key, old.seq)
        if header.is_tombstone or not record.is_intact:
            # A tombstone, or a record that rotted: older records of the key must not win.
            self._stale_add(key, seq)
            return
        self._put_live(key, _Loc(seq, record.offset, header.stored_len, header.raw_len,
                                 header.flags, header.parent, header.payload_checksum))

    def _resume_segment(self, seq: int, end: int) -> None:
        """Append to the last segment, which ended cleanly, instead of starting a new one."""
        segment = self._segments[seq]
        disk_bytes = align_up(end)
        buffer_offset = align_down(end)
        if end > buffer_offset:
            got = self._read_at(seq, buffer_offset, self._wview[:IO_ALIGN])
            if got < end - buffer_offset:
                return
        if segment.disk_bytes != disk_bytes:  # only zeros lie past the last record
            self._io(os.ftruncate, seq, disk_bytes)
            self._disk_bytes += disk_bytes - segment.disk_bytes
            segment.disk_bytes = disk_bytes
            self._dirty.add(seq)
        self._active = segment
        self._end = self._written_end = end
        self._buffer_offset = buffer_offset

    # -- files ---------------------------------------------------------------------------------

    def _path_of(self, seq: int) -> str:
        return os.path.join(self.config.path, f"seg-{seq:010d}.log")

    def _open_file(self, seq: int, create: bool) -> int:
        flags = os.O_RDWR | (os.O_CREAT if create else 0)
        path = self._path_of(seq)
        try:
            if self._direct:
                try:
                    return os.open(path, flags | os.O_DIRECT, 0o644)
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise
                    self._use_buffered_io(e)
            return os.open(path, flags, 0o644)
        except OSError as e:
            raise StorageError(f"cannot open NVMe segment {path}: {e}") from e

    def _fd(self, seq: int) -> int:
        fd = self._fds.get(seq)
        if fd is not None:
            self._fds.move_to_end(seq)
            return fd
        fd = self._fds[seq] = self._open_file(seq, create=False)
        if len(self._fds) > _MAX_OPEN_FILES:
            _, old_fd = self._fds.popitem(last=False)
            os.close(old_fd)
        return fd

    def _close_file(self, seq: int) -> None:
        fd = self._fds.pop(seq, None)
        if fd is not None:
            os.close(fd)

    def _use_buffered_io(self, error: OSError) -> None:
        log.info("NVMe tier %s: O_DIRECT refused (%s); using buffered I/O",
                 self.config.path, error)
        self._direct = False
        for seq in list(self._fds):
            self._close_file(seq)

    def _io(self, op: Any, seq: int, *args: Any) -> Any:
        """``op(fd, *args)`` on a segment; O_DIRECT refusals fall back to buffered I/O."""
        while True:
            try:
                return op(self._fd(seq), *args)
            except OSError as e:
                if e.errno == errno.EINVAL and self._direct:
                    self._use_buffered_io(e)
                    continue
                raise StorageError(f"I/O error on NVMe segment {self._path_of(seq)}: {e}") from e

    def _pwrite(self, seq: int, data: memoryview, offset: int) -> None:
        done = 0
        while done < len(data):
            done += self._io(os.pwrite, seq, data[done:], offset + done)
        self._bytes_written += done
        self._dirty.add(seq)

    def _read_at(self, seq: int, offset: int, buf: memoryview) -> int:
        """Read into ``buf`` (aligned, like ``offset``) until it is full or the file ends."""
        done = 0
        while done < len(buf):
            got = self._io(os.preadv, seq, [buf[done:]], offset + done)
            if got == 0:
                break
            done += got
        self._bytes_read += done
        return done

    def _fsync_dir(self) -> None:
        try:
            os.fsync(self._dir_fd)
        except OSError as e:
            raise StorageError(f"cannot sync the NVMe directory {self.config.path}: {e}") from e
        self._dir_dirty = False

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError("the nvme tier is closed")

    def _release(self) -> None:
        self._closed = True
        for seq in list(self._fds):
            self._close_file(seq)
        for fd in (self._dir_fd, self._lock_fd):
            if fd >= 0:
                os.close(fd)  # closing the lock file releases the flock
        self._dir_fd = self._lock_fd = -1
        for buf in (self._wbuf, self._rbuf):
            try:
                buf.close()
            except BufferError:  # a view is still referenced somewhere; GC frees it
                pass

"""The NVMe tier: values in checksummed records, appended to segment files.

    <path>/seg-0000000001.log     sealed: read, then compacted away
    <path>/seg-0000000002.log     sealed
    <path>/seg-0000000003.log     active: records are appended here

`NvmeTier` implements the Tier contract: it checks keys and values, compresses, checks
each value it reads, and keeps `used_bytes` within `capacity_bytes`. The rest is split
over the package's other modules (`kvstore.tiers.nvme` lists them).

Records are copied into a write buffer and written with one aligned `pwrite` of
`write_buffer_bytes` when it fills, through an O_DIRECT descriptor where the filesystem
takes one. `flush()` writes the partial buffer rounded up to 4 KiB with zeros and keeps its
unfinished last block, which the next flush rewrites, so flushing often wastes no space.

Invariants
- One lock guards every call; the helpers above are not thread-safe on their own.
- `used_bytes` (live footprint + one tombstone per pinned key, see `log`) is at most
  `capacity_bytes` after every call.
- The segment files never exceed `config.capacity_bytes`. Plain writes stay one segment
  (plus slack) below it: that is where compaction copies a victim's live records before it
  unlinks the victim. The logical `capacity_bytes` keeps back one more segment, so when
  plain writes reach their limit the dead bytes add up to at least a segment and greedy
  compaction always makes progress.
- A read returns the bytes that were put or nothing: a value that fails its checksum or does
  not decompress is a miss, and its key is forgotten.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from typing import Any, NamedTuple

import numpy as np

from kvstore.buffers import copy_bytes, output_view, value_view
from kvstore.errors import InvalidValueError, StorageError, StoreClosedError
from kvstore.tiers.base import check_key
from kvstore.tiers.nvme.config import Compression, NvmeLayout, NvmeTierConfig, lz4_block
from kvstore.tiers.nvme.files import SEGMENT_NAME, SegmentFiles
from kvstore.tiers.nvme.log import RecordLoc, SegmentLog
from kvstore.tiers.nvme.record import (
    FLAG_COMPRESSED,
    IO_ALIGN,
    checksum,
    pack_header,
    record_footprint,
)
from kvstore.tiers.nvme.writer import SegmentWriter

__all__ = ["NvmeTier", "RecoveredRecord"]

log = logging.getLogger(__name__)


class RecoveredRecord(NamedTuple):
    """A live record found when the tier opened."""

    key: bytes
    parent: bytes | None
    nbytes: int


class NvmeTier:
    """A log-structured NVMe tier; see the module docstring. Thread-safe (one lock)."""

    kind_name = "nvme"

    def __init__(self, config: NvmeTierConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._closed = False
        self._files = SegmentFiles(config.path, config.direct_io)
        self._writer: SegmentWriter | None = None
        self._recovered: list[RecoveredRecord] = []
        self._num_dropped_at_open = 0
        try:
            self._files.open()
            layout = NvmeLayout.of(config, self._room_bytes())
            if layout.disk_capacity_bytes < config.capacity_bytes:
                log.warning("NVMe tier %s: the filesystem holds %d MiB for it, not the %d MiB "
                            "configured; using %d MiB", config.path,
                            layout.disk_capacity_bytes >> 20, config.capacity_bytes >> 20,
                            layout.disk_capacity_bytes >> 20)
            self.capacity_bytes = layout.capacity_bytes
            self._writer = SegmentWriter(self._files, layout.write_buffer_bytes,
                                         layout.max_footprint)
            self._log = SegmentLog(self._files, self._writer,
                                   segment_bytes=layout.segment_bytes,
                                   write_limit=layout.write_limit,
                                   capacity_bytes=layout.capacity_bytes,
                                   disk_capacity_bytes=layout.disk_capacity_bytes)
            self._records = self._log.records
            live, self._num_dropped_at_open = self._log.recover()
            self._recovered = [RecoveredRecord(key, loc.parent, loc.raw_len)
                               for key, loc in live]
        except BaseException:
            self._release()
            raise

    def _room_bytes(self) -> int:
        """What the filesystem can hold for the tier: its segments and the free space."""
        path = self.config.path
        try:
            stat = os.statvfs(path)
            used = sum(os.stat(os.path.join(path, name)).st_size for name in os.listdir(path)
                       if SEGMENT_NAME.match(name))
        except OSError as e:
            raise StorageError(f"cannot size the NVMe directory {path}: {e}") from e
        return used + stat.f_bavail * stat.f_frsize

    # -- sizes -------------------------------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        return self._records.used_bytes

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
            packed = lz4_block().compress(payload, store_size=False)
            if len(packed) < nbytes:
                payload, flags = memoryview(packed), FLAG_COMPRESSED
        payload_checksum = checksum(payload)
        header_for = functools.partial(pack_header, flags, key, parent, len(payload), nbytes,
                                       payload_checksum)
        with self._lock:
            self._check_open()
            if (self._log.is_read_only
                    or self.used_bytes + record_footprint(nbytes) > self.capacity_bytes):
                return False
            try:
                seq, offset = self._log.write(header_for, payload)
            except StorageError:
                if self._log.is_read_only:  # the disk failed just now (logged): no room
                    return False
                raise
            self._records.make_live(key, RecordLoc(seq, offset, len(payload), nbytes, flags, parent,
                                               payload_checksum))
            return True

    @property
    def is_read_only(self) -> bool:
        """Whether a write error (a full or failing disk) stopped the tier's writes: it
        serves what it holds, takes nothing new, and `flush` raises `StorageError`. (Read
        without the lock: once true it stays true, and a put or delete checks again.)"""
        return self._log.is_read_only

    def pins_old_records_of(self, key: bytes) -> bool:
        """Whether ``key`` has records on a disk that can no longer take its tombstone: a
        new value or a delete of it would be undone by a reopen, which brings the old record
        back. Only a read-only tier pins anything."""
        if not self._log.is_read_only:
            return False
        with self._lock:
            return not self._closed and self._records.has_records_of(key)

    def get(self, key: bytes) -> bytes | None:
        """The value, or None if absent or if it fails its checksum (then it is forgotten)."""
        return self.read_bytes(check_key(key))

    def read_bytes(self, key: bytes) -> bytes | None:
        """`get` for a caller that checked ``key`` (a 4 KiB read is ~25 us, so the check's
        ~0.5 us shows)."""
        with self._lock:
            self._check_open()
            loc = self._records.find(key)
            if loc is None:
                return None
            if not (loc.flags & FLAG_COMPRESSED or (loc.offset | loc.stored_len) % IO_ALIGN):
                # A whole-block payload: one O_DIRECT read into the aligned scratch buffer,
                # checked there, then copied out (the path of 4 KiB values and large ones).
                scratch = self._writer.scratch(loc.stored_len)
                return scratch.tobytes() if self._read_checked(key, loc, scratch) else None
            data = self._load(key, loc)
            return data if data is None or isinstance(data, bytes) else bytes(data)

    def read_into(self, key: bytes, out: Any) -> bool:
        """Copy the value into ``out`` (exactly `nbytes_of(key)` bytes); False on a miss."""
        key = check_key(key)
        with self._lock:
            self._check_open()
            loc = self._records.find(key)
            if loc is None:
                return False
            return self._read_checked(key, loc, output_view(out, loc.raw_len))

    def read_exact(self, key: bytes, dst: np.ndarray) -> bool:
        """`read_into` for a caller that checked ``key`` and gives a writable 1-D uint8 array
        (the Store's 4 KiB reads spend a third of their CPU time in such checks). A value
        whose size is not ``len(dst)`` (it changed since the caller looked) is a miss."""
        with self._lock:
            self._check_open()
            loc = self._records.find(key)
            if loc is None or loc.raw_len != dst.shape[0]:
                return False
            return self._read_checked(key, loc, dst)

    def _read_checked(self, key: bytes, loc: RecordLoc, dst: Any) -> bool:
        """Copy the value of ``loc`` into ``dst`` (its size); False, the key forgotten, if
        it fails its checksum (lock held)."""
        if not loc.flags & FLAG_COMPRESSED and isinstance(dst, np.ndarray):
            # Straight into the caller's buffer (one O_DIRECT read when it is aligned), then
            # checked there: on a failure its contents are unspecified.
            if (self._log.read_payload_into(loc, dst)
                    and checksum(dst) == loc.payload_checksum):
                return True
            self._drop_corrupt(key, loc)
            return False
        data = self._load(key, loc)
        if data is None:
            return False
        copy_bytes(dst, np.frombuffer(data, dtype=np.uint8))
        return True

    def nbytes_of(self, key: bytes) -> int | None:
        with self._lock:
            self._check_open()
            loc = self._records.find(check_key(key))
            return None if loc is None else loc.raw_len

    def parent_of(self, key: bytes) -> bytes | None:
        with self._lock:
            self._check_open()
            loc = self._records.find(check_key(key))
            return None if loc is None else loc.parent

    def __contains__(self, key: object) -> bool:
        with self._lock:
            self._check_open()
            return (isinstance(key, bytes | bytearray | memoryview)
                    and self._records.find(bytes(key)) is not None)

    def __len__(self) -> int:
        with self._lock:
            self._check_open()
            return len(self._records)

    def evict(self, key: bytes) -> bool:
        """Forget ``key``; its record stays on disk until compacted and may be found again
        by the next open (as the key's last durable value)."""
        key = check_key(key)
        with self._lock:
            self._check_open()
            if self._records.find(key) is None:
                return False
            self._records.forget(key)
            return True

    def delete(self, key: bytes) -> bool:
        """Forget ``key`` and write a tombstone so no record of it comes back at reopen.
        True if it was present."""
        key = check_key(key)
        with self._lock:
            self._check_open()
            return self._log.delete(key)

    def recovered(self) -> list[RecoveredRecord]:
        """The live records found at open, oldest first."""
        return list(self._recovered)

    def flush(self) -> None:
        """Make everything put or deleted so far durable."""
        with self._lock:
            self._check_open()
            self._log.flush()

    def close(self) -> None:
        """Flush, then release the files; later calls raise `StoreClosedError`."""
        with self._lock:
            if self._closed:
                return
            try:
                self._log.flush()
            finally:
                self._release()

    def __enter__(self) -> NvmeTier:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            records = self._records
            return {
                "capacity_bytes": self.capacity_bytes,
                "used_bytes": records.used_bytes,
                "live_bytes": records.live_bytes,
                "tombstone_bytes": records.pinned_bytes,
                "dead_bytes": records.disk_bytes - records.used_bytes,
                "disk_bytes": records.disk_bytes,
                "disk_capacity_bytes": self.config.capacity_bytes,
                "segments": len(records.segments),
                "blocks": len(records),
                "compactions": self._log.num_compactions,
                "read_only": self._log.is_read_only,
                "read_errors": self._log.num_read_errors,
                "checksum_failures": self._log.num_checksum_failures,
                "corrupt_records_skipped": self._log.num_corrupt_skipped,
                "records_dropped_at_open": self._num_dropped_at_open,
                "compression_ratio": (records.live_raw_bytes / records.live_stored_bytes
                                      if records.live_stored_bytes else 1.0),
                "bytes_written": self._files.num_bytes_written,
                "bytes_read": self._files.num_bytes_read,
                "direct_io": self._files.is_direct,
            }

    # -- reading -------------------------------------------------------------------------------

    def _load(self, key: bytes, loc: RecordLoc) -> memoryview | bytes | None:
        """The value's bytes, checked; None (and the key forgotten) if they are corrupt."""
        data = self._log.read_payload(loc)
        if data is not None and checksum(data) == loc.payload_checksum:
            if not loc.flags & FLAG_COMPRESSED:
                return data
            try:
                raw = lz4_block().decompress(data, uncompressed_size=loc.raw_len)
            except Exception:
                raw = None
            if raw is not None and len(raw) == loc.raw_len:
                return raw
        self._drop_corrupt(key, loc)
        return None

    def _drop_corrupt(self, key: bytes, loc: RecordLoc) -> None:
        log.warning("NVMe record of key %s in segment %d could not be read back whole (its "
                    "checksum failed or the disk refused it); dropped", key.hex(), loc.seq)
        self._log.forget_corrupt(key)

    # -- closing -------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError("the nvme tier is closed")

    def _release(self) -> None:
        self._closed = True
        if self._writer is not None:
            self._writer.close()  # first: its write in flight uses a segment's descriptor
        self._files.close()

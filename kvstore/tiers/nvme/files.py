"""The NVMe tier's segment files: the directory and its lock, aligned I/O, the write buffer.

    <path>/LOCK                   flock'd by the one tier that has the directory open
    <path>/KEY                    the key of the record headers' MACs (`record.HeaderMac`)
    <path>/seg-0000000003.log     segment 3 (`SegmentFiles.path_of(3)`)

    active segment   [ on disk ................ | write buffer (aligned mmap) ]
                     0                     buffer offset      end      buffer end

`SegmentFiles` owns the descriptors; `SegmentWriter` appends records to the active segment
through one aligned write buffer and reads records back from the disk or that buffer.
Neither is thread-safe: the tier's lock guards both.

Invariants
- One open tier per directory: `open()` takes an exclusive flock on LOCK, held until
  `close()` closes its descriptor.
- Only the tier's user reads the directory: it is mode 0700 and every file in it 0600
  (looser modes left by an older kvstore or by hand are tightened at open), because the
  segments hold every tenant's values and KEY is what no tenant may learn.
- KEY is written once, whole (a temporary file, fsync, rename, directory fsync), before
  any segment is.
- Descriptors are cached per segment; a miss that takes the cache past `_MAX_OPEN_FILES`
  closes the least recently used one.
- Files are opened with O_DIRECT when the config asks and the filesystem takes it. The first
  EINVAL, at open or on any I/O, switches the directory to buffered I/O for good: cached
  descriptors are closed, reopened without O_DIRECT, and the I/O is retried. Hence every
  offset, length and buffer handed to `pwrite` and `read_at` is 4 KiB aligned.
- Any other OSError becomes a `StorageError` that names the file or the directory.
- `sync()` fsyncs each file written or truncated since the last sync, then the directory if
  a file was created or removed since its last fsync: then everything written is durable.
- Writer: bytes ``[0, buffer offset)`` of the active segment are on disk, bytes ``[buffer
  offset, end)`` are in the buffer, and ``buffer offset`` is 4 KiB aligned. A full buffer
  goes out in one aligned pwrite. `write_buffer()` writes the partial buffer padded with
  zeros to 4 KiB and keeps its unfinished last block, which the next write rewrites (same
  bytes, plus new ones). So once the buffer is written the file is ``align_up(end)`` bytes
  and all of them past ``end`` are zeros.
- The open header page (where detached records put their headers, see `record`) is in
  the buffer: once a buffer write takes it to disk it is sealed and never written again.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import fcntl
import logging
import os
import re
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from kvstore.buffers import page_aligned_buffer
from kvstore.durable_file import DamagedKeyError, key_file
from kvstore.errors import StorageError
from kvstore.tiers.nvme.record import (
    HEADER_BYTES,
    HEADERS_PER_PAGE,
    IO_ALIGN,
    KEY_BYTES,
    RECORD_ALIGN,
    HeaderFor,
    HeaderMac,
    SegmentKey,
    align_down,
    align_up,
    is_detached,
)

__all__ = ["SEGMENT_NAME", "SegmentFiles", "SegmentWriter"]

log = logging.getLogger(__name__)

SEGMENT_NAME = re.compile(r"^seg-(\d+)\.log$")
_KEY_FILE = "KEY"
_PRIVATE_FILE = 0o600
_PRIVATE_DIR = 0o700
_MAX_OPEN_FILES = 64
_ZERO_BLOCK = bytes(IO_ALIGN)


def _address(array: np.ndarray) -> int:
    if array.flags.writeable:  # ctypes is the quicker way (a 4 KiB read is ~50 us)
        return ctypes.addressof(ctypes.c_char.from_buffer(array))
    return array.__array_interface__["data"][0]


class SegmentFiles:
    """The segment files of one directory, opened with O_DIRECT where it is taken."""

    def __init__(self, path: str, direct_io: bool) -> None:
        self.path = path
        self.num_bytes_written = self.num_bytes_read = 0
        self._is_direct = direct_io and hasattr(os, "O_DIRECT")
        self._fds: collections.OrderedDict[int, int] = collections.OrderedDict()
        self._held: set[int] = set()    # segments with a write in flight: their fd stays open
        self.before_reopen: Any = None  # called before every descriptor is closed (the writer
        #                                 finishes its write in flight first)
        self._dirty: set[int] = set()   # segments written or truncated since the last sync
        self._is_dir_dirty = False       # a file created or removed since the last dir fsync
        self._dir_fd = self._lock_fd = -1

    @property
    def is_direct(self) -> bool:
        """Whether segment I/O still goes through O_DIRECT."""
        return self._is_direct

    def open(self) -> None:
        """Create the directory if needed (mode 0700), lock it for this tier and load its
        key (`segment_key`), making one if it has none."""
        path = self.path
        if os.path.exists(path) and not os.path.isdir(path):
            raise StorageError(f"the NVMe path {path!r} is a file, not a directory")
        try:
            os.makedirs(path, mode=_PRIVATE_DIR, exist_ok=True)
            self._dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            raise StorageError(f"cannot use {path!r} as the NVMe directory: {e}") from e
        _make_private(self._dir_fd, path, _PRIVATE_DIR)
        try:
            self._lock_fd = os.open(os.path.join(path, "LOCK"), os.O_RDWR | os.O_CREAT,
                                    _PRIVATE_FILE)
        except OSError as e:
            raise StorageError(f"cannot use {path!r} as the NVMe directory: {e}") from e
        if not os.access(path, os.W_OK):
            raise StorageError(f"the NVMe directory {path!r} is not writable")
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            raise StorageError(f"the NVMe directory {path!r} is in use by another open tier; "
                               "close it first") from e
        _make_private(self._lock_fd, os.path.join(path, "LOCK"), _PRIVATE_FILE)
        self.segment_key = SegmentKey(self._load_key())

    def _load_key(self) -> bytes:
        """The directory's key, made now if it has none (under the lock)."""
        path = os.path.join(self.path, _KEY_FILE)
        had_segments = any(SEGMENT_NAME.match(name) for name in _listdir(self.path))
        try:
            key, is_new = key_file(path, KEY_BYTES)
            fd = os.open(path, os.O_RDONLY)
            try:
                _make_private(fd, path, _PRIVATE_FILE)
            finally:
                os.close(fd)
        except DamagedKeyError as e:
            raise StorageError(
                f"the NVMe directory key {path} is damaged ({e}): its segments cannot be "
                "read; remove the directory's files to start empty") from e
        except OSError as e:
            raise StorageError(f"cannot use the NVMe directory key {path}: {e}") from e
        if is_new and had_segments:
            log.warning("NVMe directory %s has segments but no KEY: they were written by "
                        "another kvstore and will be read as corrupt and compacted away",
                        self.path)
        return key

    def list_segments(self) -> list[tuple[int, int]]:
        """(seqno, file size) of each segment, in log order. An empty file other than the
        last was created just before a crash and holds nothing: it is removed, not listed."""
        try:
            seqs = sorted(int(m.group(1)) for name in os.listdir(self.path)
                          if (m := SEGMENT_NAME.match(name)))
            stats = [os.stat(self.path_of(seq)) for seq in seqs]
            for seq, stat in zip(seqs, stats, strict=True):
                if stat.st_mode & 0o077:
                    os.chmod(self.path_of(seq), _PRIVATE_FILE)
            sizes = [stat.st_size for stat in stats]
            for seq, file_bytes in zip(seqs[:-1], sizes[:-1], strict=True):
                if file_bytes == 0:
                    os.unlink(self.path_of(seq))
                    self._is_dir_dirty = True
        except OSError as e:
            raise StorageError(f"cannot list the NVMe directory {self.path}: {e}") from e
        return [(seq, file_bytes) for seq, file_bytes in zip(seqs, sizes, strict=True)
                if file_bytes or seq == seqs[-1]]

    def path_of(self, seq: int) -> str:
        return os.path.join(self.path, f"seg-{seq:010d}.log")

    def create(self, seq: int) -> None:
        """Create the file of segment ``seq`` (the directory is synced at the next `sync`)."""
        self._fds[seq] = self._open_file(seq, create=True)
        self._is_dir_dirty = True

    def remove(self, seq: int) -> None:
        """Delete the file of segment ``seq`` and sync the directory."""
        self._close_file(seq)
        try:
            os.unlink(self.path_of(seq))
        except FileNotFoundError:
            pass
        except OSError as e:
            raise StorageError(f"cannot delete NVMe segment {self.path_of(seq)}: {e}") from e
        self.sync_dir()
        self._dirty.discard(seq)

    def truncate(self, seq: int, nbytes: int) -> None:
        self._io(os.ftruncate, seq, nbytes)
        self._dirty.add(seq)

    def pwrite(self, seq: int, data: memoryview, offset: int) -> None:
        done = 0
        while done < len(data):
            done += self._io(os.pwrite, seq, data[done:], offset + done)
        self.num_bytes_written += done
        self._dirty.add(seq)

    def hold(self, seq: int, nbytes: int) -> int:
        """The descriptor of segment ``seq`` for a write of ``nbytes`` that another thread
        makes (`release` after): it is not closed meanwhile, and counts as written."""
        fd = self._io(lambda fd: fd, seq)
        self._held.add(seq)
        self.num_bytes_written += nbytes
        self._dirty.add(seq)
        return fd

    def release(self, seq: int) -> None:
        self._held.discard(seq)

    def read_at(self, seq: int, offset: int, buf: Any) -> int:
        """Read into ``buf`` (aligned, like ``offset``; a memoryview or 1-D uint8 array)
        until it is full or the file ends."""
        nbytes = len(buf)
        done = self._io(os.preadv, seq, [buf], offset)  # one call, unless it reads short
        while 0 < done < nbytes:
            got = self._io(os.preadv, seq, [buf[done:]], offset + done)
            if got == 0:
                break
            done += got
        self.num_bytes_read += done
        return done

    def read_whole(self, seq: int, offset: int, dst: np.ndarray) -> bool | None:
        """Fill ``dst`` (not empty; ``offset`` and its length aligned) straight from the file;
        False if the file ends first, None if ``dst`` cannot take an O_DIRECT read (its
        address is not aligned: read through an aligned buffer instead). `read_at`, with its
        layers skipped on the common path: one read through an open descriptor, which for a
        4 KiB value is most of the cost (asking the kernel beats checking the address)."""
        fd = self._fds.get(seq)
        if fd is not None:
            try:
                got = os.preadv(fd, [dst], offset)
            except OSError as e:
                if e.errno == errno.EINVAL and self._is_direct:
                    return None
                # read_at below retries it and handles the error
            else:
                if got == dst.shape[0]:
                    self.num_bytes_read += got
                    return True
        elif self._is_direct and _address(dst) % IO_ALIGN:
            return None
        return self.read_at(seq, offset, dst) == dst.shape[0]

    def sync(self) -> None:
        """fsync each file written since the last sync, then the directory if it changed."""
        for seq in sorted(self._dirty):
            self._io(os.fsync, seq)
        self._dirty.clear()
        if self._is_dir_dirty:
            self.sync_dir()

    def sync_dir(self) -> None:
        try:
            os.fsync(self._dir_fd)
        except OSError as e:
            raise StorageError(f"cannot sync the NVMe directory {self.path}: {e}") from e
        self._is_dir_dirty = False

    def close(self) -> None:
        """Close every descriptor; closing the lock file releases the flock."""
        for seq in list(self._fds):
            self._close_file(seq)
        for fd in (self._dir_fd, self._lock_fd):
            if fd >= 0:
                os.close(fd)
        self._dir_fd = self._lock_fd = -1

    def _open_file(self, seq: int, create: bool) -> int:
        flags = os.O_RDWR | (os.O_CREAT if create else 0)
        path = self.path_of(seq)
        try:
            if self._is_direct:
                try:
                    return os.open(path, flags | os.O_DIRECT, _PRIVATE_FILE)
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise
                    self._use_buffered_io(e)
            return os.open(path, flags, _PRIVATE_FILE)
        except OSError as e:
            raise StorageError(f"cannot open NVMe segment {path}: {e}") from e

    def _fd(self, seq: int) -> int:
        fd = self._fds.get(seq)
        if fd is not None:
            self._fds.move_to_end(seq)
            return fd
        fd = self._fds[seq] = self._open_file(seq, create=False)
        if len(self._fds) > _MAX_OPEN_FILES:
            old = next(s for s in self._fds if s not in self._held)
            os.close(self._fds.pop(old))
        return fd

    def _close_file(self, seq: int) -> None:
        fd = self._fds.pop(seq, None)
        if fd is not None:
            os.close(fd)

    def _use_buffered_io(self, error: OSError) -> None:
        log.info("NVMe tier %s: O_DIRECT refused (%s); using buffered I/O", self.path, error)
        self._is_direct = False
        if self.before_reopen is not None:
            self.before_reopen()
        for seq in list(self._fds):
            self._close_file(seq)

    def _io(self, op: Any, seq: int, *args: Any) -> Any:
        """``op(fd, *args)`` on a segment; O_DIRECT refusals fall back to buffered I/O."""
        while True:
            try:
                return op(self._fd(seq), *args)
            except OSError as e:
                if e.errno == errno.EINVAL and self._is_direct:
                    self._use_buffered_io(e)
                    continue
                raise StorageError(f"I/O error on NVMe segment {self.path_of(seq)}: {e}") from e


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError as e:
        raise StorageError(f"cannot list the NVMe directory {path}: {e}") from e


def _make_private(fd: int, path: str, mode: int) -> None:
    """Tighten ``fd``'s mode to ``mode`` if others may read it (a warning if we may not)."""
    try:
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, mode)
            log.info("made %s private (mode %o)", path, mode)
    except OSError as e:
        log.warning("cannot make %s private (mode %o): %s", path, mode, e)


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    """pwrite all of ``data`` at ``offset`` (the I/O thread's job)."""
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


class SegmentWriter:
    """Appends records to the active segment through an aligned write buffer, and reads
    stored bytes back from the disk or that buffer."""

    def __init__(self, files: SegmentFiles, buffer_bytes: int, max_record_bytes: int) -> None:
        self._files = files
        self._seq: int | None = None
        self._mac: HeaderMac | None = None  # the active segment's
        self._end = self._buffer_offset = self._written_end = 0
        self._header_page: int | None = None  # offset of the open header page, if any
        self._num_headers = 0                  # headers in it so far
        self._wview = page_aligned_buffer(buffer_bytes)
        # A full buffer is written by the I/O thread while records go on into the other one
        # (one write in flight at most: the copy and checksum of puts overlap the disk).
        self._spare_view = page_aligned_buffer(buffer_bytes)
        self._inflight: tuple[Future[None], int, int, memoryview] | None = None
        self._failure: StorageError | None = None
        self._io_thread = ThreadPoolExecutor(1, thread_name_prefix="kvstore-nvme-write")
        files.before_reopen = self.drain
        self._rview = page_aligned_buffer(align_up(max_record_bytes) + 2 * IO_ALIGN)
        self._rarray = np.frombuffer(self._rview, dtype=np.uint8)

    @property
    def seq(self) -> int | None:
        """The active segment, if there is one."""
        return self._seq

    @property
    def end(self) -> int:
        """Where the next record goes in the active segment."""
        return self._end

    def start(self, seq: int) -> None:
        """Create segment ``seq`` and make it the active one (after `seal`)."""
        assert self._seq is None, "seal the active segment before starting another"
        self._check_writable()
        try:
            self._files.create(seq)
        except StorageError as e:
            raise self.fail(e) from e.__cause__
        self._seq = seq
        self._mac = self._files.segment_key.for_segment(seq)
        self._end = self._buffer_offset = self._written_end = 0
        self._header_page = None

    def resume(self, seq: int, end: int) -> bool:
        """Make segment ``seq``, whose records end at ``end``, active again: its unfinished
        last block goes back into the buffer. False, changing nothing, if it reads short."""
        buffer_offset = align_down(end)
        if end > buffer_offset:
            got = self._files.read_at(seq, buffer_offset, self._wview[:IO_ALIGN])
            if got < end - buffer_offset:
                return False
        self._seq = seq
        self._mac = self._files.segment_key.for_segment(seq)
        self._end = self._written_end = end
        self._buffer_offset = buffer_offset
        self._header_page = None
        return True

    def seal(self) -> None:
        """Write out the buffer; no segment is active after."""
        self.write_buffer()
        self._seq = None
        self._header_page = None

    def append(self, header_for: HeaderFor, payload: Any, stored_bytes: int) -> int:
        """Append one record: ``payload`` (``stored_bytes``) and its header,
        ``header_for(payload offset)`` signed for the active segment, inline or detached as
        `record` says, padded with zeros to 8 bytes; returns the offset of its payload."""
        mac = self._mac
        assert self._seq is not None and mac is not None, "no active segment to append to"
        self._check_writable()
        if not is_detached(stored_bytes):
            offset = self._end + HEADER_BYTES
            self._buffer_write(mac.sign(header_for(offset)))
        else:
            page = self._header_page
            if (page is None or page < self._buffer_offset
                    or self._num_headers == HEADERS_PER_PAGE):
                page = self._open_header_page()
            offset = align_up(self._end)
            self._buffer_write(_ZERO_BLOCK[:offset - self._end])
            slot = page + self._num_headers * HEADER_BYTES - self._buffer_offset
            self._wview[slot:slot + HEADER_BYTES] = mac.sign(header_for(offset))
            self._num_headers += 1
        self._buffer_write(payload)
        pad = -self._end % RECORD_ALIGN
        if pad:
            self._buffer_write(_ZERO_BLOCK[:pad])
        return offset

    def _open_header_page(self) -> int:
        """Start a header page at the next 4 KiB boundary, in the buffer."""
        page = align_up(self._end)
        self._buffer_write(_ZERO_BLOCK[:page - self._end])
        # Taken without `_buffer_write`, which would write a full buffer out with the page
        # still empty; the buffer has room, since it is never left full and `page` aligned.
        used = page - self._buffer_offset
        self._wview[used:used + IO_ALIGN] = _ZERO_BLOCK[:IO_ALIGN]
        self._end += IO_ALIGN
        self._header_page, self._num_headers = page, 0
        return page

    @property
    def failure(self) -> StorageError | None:
        """The write error that stopped this writer for good, if one did (see `fail`)."""
        return self._failure

    def fail(self, error: StorageError) -> StorageError:
        """Stop writing for good after ``error`` (the disk is full or failing): every later
        write raises it. What was appended stays readable, from the disk or the buffer, and
        reads of records that are in neither fail their checksum (a miss)."""
        if self._failure is None:
            self._failure = error
            log.error("NVMe tier %s: %s; no more writes: the tier serves what it holds, read "
                      "only, until it is reopened", self._files.path, error)
        return error

    def _check_writable(self) -> None:
        if self._failure is not None:
            raise StorageError(f"the NVMe tier stopped writing after an error: "
                               f"{self._failure}")

    def drain(self) -> None:
        """Wait for the buffer write in flight, if any; raise `StorageError` if it failed
        (a refused O_DIRECT write is made again buffered, as every I/O falls back). The
        bytes of a failed write stay readable: they go back in front of the buffer."""
        job, self._inflight = self._inflight, None
        if job is None:
            return
        done, seq, offset, view = job
        try:
            done.result()
            return
        except OSError as e:
            error = e
        finally:
            self._files.release(seq)
        try:
            if error.errno != errno.EINVAL or not self._files.is_direct:
                raise StorageError(f"I/O error on NVMe segment {self._files.path_of(seq)}: "
                                   f"{error}") from error
            self._files.pwrite(seq, view, offset)  # O_DIRECT refused: again, as reads do
        except StorageError as e:
            used = self._end - self._buffer_offset
            tail = bytearray(len(view) + used)  # [offset, end) of the segment, in memory
            tail[:len(view)] = view
            tail[len(view):] = self._wview[:used]
            self._wview, self._buffer_offset = memoryview(tail), offset
            self._written_end = offset
            raise self.fail(e) from e.__cause__

    def _drain_for_read(self, seq: int) -> None:
        """Before reading segment ``seq``: its bytes may be in the write in flight. A write
        that failed is the writer's business (`fail`), not the reader's."""
        if self._inflight is not None and self._inflight[1] == seq:
            try:
                self.drain()
            except StorageError:
                pass

    def write_buffer(self) -> None:
        """Write what the buffer holds, zero-padded to 4 KiB; keep its unfinished block."""
        self.drain()
        if self._seq is None or self._end == self._written_end:
            return
        self._check_writable()
        used = self._end - self._buffer_offset
        nbytes = align_up(used)
        self._wview[used:nbytes] = _ZERO_BLOCK[:nbytes - used]
        try:
            self._files.pwrite(self._seq, self._wview[:nbytes], self._buffer_offset)
        except StorageError as e:
            raise self.fail(e) from e.__cause__
        self._written_end = self._end
        keep = align_down(used)
        if keep:
            self._wview[:used - keep] = bytes(self._wview[keep:used])  # < 4 KiB
            self._buffer_offset += keep

    def read(self, seq: int, start: int, nbytes: int) -> memoryview | None:
        """Bytes ``[start, start + nbytes)`` of segment ``seq`` (a view valid until the next
        I/O); None if the file is shorter than that."""
        end = start + nbytes
        if start == end:
            return memoryview(b"")
        self._drain_for_read(seq)
        in_buffer = seq == self._seq
        if in_buffer and start >= self._buffer_offset:
            return self._wview[start - self._buffer_offset:end - self._buffer_offset]
        base = align_down(start)
        disk_end = min(align_up(end), self._buffer_offset) if in_buffer else align_up(end)
        scratch = self._scratch(align_up(end) - base)
        got = self._files.read_at(seq, base, scratch[:disk_end - base])
        if got < min(end, disk_end) - base:
            return None  # the file is shorter than the index says
        if in_buffer and end > disk_end:  # the record's tail is still in the write buffer
            scratch[disk_end - base:end - base] = self._wview[:end - disk_end]
        return scratch[start - base:end - base]

    def read_into(self, seq: int, start: int, dst: np.ndarray) -> bool:
        """Copy bytes ``[start, start + len(dst))`` of segment ``seq`` into ``dst`` (a 1-D
        uint8 array); False if the file is shorter than that.

        An aligned span on disk read into an aligned ``dst`` goes there in one read, with
        no bounce buffer and no copy: the path of large records, whose payloads are 4 KiB
        aligned, into page-aligned caller buffers.
        """
        nbytes = dst.shape[0]
        self._drain_for_read(seq)
        if (not (start | nbytes) % IO_ALIGN and nbytes
                and not (seq == self._seq and start + nbytes > self._buffer_offset)):
            done = self._files.read_whole(seq, start, dst)
            if done is not None:
                return done
        data = self.read(seq, start, nbytes)
        if data is None:
            return False
        dst[:] = np.frombuffer(data, dtype=np.uint8)
        return True

    def close(self) -> None:
        """Finish the write in flight (its error logged: the tier is closing) and free the
        buffers. Before the files close: the write uses their descriptor."""
        try:
            self.drain()
        except StorageError as e:
            log.error("%s", e)
        self._io_thread.shutdown(wait=True)
        self._files.before_reopen = None
        self._rarray = np.empty(0, dtype=np.uint8)  # no view of the read buffer outlives it
        for view in (self._wview, self._spare_view, self._rview):
            view.release()  # the maps go with the last reference

    def _buffer_write(self, data: Any) -> None:
        data = memoryview(data)
        size = len(self._wview)
        pos, nbytes = 0, len(data)
        while pos < nbytes:
            used = self._end - self._buffer_offset
            take = min(size - used, nbytes - pos)
            self._wview[used:used + take] = data[pos:pos + take]
            self._end += take
            pos += take
            if used + take == size:  # a full buffer: one large aligned write
                self._write_full_buffer()

    def _write_full_buffer(self) -> None:
        """Hand the full buffer to the I/O thread and go on in the other one."""
        self.drain()
        seq = self._seq
        assert seq is not None
        size = len(self._wview)
        fd = self._files.hold(seq, size)
        done = self._io_thread.submit(_write_all, fd, self._wview, self._buffer_offset)
        self._inflight = (done, seq, self._buffer_offset, self._wview)
        self._wview, self._spare_view = self._spare_view, self._wview
        self._buffer_offset += size
        self._written_end = self._end

    def scratch(self, nbytes: int) -> np.ndarray:
        """The first ``nbytes`` of the aligned read buffer, valid until the next I/O."""
        if nbytes <= self._rarray.shape[0]:
            return self._rarray[:nbytes]
        return np.frombuffer(self._scratch(nbytes), dtype=np.uint8)

    def _scratch(self, nbytes: int) -> memoryview:
        if nbytes <= len(self._rview):
            return self._rview
        return page_aligned_buffer(nbytes)  # a record from a larger config

"""The NVMe tier's segment files: the directory and its lock, the key, aligned I/O.

    <path>/LOCK                   flock'd by the one tier that has the directory open
    <path>/KEY                    the key of the record headers' MACs (`record.HeaderMac`)
    <path>/seg-0000000003.log     segment 3 (`SegmentFiles.path_of(3)`)

`SegmentFiles` owns the descriptors; the writer (`kvstore.tiers.nvme.writer`) appends
through it. Not thread-safe: the tier's lock guards it.

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
"""

from __future__ import annotations

import collections
import ctypes
import errno
import fcntl
import logging
import os
import re
from typing import Any

import numpy as np

from kvstore.durable_file import DamagedKeyError, key_file
from kvstore.errors import StorageError
from kvstore.tiers.nvme.record import IO_ALIGN, KEY_BYTES, SegmentKey

__all__ = ["SEGMENT_NAME", "SegmentFiles"]

log = logging.getLogger(__name__)


SEGMENT_NAME = re.compile(r"^seg-(\d+)\.log$")
_KEY_FILE = "KEY"
_PRIVATE_FILE = 0o600
_PRIVATE_DIR = 0o700
_MAX_OPEN_FILES = 64


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

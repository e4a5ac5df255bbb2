"""POSIX shared-memory objects: their names in /dev/shm, created or attached, mapped.

A created object is owner-only (mode 0600) and its pages are allocated in /dev/shm and
faulted in as it is made (`posix_fallocate`, by chunks: `kvstore.shm.fault_in`), so that
an object /dev/shm has no room for fails at once with a message, not with SIGBUS at some
later put; what a ``check_stop`` raises stops the allocation, and the object is removed.
Its creator holds a shared flock on it while the mapping lives, which the kernel drops
when the process dies: how a daemon in another pid namespace tells a dead owner's
leftovers (`daemon.segments`).
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os

from kvstore.buffers import PAGE_BYTES
from kvstore.errors import ConfigError
from kvstore.shm.fault_in import StopCheck, fault_in
from kvstore.units import format_bytes

SHM_DIR = "/dev/shm"
# madvise: fault in a range for writing without touching it (Linux 5.14; Python's mmap
# names it from 3.13). Faster than MAP_POPULATE, and it can be done chunk by chunk.
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)


def boot_id() -> str:
    """This host's running kernel: processes with the same boot id see the same
    /dev/shm (or fail cleanly to open a name, as in another container)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        import socket

        return socket.gethostname()


def shm_path(name: str) -> str:
    """Where the POSIX shared-memory object ``name`` lives (Linux)."""
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"bad shared-memory name {name!r}")
    return os.path.join(SHM_DIR, name)


def map_shared(name: str, nbytes: int, *, create: bool,
               check_stop: StopCheck | None = None) -> mmap.mmap:
    """Map POSIX shared memory ``name``: created (owner-only, allocated and faulted in,
    see the module docstring) or attached (faulted in)."""
    path = shm_path(name)
    if create:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        mapping = None
        try:
            # Held while the mapping lives (mmap keeps a dup of the descriptor, which shares
            # the lock) and dropped by the kernel when the process dies: how a daemon in
            # another pid namespace tells a dead owner's leftovers (daemon.segments).
            fcntl.flock(fd, fcntl.LOCK_SH)
            os.ftruncate(fd, nbytes)
            mapping = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED)
            fault_in(nbytes, _ShmFiller(fd, mapping, nbytes), check_stop=check_stop,
                     where=path)
            return mapping
        except BaseException:
            os.unlink(path)
            if mapping is not None:
                mapping.close()
            raise
        finally:
            os.close(fd)
    fd = os.open(path, os.O_RDWR)
    try:
        if os.fstat(fd).st_size < nbytes:
            raise ValueError(f"shared memory {name!r} holds {os.fstat(fd).st_size} bytes, "
                             f"not {nbytes}")
        populate = getattr(mmap, "MAP_POPULATE", 0)
        return mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED | populate)
    finally:
        os.close(fd)


def map_read_only(name: str) -> mmap.mmap:
    """Attach POSIX shared memory ``name`` whole, for reading only."""
    fd = os.open(shm_path(name), os.O_RDONLY)
    try:
        return mmap.mmap(fd, os.fstat(fd).st_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    finally:
        os.close(fd)


class _ShmFiller:
    """Allocates and faults in chunks of a new shared-memory object."""

    def __init__(self, fd: int, mapping: mmap.mmap, nbytes: int) -> None:
        self.fd, self.mapping, self.nbytes = fd, mapping, nbytes
        self.can_populate = True

    def __call__(self, offset: int, nbytes: int) -> None:
        try:
            os.posix_fallocate(self.fd, offset, nbytes)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            free = os.statvfs(SHM_DIR)
            raise ConfigError(
                f"{SHM_DIR} has no room for the DRAM pool of {format_bytes(self.nbytes)} "
                f"({format_bytes(free.f_bavail * free.f_frsize + offset)} were free): make "
                f"the pool smaller, or {SHM_DIR} larger") from None
        if self.can_populate:
            try:
                self.mapping.madvise(MADV_POPULATE_WRITE, offset, nbytes)
                return
            except OSError as e:
                if e.errno != errno.EINVAL:  # EINVAL: a kernel older than 5.14
                    raise
                self.can_populate = False
        # A write to each page faults it in.
        self.mapping[offset:offset + nbytes:PAGE_BYTES] = bytes(-(-nbytes // PAGE_BYTES))

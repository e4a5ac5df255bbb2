"""The DRAM tier: a host pool, pinned (page-locked) when CUDA is there so GPUs DMA to it.

A pool is faulted in when it is made, so that no put pays a page fault later; a shared
pool's pages are also allocated in /dev/shm then (`posix_fallocate`), so that a pool
/dev/shm has no room for fails at once with a message, not with SIGBUS at some later put.
This is done in chunks of `CHUNK_BYTES`: a large pool (`LARGE_POOL_BYTES` up) logs its
progress, and a ``check_stop`` callback runs before each chunk; what it raises stops the
allocation, and the pool is removed.
"""

from __future__ import annotations

import errno
import fcntl
import importlib.util
import logging
import mmap
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from kvstore.buffers import PAGE_BYTES, ByteView, page_aligned_buffer
from kvstore.errors import ConfigError
from kvstore.tiers.base import TierKind
from kvstore.tiers.memory import MemoryTier
from kvstore.units import format_bytes

log = logging.getLogger(__name__)

CHUNK_BYTES = 64 << 20  # ~20 ms of faulting in: how soon a check_stop is heard
LARGE_POOL_BYTES = 1 << 30  # from here the log follows the allocation
PROGRESS_EVERY_S = 5.0  # a progress line at least this often (and every 10%)
# madvise: fault in a range for writing without touching it (Linux 5.14; Python's mmap
# names it from 3.13). Faster than MAP_POPULATE, and it can be done chunk by chunk.
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)

StopCheck = Callable[[], None]


def _torch_if_cuda() -> Any:
    """torch if a CUDA device may be there, else None.

    torch is not imported on a machine with no NVIDIA driver: importing it costs seconds
    and adds some 175,000 objects that every full garbage collection then walks.
    """
    if "torch" in sys.modules:
        return sys.modules["torch"]
    has_driver = os.path.exists("/proc/driver/nvidia") or os.path.exists("/dev/nvidiactl")
    if not has_driver or importlib.util.find_spec("torch") is None:
        return None
    import torch

    return torch


SHM_DIR = "/dev/shm"


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


def fault_in(nbytes: int, fill: Callable[[int, int], None], *,
             check_stop: StopCheck | None = None, where: str = "private memory") -> None:
    """``fill(offset, n)`` over a new pool of ``nbytes`` by chunks; ``check_stop`` before
    each; progress logged for a large pool."""
    progress = _Progress(nbytes, where) if nbytes >= LARGE_POOL_BYTES else None
    for offset in range(0, nbytes, CHUNK_BYTES):
        if check_stop is not None:
            check_stop()
        fill(offset, min(CHUNK_BYTES, nbytes - offset))
        if progress is not None:
            progress.done(min(offset + CHUNK_BYTES, nbytes))


class _Progress:
    """Log lines for a large pool: at the start, every 10% or `PROGRESS_EVERY_S`, and at
    the end (bytes done and the rate: a slow one says the machine is short of memory)."""

    def __init__(self, nbytes: int, where: str) -> None:
        self.nbytes = nbytes
        self.started = self.logged_at = time.monotonic()
        self.logged_bytes = 0
        log.info("allocating the DRAM pool: %s in %s", format_bytes(nbytes), where)

    def done(self, done_bytes: int) -> None:
        now = time.monotonic()
        rate = f"{format_bytes(done_bytes / max(now - self.started, 1e-9))}/s"
        if done_bytes == self.nbytes:
            log.info("DRAM pool allocated: %s in %.1f s (%s)", format_bytes(self.nbytes),
                     now - self.started, rate)
        elif (done_bytes - self.logged_bytes >= self.nbytes / 10
              or now - self.logged_at >= PROGRESS_EVERY_S):
            log.info("allocating the DRAM pool: %s of %s (%d%%), %s",
                     format_bytes(done_bytes), format_bytes(self.nbytes),
                     100 * done_bytes // self.nbytes, rate)
            self.logged_at, self.logged_bytes = now, done_bytes


def register_with_cuda(array: np.ndarray) -> bool:
    """Page-lock host memory we allocated (cudaHostRegister) so GPUs DMA straight to it."""
    torch = _torch_if_cuda()
    if torch is None or not torch.cuda.is_available() or not array.nbytes:
        return False
    cudart = torch.cuda.cudart()
    # Portable (every context) and mapped: kernels read it in place through unified
    # virtual addressing, at the host pointer (engines' layer-wise KV loads do).
    portable_mapped = 1 | 2
    if int(cudart.cudaHostRegister(array.ctypes.data, array.nbytes, portable_mapped)) == 0:
        return True
    cudart.cudaGetLastError()  # clear it, or the next kernel launch check raises it
    return False


def unregister_with_cuda(array: np.ndarray) -> None:
    torch = _torch_if_cuda()
    if torch is not None:
        torch.cuda.cudart().cudaHostUnregister(array.ctypes.data)


class HostPool:
    """Host memory: page-locked (pinned) when CUDA is there, else an mmap.

    With ``shm_name`` the pool is POSIX shared memory (``/dev/shm/NAME``, mode 0600) that
    same-host clients of the daemon map; it is unlinked at close. ``check_stop`` runs
    between chunks of the allocation (see the module docstring).
    """

    def __init__(self, nbytes: int, shm_name: str | None = None, *,
                 check_stop: StopCheck | None = None) -> None:
        self.nbytes = nbytes
        self.is_pinned = False
        self.shm_name: str | None = None  # set once the object is ours to unlink
        self._tensor = None
        self._mmap: mmap.mmap | None = None
        self._registered = False
        self.directory: Any = None  # where each block lies, for one-sided client reads
        self._base_address: int | None = None
        self.array = np.empty(0, dtype=np.uint8)
        try:
            self._allocate(nbytes, shm_name, check_stop)
        except BaseException:
            self.close()
            raise

    def _allocate(self, nbytes: int, shm_name: str | None,
                  check_stop: StopCheck | None) -> None:
        torch = _torch_if_cuda()
        if shm_name is not None:
            self._mmap = map_shared(shm_name, max(nbytes, 1), create=True,
                                    check_stop=check_stop)
            self.shm_name = shm_name
            self.array = np.frombuffer(self._mmap, dtype=np.uint8)[:nbytes]
            self._registered = self.is_pinned = register_with_cuda(self.array)
            from kvstore.tiers.shm_directory import Directory, directory_name, rows_for

            if Directory.supported:
                self.directory = Directory(directory_name(shm_name), rows_for(nbytes),
                                           create=True)
        elif nbytes and torch is not None and torch.cuda.is_available():
            if check_stop is not None:
                check_stop()  # one call of the CUDA allocator: it cannot stop half-way
            self._tensor = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            self.array = self._tensor.numpy()
            self.is_pinned = True
        else:
            # Private memory on huge pages where offered, faulted in now.
            array = np.frombuffer(page_aligned_buffer(nbytes), dtype=np.uint8)
            fault_in(nbytes, lambda offset, n: array[offset:offset + n].fill(0),
                     check_stop=check_stop)
            self.array = array

    def view(self, offset: int, nbytes: int) -> ByteView:
        return self.array[offset:offset + nbytes]

    @property
    def base_address(self) -> int:
        """Where byte 0 of the pool is (a slot at ``offset`` lies at this + offset)."""
        if self._base_address is None:  # numpy's ctypes lookup costs ~2 us: once per pool
            self._base_address = int(self.array.ctypes.data)
        return self._base_address

    def close(self) -> None:
        if self.directory is not None:
            self.directory.close()
            self.directory = None
        if self._registered:
            unregister_with_cuda(self.array)
            self._registered = False
        self.array = np.empty(0, dtype=np.uint8)
        self._base_address = None
        self._tensor = None
        if self.shm_name is not None:
            try:
                os.unlink(shm_path(self.shm_name))
            except FileNotFoundError:
                pass
            self.shm_name = None
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:  # a caller still holds a view; the GC unmaps it later
                pass


def dram_tier(nbytes: int, max_value_bytes: int, shm_name: str | None = None, *,
              check_stop: StopCheck | None = None) -> MemoryTier:
    return MemoryTier(TierKind.DRAM, HostPool(nbytes, shm_name, check_stop=check_stop),
                      max_value_bytes)

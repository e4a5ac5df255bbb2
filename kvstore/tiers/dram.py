"""The DRAM tier: a host pool, pinned (page-locked) when CUDA is there so GPUs DMA to it."""

from __future__ import annotations

import importlib.util
import mmap
import os
import sys
from typing import Any

import numpy as np

from kvstore.buffers import ByteView, page_aligned_buffer
from kvstore.tiers.base import TierKind
from kvstore.tiers.memory import MemoryTier


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


def map_shared(name: str, nbytes: int, *, create: bool) -> mmap.mmap:
    """Map POSIX shared memory ``name``: created (owner-only, populated) or attached."""
    path = shm_path(name)
    flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
    fd = os.open(path, flags, 0o600)
    try:
        if create:
            os.ftruncate(fd, nbytes)
        elif os.fstat(fd).st_size < nbytes:
            raise ValueError(f"shared memory {name!r} holds {os.fstat(fd).st_size} bytes, "
                             f"not {nbytes}")
        populate = getattr(mmap, "MAP_POPULATE", 0)
        return mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED | populate)
    except BaseException:
        if create:
            os.unlink(path)
        raise
    finally:
        os.close(fd)


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
    same-host clients of the daemon map; it is unlinked at close.
    """

    def __init__(self, nbytes: int, shm_name: str | None = None) -> None:
        self.nbytes = nbytes
        self.is_pinned = False
        self.shm_name = shm_name
        self._tensor = None
        self._mmap: mmap.mmap | None = None
        self._registered = False
        self.directory: Any = None  # where each block lies, for one-sided client reads
        self._base_address: int | None = None
        torch = _torch_if_cuda()
        if shm_name is not None:
            self._mmap = map_shared(shm_name, max(nbytes, 1), create=True)
            self.array = np.frombuffer(self._mmap, dtype=np.uint8)[:nbytes]
            self._registered = self.is_pinned = register_with_cuda(self.array)
            from kvstore.tiers.shm_directory import Directory, directory_name, rows_for

            if Directory.supported:
                try:
                    self.directory = Directory(directory_name(shm_name), rows_for(nbytes),
                                               create=True)
                except BaseException:
                    os.unlink(shm_path(shm_name))
                    raise
        elif nbytes and torch is not None and torch.cuda.is_available():
            self._tensor = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            self.array = self._tensor.numpy()
            self.is_pinned = True
        else:
            # Private memory on huge pages where offered, faulted in now: the pool is really
            # preallocated, so no put pays a page fault later.
            self.array = np.frombuffer(page_aligned_buffer(nbytes), dtype=np.uint8)
            self.array.fill(0)

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


def dram_tier(nbytes: int, max_value_bytes: int, shm_name: str | None = None) -> MemoryTier:
    return MemoryTier(TierKind.DRAM, HostPool(nbytes, shm_name), max_value_bytes)

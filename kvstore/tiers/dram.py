"""The DRAM tier: a host pool, pinned (page-locked) when CUDA is there so GPUs DMA to it.

A pool is faulted in when it is made, so that no put pays a page fault later
(`kvstore.shm.fault_in`); a shared pool is POSIX shared memory that the daemon's same-host
clients map (`kvstore.shm.mapping`), with a directory of where each block lies
(`kvstore.shm.directory`). A ``check_stop`` callback runs between chunks of the
allocation; what it raises stops it, and the pool is removed.
"""

from __future__ import annotations

import mmap
import os

import numpy as np

from kvstore.buffers import ByteView, page_aligned_buffer
from kvstore.shm.directory import Directory, directory_name, rows_for
from kvstore.shm.fault_in import StopCheck, fault_in
from kvstore.shm.mapping import map_shared, shm_path
from kvstore.shm.page_lock import cuda_torch, register_with_cuda, unregister_with_cuda
from kvstore.tiers.base import TierKind
from kvstore.tiers.memory import MemoryTier


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
        self.directory: Directory | None = None  # where each block lies, for one-sided reads
        self._base_address: int | None = None
        self.array = np.empty(0, dtype=np.uint8)
        try:
            self._allocate(nbytes, shm_name, check_stop)
        except BaseException:
            self.close()
            raise

    def _allocate(self, nbytes: int, shm_name: str | None,
                  check_stop: StopCheck | None) -> None:
        if shm_name is not None:
            self._mmap = map_shared(shm_name, max(nbytes, 1), create=True,
                                    check_stop=check_stop)
            self.shm_name = shm_name
            self.array = np.frombuffer(self._mmap, dtype=np.uint8)[:nbytes]
            self._registered = self.is_pinned = register_with_cuda(self.array)
            if Directory.supported:
                self.directory = Directory(directory_name(shm_name), rows_for(nbytes),
                                           create=True)
        elif nbytes and (torch := cuda_torch()) is not None:
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

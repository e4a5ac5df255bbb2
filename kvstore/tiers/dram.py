"""The DRAM tier: a host pool, pinned (page-locked) when CUDA is there so GPUs DMA to it."""

from __future__ import annotations

import importlib.util
import mmap
import os
import sys
from typing import Any

import numpy as np

from kvstore.buffers import ByteView
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


class HostPool:
    """Host memory: page-locked (pinned) through torch when CUDA is there, else an mmap."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.is_pinned = False
        torch = _torch_if_cuda()
        if nbytes and torch is not None and torch.cuda.is_available():
            self._tensor = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            self.array = self._tensor.numpy()
            self.is_pinned = True
        else:
            # Anonymous mmap, page-aligned and populated now (MAP_POPULATE): the pool is
            # really preallocated, so no put pays a page fault later.
            flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
            self._mmap = mmap.mmap(-1, max(nbytes, 1), flags=flags)
            self.array = np.frombuffer(self._mmap, dtype=np.uint8)[:nbytes]

    def view(self, offset: int, nbytes: int) -> ByteView:
        return self.array[offset:offset + nbytes]

    def close(self) -> None:
        self.array = np.empty(0, dtype=np.uint8)
        self._tensor = None
        if getattr(self, "_mmap", None) is not None:
            try:
                self._mmap.close()
            except BufferError:  # a caller still holds a view; the GC unmaps it later
                pass


def dram_tier(nbytes: int, max_value_bytes: int) -> MemoryTier:
    return MemoryTier(TierKind.DRAM, HostPool(nbytes), max_value_bytes)

"""Page-locking host memory with CUDA (cudaHostRegister), so that GPUs DMA straight to it:
the DRAM tier's pool, and a same-host client's mapping of the daemon's pool."""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any

import numpy as np


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


def cuda_torch() -> Any:
    """torch if a CUDA device is usable here, else None (see `_torch_if_cuda`)."""
    torch = _torch_if_cuda()
    return torch if torch is not None and torch.cuda.is_available() else None


def register_with_cuda(array: np.ndarray) -> bool:
    """Page-lock host memory we allocated (cudaHostRegister) so GPUs DMA straight to it."""
    torch = cuda_torch()
    if torch is None or not array.nbytes:
        return False
    cudart = torch.cuda.cudart()
    # Portable (every context) and mapped: kernels read it in place through unified
    # virtual addressing, at the host pointer (engines' layer-wise KV loads do).
    portable_mapped = 1 | 2
    if int(cudart.cudaHostRegister(array.ctypes.data, array.nbytes, portable_mapped)) == 0:
        return True
    _clear_last_error(cudart)  # or the next kernel launch check raises it
    return False


def _clear_last_error(cudart: Any) -> None:
    """Reset CUDA's last error (a failed cudaHostRegister leaves one). torch's cudart
    binding has cudaGetLastError in some versions only (2.11 has not): else it is called in
    the libcudart the process has loaded."""
    clear = getattr(cudart, "cudaGetLastError", None)
    if clear is not None:
        clear()
        return
    import ctypes

    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if "libcudart.so" in line}
    if paths:
        ctypes.CDLL(min(paths)).cudaGetLastError()


def unregister_with_cuda(array: np.ndarray) -> None:
    torch = _torch_if_cuda()
    if torch is not None:
        torch.cuda.cudart().cudaHostUnregister(array.ctypes.data)

"""Turning user values and output buffers into byte views, without importing torch.

A value is bytes-like (bytes, bytearray, memoryview, anything with the buffer protocol),
a numpy array, or a torch tensor on any device. It is stored as its raw contiguous bytes,
so ``get`` of a tensor's key returns exactly ``tensor.cpu().numpy().tobytes()``.

Host data travels as a 1-D ``uint8`` numpy array; device data as a 1-D ``torch.uint8``
tensor. torch is only touched when the caller already imported it (it passed a tensor).
"""

from __future__ import annotations

import ctypes
import mmap
import sys
import warnings
from typing import Any

import numpy as np

from kvstore.errors import BufferSizeError, InvalidValueError

ByteView = Any  # np.ndarray (host, uint8, 1-D) or torch.Tensor (uint8, 1-D, any device)
PAGE_BYTES = 4096
HUGE_PAGE_BYTES = 2 << 20


def page_aligned_buffer(nbytes: int) -> memoryview:
    """``nbytes`` of page-aligned, private, anonymous memory, on transparent huge pages
    where the kernel offers them (from 2 MiB up): I/O on physically contiguous memory needs
    few DMA segments, and copies take fewer TLB misses. Private, because Python's default
    anonymous map is MAP_SHARED (shmem), where the huge page hint does nothing and O_DIRECT
    I/O ran at a quarter to a half of the speed of private memory on this project's VM."""
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    if nbytes < HUGE_PAGE_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return memoryview(mmap.mmap(-1, -(-max(nbytes, 1) // PAGE_BYTES) * PAGE_BYTES,
                                    flags=flags))[:nbytes]
    buf = mmap.mmap(-1, -(-nbytes // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES + HUGE_PAGE_BYTES,
                    flags=flags)
    skip = -ctypes.addressof(ctypes.c_char.from_buffer(buf)) % HUGE_PAGE_BYTES
    try:
        buf.madvise(mmap.MADV_HUGEPAGE, skip, len(buf) - skip)
    except OSError:
        pass  # no THP here: 4 KiB pages work
    return memoryview(buf)[skip:skip + nbytes]


def _torch() -> Any:
    return sys.modules.get("torch")


def is_tensor(obj: object) -> bool:
    torch = _torch()
    return torch is not None and isinstance(obj, torch.Tensor)


def _tensor_bytes(tensor: Any) -> Any:
    """A 1-D uint8 view of a tensor's contiguous bytes (a copy only if it was strided)."""
    flat = tensor.detach().contiguous().reshape(-1)
    return flat.view(_torch().uint8) if flat.numel() else flat.to(_torch().uint8)


def value_view(value: object) -> ByteView:
    """A read-only byte view of a value; host tensors become numpy views."""
    if isinstance(value, np.ndarray):  # first: the batch paths pass many small arrays
        if value.dtype == np.uint8 and value.ndim == 1 and value.flags.c_contiguous:
            return value
        if not value.flags.c_contiguous:
            value = np.ascontiguousarray(value)
        return value.reshape(-1).view(np.uint8)
    if is_tensor(value):
        flat = _tensor_bytes(value)
        return flat.numpy() if flat.device.type == "cpu" else flat
    try:
        view = memoryview(value)  # type: ignore[arg-type]
    except TypeError:
        raise InvalidValueError(
            "a value must be bytes-like, a numpy array or a torch tensor, "
            f"not {type(value).__name__}"
        ) from None
    if not view.contiguous:
        raise InvalidValueError("a buffer value must be contiguous")
    return np.frombuffer(view.cast("B") if view.ndim != 1 or view.format != "B" else view,
                         dtype=np.uint8)


_U8 = np.dtype(np.uint8)


def output_view(out: object, nbytes: int) -> ByteView:
    """A writable byte view of a caller's output buffer, which must hold exactly ``nbytes``."""
    if (type(out) is np.ndarray and out.dtype is _U8 and out.ndim == 1
            and out.flags.c_contiguous and out.flags.writeable):  # the common case, first
        view = out
    elif is_tensor(out):
        if not out.is_contiguous():
            raise BufferSizeError("get_into needs a contiguous output tensor")
        view = out.view(-1).view(_torch().uint8) if out.numel() else out.view(_torch().uint8)
        if view.device.type == "cpu":
            view = view.numpy()
    elif isinstance(out, np.ndarray):
        if not out.flags.c_contiguous or not out.flags.writeable:
            raise BufferSizeError("get_into needs a contiguous, writable numpy array")
        view = out.reshape(-1).view(np.uint8)
    else:
        try:
            mv = memoryview(out)  # type: ignore[arg-type]
        except TypeError:
            raise BufferSizeError(
                f"get_into needs a tensor or a writable buffer, not {type(out).__name__}"
            ) from None
        if mv.readonly or not mv.contiguous:
            raise BufferSizeError("get_into needs a writable, contiguous buffer")
        view = np.frombuffer(mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv,
                             dtype=np.uint8)
    if view.shape[0] != nbytes:
        raise BufferSizeError(
            f"output buffer holds {view.shape[0]} bytes but the value has {nbytes}")
    return view


def copy_bytes(dst: ByteView, src: ByteView, *, non_blocking: bool = False) -> None:
    """Copy ``src`` into ``dst`` (same length), across host and device as needed. With
    ``non_blocking``, a copy to or from a GPU may still be running on return (the caller
    synchronizes the stream before it reuses either buffer)."""
    dst_is_np = isinstance(dst, np.ndarray)
    src_is_np = isinstance(src, np.ndarray)
    if dst_is_np and src_is_np:
        np.copyto(dst, src)
        return
    torch = _torch()
    if dst_is_np:  # (asynchronous from CUDA only: `synchronize_devices` waits for those)
        torch.from_numpy(dst).copy_(src, non_blocking=non_blocking
                                    and src.device.type == "cuda")
    elif src_is_np:
        if src.flags.writeable:
            dst.copy_(torch.from_numpy(src), non_blocking=non_blocking)
        else:
            # torch warns on read-only arrays (values from bytes); it only reads this one.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                dst.copy_(torch.from_numpy(src), non_blocking=non_blocking)
    else:
        dst.copy_(src, non_blocking=non_blocking)


def synchronize_devices(views: list[ByteView]) -> None:
    """Wait for the copies queued on the current stream of each GPU that holds one of
    ``views`` (after ``copy_bytes(..., non_blocking=True)`` from them)."""
    torch = _torch()
    if torch is None:
        return
    devices = {v.device for v in views if not isinstance(v, np.ndarray)
               and v.device.type == "cuda"}
    for device in devices:
        torch.cuda.current_stream(device).synchronize()


def to_bytes(view: ByteView) -> bytes:
    if isinstance(view, np.ndarray):
        return view.tobytes()
    return view.cpu().numpy().tobytes()

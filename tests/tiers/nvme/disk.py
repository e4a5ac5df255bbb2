"""The NVMe tier's directory as the tests see it, build it and damage it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kvstore.tiers.nvme import NvmeTier, NvmeTierConfig
from kvstore.tiers.nvme.record import IO_ALIGN, SegmentKey

KiB = 1024
MiB = 1024 * KiB


def config(path: Path, **changes: object) -> NvmeTierConfig:
    fields: dict[str, object] = dict(path=str(path), capacity_bytes=16 * MiB,
                                     max_value_bytes=1 * MiB, segment_bytes=2 * MiB,
                                     write_buffer_bytes=64 * KiB)
    fields.update(changes)
    return NvmeTierConfig(**fields)  # type: ignore[arg-type]


def segment_files(path: Path) -> list[Path]:
    return sorted(path.glob("seg-*.log"))


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in segment_files(path))


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def find(path: Path, needle: bytes) -> int:
    offset = path.read_bytes().find(needle)
    assert offset >= 0, "value not found on disk"
    return offset


def aligned_array(nbytes: int, skew: int = 0) -> np.ndarray:
    """A uint8 array of ``nbytes`` starting ``skew`` bytes past a 4 KiB boundary."""
    base = np.zeros(nbytes + 2 * IO_ALIGN, dtype=np.uint8)
    start = -base.ctypes.data % IO_ALIGN + skew
    return base[start:start + nbytes]


def directory_key(path: Path) -> SegmentKey:
    """The key of a fresh NVMe directory, as its first open makes it."""
    NvmeTier(config(path)).close()
    for segment in segment_files(path):
        segment.unlink()
    return SegmentKey((path / "KEY").read_bytes())

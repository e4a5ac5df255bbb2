"""The NVMe tier's configuration, and the sizes the tier derives from it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from kvstore.errors import ConfigError
from kvstore.tiers.nvme.compression import Compression
from kvstore.tiers.nvme.record import IO_ALIGN, align_down, align_up, record_disk_bound

__all__ = ["Compression", "NvmeLayout", "NvmeTierConfig", "lz4_block"]


MiB = 1024 * 1024


def lz4_block() -> Any:
    """The lz4.block module; `ConfigError` if lz4 is not installed."""
    try:
        import lz4.block
    except ImportError as e:
        raise ConfigError("NVMe compression LZ4 needs the lz4 package "
                          "(pip install 'kvstore[lz4]')") from e
    return lz4.block


@dataclass(frozen=True)
class NvmeTierConfig:
    """Where and how big the NVMe tier is.

    ``capacity_bytes`` bounds the segment files on disk; the tier offers less than that to
    live records (see `NvmeTier.capacity_bytes`). Sizes that O_DIRECT needs aligned are
    rounded to 4 KiB: ``segment_bytes`` down, ``write_buffer_bytes`` up.
    """

    path: str
    capacity_bytes: int
    max_value_bytes: int = 16 * MiB
    segment_bytes: int = 64 * MiB
    write_buffer_bytes: int = 4 * MiB
    compression: Compression = Compression.NONE
    direct_io: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.path, os.PathLike):
            object.__setattr__(self, "path", os.fspath(self.path))
        if not isinstance(self.path, str) or not self.path:
            raise ConfigError(f"NvmeTierConfig.path must be a directory path, got {self.path!r}")
        for name in ("capacity_bytes", "max_value_bytes", "segment_bytes", "write_buffer_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"NvmeTierConfig.{name} must be a positive int, got {value!r}")
        if not isinstance(self.compression, Compression):
            try:
                object.__setattr__(self, "compression", Compression(self.compression))
            except ValueError:
                raise ConfigError("NvmeTierConfig.compression must be a Compression, "
                                  f"got {self.compression!r}") from None
        if self.compression is Compression.LZ4:
            lz4_block()
        if not isinstance(self.direct_io, bool):
            raise ConfigError(f"NvmeTierConfig.direct_io must be a bool, got {self.direct_io!r}")
        NvmeLayout.of(self)


@dataclass(frozen=True)
class NvmeLayout:
    """Sizes derived from a config: what the tier computes once and lives by."""

    segment_bytes: int
    write_buffer_bytes: int
    max_footprint: int
    write_limit: int      # disk bytes plain writes may reach
    capacity_bytes: int   # logical capacity offered to live records
    disk_capacity_bytes: int  # what the segment files may reach: the config's, or less

    @classmethod
    def of(cls, config: NvmeTierConfig, room_bytes: int | None = None) -> NvmeLayout:
        """The layout of ``config``; with ``room_bytes`` (what the filesystem can hold for
        the tier: its segments plus the free space), within that, segments made smaller if
        four of the configured size would not fit."""
        capacity = config.capacity_bytes
        segment_bytes = align_down(config.segment_bytes)
        max_footprint = record_disk_bound(config.max_value_bytes)
        if room_bytes is not None and room_bytes < capacity:
            capacity = align_down(room_bytes)
            segment_bytes = max(align_up(max_footprint), min(segment_bytes,
                                                             align_down(capacity // 4)))
        if max_footprint > segment_bytes:
            raise ConfigError(
                f"NvmeTierConfig.segment_bytes ({config.segment_bytes}) must hold one record of "
                f"max_value_bytes: use at least {align_up(max_footprint)}")
        num_slots = capacity // segment_bytes
        if num_slots < 4:
            raise ConfigError(
                f"NvmeTierConfig.capacity_bytes ({capacity}) must hold at least 4 "
                f"segments of {segment_bytes} bytes: grow it or lower segment_bytes")
        # One segment of headroom for compaction copies (+ the alignment of two files) ...
        write_limit = capacity - segment_bytes - 2 * IO_ALIGN
        # ... and one more kept from live data so that a full disk is at least a segment dead.
        # Each file's last block may be part empty: never count on that slack as room.
        slack_bytes = 2 * IO_ALIGN * (num_slots + 4)
        capacity_bytes = write_limit - IO_ALIGN - max(segment_bytes, slack_bytes)
        if capacity_bytes < max_footprint:
            raise ConfigError(
                f"NvmeTierConfig.capacity_bytes ({capacity}) leaves no room for a "
                f"value of max_value_bytes after the compaction reserve: grow it")
        return cls(segment_bytes, align_up(config.write_buffer_bytes), max_footprint,
                   write_limit, capacity_bytes, capacity)

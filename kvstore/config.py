"""`StoreConfig`: every knob of an embedded Store, validated once, frozen."""

from __future__ import annotations

import dataclasses
import enum
import os
from dataclasses import dataclass, field

from kvstore.errors import ConfigError
from kvstore.placement.rules import Admission, EvictionPolicy
from kvstore.tiers.nvme.compression import Compression
from kvstore.tiers.slab import pool_holds
from kvstore.units import parse_size

MiB = 1024 * 1024
GiB = 1024 * MiB
MAX_VALUE_BYTES = 16 * MiB  # the largest value where no tier is small


def derived_max_value_bytes(*, dram_bytes: int, hbm_bytes: int, nvme_bytes: int) -> int:
    """``max_value_bytes`` when it is not given: 16 MiB, or the largest power of two that
    is at most a quarter of the smallest memory pool (DRAM, HBM) and an eighth of the
    NVMe tier (four segments that each hold a largest record, and room to compact).

    ``dram_bytes="1MiB"`` gives 256 KiB; ``"8MiB"`` 2 MiB; 64 MiB and more, 16 MiB.
    """
    limit = min([MAX_VALUE_BYTES, *(n // 4 for n in (dram_bytes, hbm_bytes) if n),
                 *([nvme_bytes // 8] if nvme_bytes else [])])
    return 1 << max(limit, 1).bit_length() - 1


def _enum(enum_type: type[enum.Enum], value: object, what: str) -> enum.Enum:
    if isinstance(value, enum_type):
        return value
    try:
        return enum_type(value)
    except ValueError:
        choices = ", ".join(repr(m.value) for m in enum_type)
        raise ConfigError(f"{what} must be one of {choices}, got {value!r}") from None


@dataclass(frozen=True)
class StoreConfig:
    """Sizes accept ints (bytes) or strings like ``"8GiB"``; tiers with 0 bytes are absent.

    - ``hbm_bytes``: GPU pool on ``device`` (needs CUDA).
    - ``dram_bytes``: host pool (pinned when CUDA is there).
    - ``nvme_path``/``nvme_bytes``: log-structured segments in that directory.
    - ``write_tier``: where new blocks land (``"hbm"``, ``"dram"``, ``"nvme"``); the fastest
      present tier by default.
    - ``promote_on_hit``: copy a block hit in a slower tier up to the write tier.
    - ``lease_s``: how long a pin protects a block from a vanished holder.
    - ``dram_shm_name``: put the DRAM pool in POSIX shared memory of that name (the
      daemon does, so same-host clients copy straight into it); private memory if None.
    - ``max_value_bytes``: the largest value; None derives it from the tiers' sizes
      (`derived_max_value_bytes`: 16 MiB unless a tier is small), and ``replace`` derives
      it again for the new sizes. ``max_value_is_derived`` tells which it was.
    """

    dram_bytes: int | str = GiB
    nvme_path: str | os.PathLike[str] | None = None
    nvme_bytes: int | str = 0
    hbm_bytes: int | str = 0
    max_value_bytes: int | str | None = None
    device: str = "cuda"
    write_tier: str | None = None
    promote_on_hit: bool = True
    eviction_policy: EvictionPolicy | str = EvictionPolicy.LEAF_LRU
    nvme_admission: Admission | str = Admission.ALWAYS
    nvme_compression: Compression | str = Compression.NONE
    nvme_segment_bytes: int | str = 64 * MiB
    nvme_direct_io: bool = True
    lease_s: float = 30.0
    dram_shm_name: str | None = None
    max_value_is_derived: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        for name in ("dram_bytes", "nvme_bytes", "hbm_bytes", "nvme_segment_bytes"):
            set_(self, name, parse_size(getattr(self, name), what=f"StoreConfig.{name}"))
        set_(self, "max_value_is_derived", self.max_value_bytes is None)
        set_(self, "max_value_bytes", derived_max_value_bytes(
            dram_bytes=self.dram_bytes, hbm_bytes=self.hbm_bytes, nvme_bytes=self.nvme_bytes)
             if self.max_value_bytes is None
             else parse_size(self.max_value_bytes, what="StoreConfig.max_value_bytes"))
        set_(self, "eviction_policy",
             _enum(EvictionPolicy, self.eviction_policy, "StoreConfig.eviction_policy"))
        set_(self, "nvme_admission",
             _enum(Admission, self.nvme_admission, "StoreConfig.nvme_admission"))
        set_(self, "nvme_compression",
             _enum(Compression, self.nvme_compression, "StoreConfig.nvme_compression"))
        if self.nvme_path is not None:
            set_(self, "nvme_path", os.fspath(self.nvme_path))
        if self.max_value_bytes <= 0:
            raise ConfigError("StoreConfig.max_value_bytes must be positive")
        if (self.nvme_path is None) != (self.nvme_bytes == 0):
            raise ConfigError("StoreConfig: set nvme_path and nvme_bytes together "
                              "(both or neither)")
        if not self.tier_names:
            raise ConfigError("StoreConfig: no tier has any bytes; set dram_bytes, "
                              "nvme_bytes or hbm_bytes")
        for name, nbytes in (("dram_bytes", self.dram_bytes), ("hbm_bytes", self.hbm_bytes)):
            if nbytes and not pool_holds(nbytes, self.max_value_bytes):
                raise ConfigError(f"StoreConfig.{name} ({nbytes}) must be 0 or hold a value "
                                  f"of StoreConfig.max_value_bytes ({self.max_value_bytes}) "
                                  "in its slabs: lower that (or leave it out to derive it "
                                  "from the tiers) or grow the tier")
        if self.write_tier is not None and self.write_tier not in self.tier_names:
            raise ConfigError(f"StoreConfig.write_tier {self.write_tier!r} is not a present "
                              f"tier ({', '.join(self.tier_names)})")
        if self.dram_shm_name is not None and (
                not self.dram_shm_name or "/" in self.dram_shm_name
                or self.dram_shm_name.startswith(".") or len(self.dram_shm_name) > 200):
            raise ConfigError("StoreConfig.dram_shm_name must be a short name with no '/'")
        if not self.lease_s > 0:
            raise ConfigError("StoreConfig.lease_s must be positive")

    @property
    def tier_names(self) -> list[str]:
        """Present tiers, fastest first."""
        sizes = (("hbm", self.hbm_bytes), ("dram", self.dram_bytes), ("nvme", self.nvme_bytes))
        return [name for name, nbytes in sizes if nbytes]

    def replace(self, **changes: object) -> StoreConfig:
        """A copy with ``changes``; a derived ``max_value_bytes`` is derived again."""
        if self.max_value_is_derived:
            changes.setdefault("max_value_bytes", None)
        return dataclasses.replace(self, **changes)

"""How the NVMe tier may compress its records (a name the configuration imports without
loading the tier)."""

from __future__ import annotations

import enum


class Compression(enum.Enum):
    """Record compression in the NVMe tier."""

    NONE = "none"
    LZ4 = "lz4"

"""The NVMe tier: values in checksummed records, appended to segment files.

    tier.py     `NvmeTier`, the Tier contract: checks, compression, checksums, one lock
    log.py      the index of records, appends, compaction, replay at open
    files.py    the directory, its lock, O_DIRECT I/O, the write buffer
    record.py   the record format and the segment scanner

Each module imports only those below it. The tier's public names are here.
"""

from __future__ import annotations

from kvstore.tiers.nvme.tier import Compression, NvmeTier, NvmeTierConfig, RecoveredRecord

__all__ = ["Compression", "NvmeTier", "NvmeTierConfig", "RecoveredRecord"]

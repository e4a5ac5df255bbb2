"""The NVMe tier: values in checksummed records, appended to segment files.

    tier.py           `NvmeTier`, the Tier contract: checks, compression, checksums, one lock
    config.py         `NvmeTierConfig`, `Compression`, and the sizes derived from a config
    log.py            appends, deletes, compaction, replay at open
    record_index.py   which record of each key is live, stale or pinned; what each segment
                      holds
    writer.py         the active segment's aligned write buffer, reads back from disk or it
    files.py          the directory, its lock and key, O_DIRECT I/O, fsync
    record.py         the record format and the segment scanner

Each module imports only those below it in this list. The tier's public names are here.
"""

from __future__ import annotations

from kvstore.tiers.nvme.config import Compression, NvmeTierConfig
from kvstore.tiers.nvme.tier import NvmeTier, RecoveredRecord

__all__ = ["Compression", "NvmeTier", "NvmeTierConfig", "RecoveredRecord"]

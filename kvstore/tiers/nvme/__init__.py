"""The NVMe tier: values in checksummed records, appended to segment files.

    tier.py           `NvmeTier`, the Tier contract: checks, compression, checksums, one lock
    compression.py    `Compression`, the names of record compressions
    config.py         `NvmeTierConfig` and the sizes derived from a config
    log.py            appends, deletes, compaction, replay at open
    record_index.py   which record of each key is live, stale or pinned; what each segment
                      holds
    writer.py         the active segment's aligned write buffer, reads back from disk or it
    files.py          the directory, its lock and key, O_DIRECT I/O, fsync
    record.py         the record format and the segment scanner

Each module imports only those below it in this list (compression.py: none). The tier's
public names are here, loaded when first asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvstore.tiers.nvme.compression import Compression

if TYPE_CHECKING:
    from kvstore.tiers.nvme.config import NvmeTierConfig
    from kvstore.tiers.nvme.tier import NvmeTier, RecoveredRecord

__all__ = ["Compression", "NvmeTier", "NvmeTierConfig", "RecoveredRecord"]

# The tier loads when first asked for: the configuration names Compression from here.
_LAZY = {"NvmeTierConfig": "kvstore.tiers.nvme.config", "NvmeTier": "kvstore.tiers.nvme.tier",
         "RecoveredRecord": "kvstore.tiers.nvme.tier"}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kvstore.tiers.nvme' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


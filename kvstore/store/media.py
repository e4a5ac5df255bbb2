"""The Store's tiers, opened from a `StoreConfig`, as the placement core's *media*.

The core (`kvstore.placement`) decides where blocks go; `TierMedia` does what it asks
with bytes: reserve a slot, copy a value in and commit it, hand out a copy's bytes to
demote, drop a copy, retire a slot that readers still copy from, free a window of a
pool. A memory tier (HBM, DRAM) has slots; the NVMe tier takes a value whole
(``reserve`` only says whether there is room).

Retired slots: a memory slot dropped while readers copy from it (their pins live) is
not freed: it keeps the old value whole until the last of those readers unpins
(`release_retired`), so a reader racing an overwrite or a delete gets the old value,
never a torn one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from kvstore.buffers import ByteView, copy_bytes
from kvstore.config import StoreConfig
from kvstore.errors import ConfigError, StorageError
from kvstore.placement import DROP_DELETED, DROP_EVICTED
from kvstore.tiers.base import TierKind
from kvstore.tiers.memory import MemoryTier

log = logging.getLogger("kvstore.store")


def _segment_bytes(config: StoreConfig) -> int:
    """The configured segment size, shrunk for small tiers (4+ segments) but never below
    one record of ``max_value_bytes``; too small a tier then gets NvmeTierConfig's error."""
    from kvstore.tiers.nvme.record import IO_ALIGN, align_up, record_disk_bound

    smallest = align_up(record_disk_bound(config.max_value_bytes), IO_ALIGN)
    return max(smallest, min(config.nvme_segment_bytes, config.nvme_bytes // 4))


def open_tiers(config: StoreConfig, check_stop: Callable[[], None] | None
               ) -> tuple[list[TierKind], list[Any]]:
    """The configured tiers, fastest first; any opened are closed if one fails."""
    kinds: list[TierKind] = []
    tiers: list[Any] = []
    try:
        if config.hbm_bytes:
            import torch

            if not torch.cuda.is_available():
                raise ConfigError("hbm_bytes > 0 needs a CUDA device; set hbm_bytes=0 on a "
                                  "machine without one")
            from kvstore.tiers.hbm import hbm_tier

            kinds.append(TierKind.HBM)
            tiers.append(hbm_tier(config.hbm_bytes, config.max_value_bytes, config.device))
        if config.dram_bytes:
            from kvstore.tiers.dram import dram_tier

            kinds.append(TierKind.DRAM)
            tiers.append(dram_tier(config.dram_bytes, config.max_value_bytes,
                                   config.dram_shm_name, check_stop=check_stop))
        if config.nvme_bytes:
            from kvstore.tiers.nvme import NvmeTier, NvmeTierConfig

            try:
                nvme_config = NvmeTierConfig(
                    path=str(config.nvme_path), capacity_bytes=config.nvme_bytes,
                    max_value_bytes=config.max_value_bytes,
                    segment_bytes=_segment_bytes(config),
                    compression=config.nvme_compression, direct_io=config.nvme_direct_io)
                tier = NvmeTier(nvme_config)
            except ConfigError as e:
                raise ConfigError(f"StoreConfig.nvme_bytes/max_value_bytes/"
                                  f"nvme_segment_bytes: {e}") from e
            kinds.append(TierKind.NVME)
            tiers.append(tier)
    except BaseException:
        for tier in tiers:
            tier.close()
        raise
    return kinds, tiers


class TierMedia:
    """The media protocol of `kvstore.placement` over the Store's tiers."""

    def __init__(self, kinds: list[TierKind], tiers: list[Any]) -> None:
        self.kinds = kinds
        self.tiers = tiers
        self.is_memory = [isinstance(tier, MemoryTier) for tier in tiers]
        self.nvme_tier = len(tiers) - 1 if kinds[-1] is TierKind.NVME else None
        self.nvme = tiers[-1] if self.nvme_tier is not None else None
        self.closed = False
        # Slots dropped while readers copied from them: pin id -> [(tier, offset)] (every
        # copy the block had: a reader copies from the one that was fastest when it
        # pinned), and (tier, offset) -> readers left. Freed when the last reader unpins.
        self._retired: dict[int, list[tuple[int, int]]] = {}
        self._retired_readers: dict[tuple[int, int], int] = {}
        # Gets (key, value bytes) of each block whose last copy an eviction drops (set by
        # `Store.spill_to`); called with the store lock held: it must only queue them.
        self.on_spill: Callable[[bytes, bytes], None] | None = None

    def tier_of_kind(self, kind: TierKind) -> int | None:
        return self.kinds.index(kind) if kind in self.kinds else None

    # -- the media protocol -------------------------------------------------------------------

    def reserve(self, t: int, nbytes: int) -> int | None:
        tier = self.tiers[t]
        if self.is_memory[t]:
            return tier.reserve(nbytes)
        return 0 if tier.used_bytes + tier.footprint_bytes(nbytes) <= tier.capacity_bytes else None

    def fits(self, t: int, nbytes: int) -> bool:
        if self.is_memory[t]:
            return True
        tier = self.tiers[t]  # read only: a failed disk (logged) takes nothing new
        return tier.footprint_bytes(nbytes) <= tier.capacity_bytes and not tier.is_read_only

    def write(self, t: int, slot: int, key: bytes, parent: bytes | None, nbytes: int,
              src: ByteView) -> bool:
        tier = self.tiers[t]
        if self.is_memory[t]:
            try:
                copy_bytes(tier.view(slot, nbytes), src)
            except BaseException:
                tier.release(slot)
                raise
            tier.commit(key, slot, nbytes, parent)
            return True
        host = src if isinstance(src, np.ndarray) else src.cpu().numpy()
        try:
            return tier.put(key, host, parent)
        except OSError as e:
            raise StorageError(f"NVMe write failed: {e}") from e

    def source(self, t: int, key: bytes) -> ByteView:
        tier = self.tiers[t]
        return tier.view(*tier.slot_of(key))

    def drop(self, t: int, key: bytes, how: int) -> None:
        tier = self.tiers[t]
        if how == DROP_EVICTED and t == self.nvme_tier:
            # Durably: an evicted record still on disk must not come back at reopen, where
            # it would count against capacity and push out blocks that were live.
            try:
                tier.delete(key)
            except StorageError as e:  # no room for its tombstone: forgotten, not deleted
                log.warning("eviction: could not delete an NVMe record durably: %s", e)
                tier.evict(key)
        elif how == DROP_DELETED:
            tier.delete(key)
        else:
            tier.evict(key)

    def spill(self, t: int, key: bytes) -> None:
        """Hand ``on_spill`` a copy of the block an eviction is about to drop from ``t``,
        its last tier; a copy that cannot be read (a failed disk) is not handed on."""
        if self.on_spill is None:
            return
        tier = self.tiers[t]
        try:
            if self.is_memory[t]:
                view = tier.view(*tier.slot_of(key))
                value = (view.tobytes() if isinstance(view, np.ndarray)
                         else view.cpu().numpy().tobytes())
            else:
                value = tier.get(key)
        except (StorageError, OSError) as e:
            log.warning("eviction: could not read a block to hand to a peer: %s", e)
            return
        if value is not None:
            self.on_spill(key, value)

    def retire(self, t: int, key: bytes, pins: list[int]) -> bool:
        if not self.is_memory[t]:
            return False
        offset = self.tiers[t].detach(key)
        self._retired_readers[(t, offset)] = len(pins)
        for pin in pins:
            self._retired.setdefault(pin, []).append((t, offset))
        return True

    def reclaim(self, t: int, nbytes: int, can_free: Callable[[bytes], bool]
                ) -> list[bytes] | None:
        if not self.is_memory[t]:
            return None
        tier = self.tiers[t]
        owners = tier.owners()

        def slot_can_free(offset: int) -> bool:
            key = owners.get(offset)  # None: reserved, or retired while readers copy
            return key is not None and can_free(key)

        offsets = tier.allocator.reclaim_window(nbytes, slot_can_free)
        return [owners[o] for o in offsets] if offsets else None

    # -- retired slots ------------------------------------------------------------------------

    def release_retired(self, pin: int) -> bool:
        """If ``pin`` reads retired slots: one reader fewer on each (a slot is freed after
        its last), and True: the copy under it is whole. False if it reads none."""
        slots = self._retired.pop(pin, None)
        if slots is None:
            return False
        for slot in slots:
            readers = self._retired_readers[slot] - 1
            if readers:
                self._retired_readers[slot] = readers
            else:
                del self._retired_readers[slot]
                if not self.closed:
                    self.tiers[slot[0]].release(slot[1])
        return True

    def pins_old_record(self, key: bytes) -> bool:
        """Whether a new value of ``key`` (or its delete) cannot be acknowledged: the NVMe
        tier is read only and holds a record of it that a reopen would bring back (a crash
        may bring back the new value or none, never the old one)."""
        nvme = self.nvme
        if nvme is None or not nvme.pins_old_records_of(key):
            return False
        log.warning("refused to replace or delete a key whose old record the read-only NVMe "
                    "tier holds (a restart would bring it back)")
        return True

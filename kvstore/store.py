"""The embedded multi-tier Store: the library API of DESIGN.md.

    put ──> write tier (fastest present) ──evict──> next tier (demote) ──evict──> dropped
    get <── fastest tier holding the key  ──hit in a slower tier──> promoted to the write tier

Concurrency: one lock guards the index, the policies and the tiers' bookkeeping. Bulk
copies run outside it: a put reserves a slot (owned by no key, so never evicted), copies,
then commits; a get pins the block, copies, then unpins. A pin that was revoked meanwhile
(the block was deleted or overwritten) or whose lease ran out turns the read into a miss,
so a torn copy is never returned as a hit. NVMe I/O runs under the NVMe tier's own lock.

Invariants: every present tier keeps ``used_bytes <= capacity_bytes``; a key is in the
index exactly when at least one tier holds a committed copy; victims are never pinned.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from kvstore.buffers import ByteView, copy_bytes, value_view
from kvstore.config import StoreConfig
from kvstore.errors import ConfigError, InvalidValueError, StorageError, StoreClosedError
from kvstore.index import BlockEntry, BlockIndex
from kvstore.policy import admits, make_policy
from kvstore.store_host import StoreHostPlane
from kvstore.store_quotas import StoreQuotas
from kvstore.store_reads import StoreReads
from kvstore.tiers.base import TierKind, check_key
from kvstore.tiers.memory import MemoryTier
from kvstore.tiers.slab import size_class

log = logging.getLogger(__name__)

# Values up to this size are copied under the store lock (a pin round trip costs more).
SMALL_VALUE_BYTES = 64 * 1024


def _segment_bytes(config: StoreConfig) -> int:
    """The configured segment size, shrunk for small tiers (4+ segments) but never below
    one record of ``max_value_bytes``; too small a tier then gets NvmeTierConfig's error."""
    from kvstore.tiers.nvme.record import IO_ALIGN, align_up, record_disk_bound

    smallest = align_up(record_disk_bound(config.max_value_bytes), IO_ALIGN)
    return max(smallest, min(config.nvme_segment_bytes, config.nvme_bytes // 4))


class Store(StoreReads, StoreHostPlane, StoreQuotas):
    """A KV store over HBM, DRAM and NVMe tiers; see the module docstring."""

    def __init__(self, config: StoreConfig | None = None, *,
                 check_stop: Callable[[], None] | None = None) -> None:
        """``check_stop`` runs between chunks of the DRAM pool's allocation; what it raises
        stops the construction, with every tier made so far closed."""
        self.config = config = config if config is not None else StoreConfig()
        self._lock = threading.RLock()
        self._closed = False
        self._tiers: list[Any] = []
        self._kinds: list[TierKind] = []
        try:
            self._open_tiers(config, check_stop)
        except BaseException:
            for tier in self._tiers:
                tier.close()
            raise
        self._nvme = self._tiers[-1] if self._kinds[-1] is TierKind.NVME else None
        self._nvme_tier = len(self._tiers) - 1 if self._nvme is not None else None
        self._write_tier = (self._kinds.index(TierKind(config.write_tier))
                            if config.write_tier else 0)
        self._dram_tier = (self._kinds.index(TierKind.DRAM) if TierKind.DRAM in self._kinds
                           else None)
        write_tier = self._tiers[self._write_tier]
        # The write tier when it is host memory: put_many copies small values straight in.
        self._host_write_tier = (write_tier if self._kinds[self._write_tier] is TierKind.DRAM
                                 else None)
        self.index = BlockIndex(len(self._tiers))
        self.index.attach([
            make_policy(config.eviction_policy, self.index, t,
                        size_class if isinstance(tier, MemoryTier) else None)
            for t, tier in enumerate(self._tiers)])
        self._queries = self._hits = 0
        self._tier_hits = [0] * len(self._tiers)
        self._evictions = self._demotions = self._promotions = 0
        self._torn_reads = 0
        self._quotas: dict[tuple[int, int], int] = {}  # (owner, tier) -> bytes (StoreQuotas)
        self._held: dict[tuple[int, int], tuple[int, int]] = {}  # reserved for an owner
        self._held_bytes: dict[tuple[int, int], int] = {}
        # Slots dropped while readers copied from them: pin id -> (tier, offset), and
        # (tier, offset) -> readers left. Freed when the last reader unpins.
        self._retired: dict[int, tuple[int, int]] = {}
        self._retired_readers: dict[tuple[int, int], int] = {}
        if self._nvme is not None:
            self._recover()

    def _open_tiers(self, config: StoreConfig, check_stop: Callable[[], None] | None) -> None:
        if config.hbm_bytes:
            import torch

            if not torch.cuda.is_available():
                raise ConfigError("hbm_bytes > 0 needs a CUDA device; set hbm_bytes=0 on a "
                                  "machine without one")
            from kvstore.tiers.hbm import hbm_tier

            self._add(TierKind.HBM, hbm_tier(config.hbm_bytes, config.max_value_bytes,
                                              config.device))
        if config.dram_bytes:
            from kvstore.tiers.dram import dram_tier

            self._add(TierKind.DRAM, dram_tier(config.dram_bytes, config.max_value_bytes,
                                                config.dram_shm_name, check_stop=check_stop))
        if config.nvme_bytes:
            from kvstore.tiers.nvme import NvmeTier, NvmeTierConfig

            try:
                nvme_config = NvmeTierConfig(
                    path=str(config.nvme_path), capacity_bytes=config.nvme_bytes,
                    max_value_bytes=config.max_value_bytes,
                    segment_bytes=_segment_bytes(config),
                    compression=config.nvme_compression, direct_io=config.nvme_direct_io)
                self._add(TierKind.NVME, NvmeTier(nvme_config))
            except ConfigError as e:
                raise ConfigError(f"StoreConfig.nvme_bytes/max_value_bytes/nvme_segment_bytes: "
                                  f"{e}") from e

    def _add(self, kind: TierKind, tier: Any) -> None:
        self._kinds.append(kind)
        self._tiers.append(tier)

    def _recover(self) -> None:
        """Index what the NVMe tier found on disk, oldest first so LRU order survives."""
        nvme, t = self._nvme, self._nvme_tier
        records = nvme.recovered()
        for record in records:
            entry = self.index.ensure(record.key, record.parent, record.nbytes)
            self.index.add(entry, t)
            self.index.touch(entry)
            entry.num_uses = 0
        if records:
            log.info("recovered %d blocks from %s", len(records), self.config.nvme_path)

    # -- the public API -----------------------------------------------------------------------

    def put(self, key: bytes, value: Any, *, owner: int = 0) -> bool:
        """Store ``value`` under ``key`` (replacing any earlier value). False if no room.
        ``owner`` (a tenant's number; 0: nobody) is charged for it (`set_quota`)."""
        key = check_key(key)
        src = self._source(value)
        return self._put(key, src, None, None, owner)

    def put_many(self, keys: Sequence[bytes], values: Sequence[Any], *,
                 owner: int = 0) -> int:
        """Store the blocks of one chain, parent first; returns how many leading blocks
        were stored (it stops at the first block that finds no room).

        Each key is recorded as the child of the one before it (prefix-aware eviction).
        Every key and value is checked before anything is stored. ``owner`` as in `put`.
        """
        if len(keys) != len(values):
            raise InvalidValueError(f"put_many got {len(keys)} keys but {len(values)} values")
        checked = [check_key(k) for k in keys]
        sources = [self._source(v) for v in values]
        parent, i = None, 0
        chain: set[bytes] = set()
        nvme = self._nvme
        if nvme is not None and nvme.is_read_only:  # (rare: the NVMe disk failed)
            for i, key in enumerate(checked):
                if self._is_pinned_on_disk(key):
                    checked, sources = checked[:i], sources[:i]  # stored up to there
                    break
            i = 0
        while i < len(checked):
            if sources[i].shape[0] <= SMALL_VALUE_BYTES:
                # A run of small values: one lock hold, copies inside it (cheaper than pins).
                with self._lock:
                    self._check_open()
                    host_tier = self._host_write_tier
                    while i < len(checked) and sources[i].shape[0] <= SMALL_VALUE_BYTES:
                        key, src = checked[i], sources[i]
                        if not (host_tier is not None and isinstance(src, np.ndarray)
                                and self._put_host(host_tier, key, src, parent, owner)):
                            if not self._put(key, src, parent, chain, owner):
                                return i
                        parent = key
                        chain.add(parent)
                        i += 1
            else:
                if not self._put(checked[i], sources[i], parent, chain, owner):
                    return i
                parent = checked[i]
                chain.add(parent)
                i += 1
        return i

    def get(self, key: bytes) -> bytes | None:
        result = self._read(check_key(key), None)
        assert result is not True, "a read without an output buffer returns bytes"
        return result

    def get_into(self, key: bytes, out: Any) -> bool:
        """Copy the value into ``out`` (a tensor on any device or a writable buffer).

        ``out`` must have exactly the value's size (`BufferSizeError` otherwise). On a miss
        it returns False and the contents of ``out`` are unspecified.
        """
        return self._read(check_key(key), out) is not None

    def get_many(self, keys: Sequence[bytes], *, max_bytes: int | None = None
                 ) -> list[bytes | None]:
        """The values of ``keys`` (None for a miss), in order; same effect as `get` on
        each key in turn.

        With ``max_bytes``, the values read add up to at most that (the first one is read
        whatever its size; a key given twice counts twice): reading stops before the value
        that would pass it, and the list covers only the leading keys read then, shorter
        than ``keys`` (a daemon bounds its answers this way).

        Runs of misses and of small values whose fastest tier is the host write tier are
        served in one lock hold; any other key takes `get`'s path (pin, copy outside the
        lock, promotion) before the run goes on.
        """
        checked = [check_key(k) for k in keys]
        results: list[bytes | None] = [None] * len(checked)
        limit = math.inf if max_bytes is None else max_bytes
        i = total = 0
        while i < len(checked):
            with self._lock:
                self._check_open()
                i, total, is_full = self._get_run(checked, i, results, total, limit)
            if is_full:
                return results[:i]
            if i < len(checked):
                value = self.get(checked[i])
                if value is not None:
                    if total and total + len(value) > limit:  # it grew since the run
                        return results[:i]
                    total += len(value)
                results[i] = value
                i += 1
        return results

    def _get_run(self, keys: list[bytes], i: int, results: list[bytes | None], total: int,
                 limit: float) -> tuple[int, int, bool]:
        """get_many's batch path (lock held) from key ``i``, with ``total`` bytes read so
        far: where it stopped, the bytes read by then, and whether the value there would
        take them past ``limit``."""
        tier, t = self._host_write_tier, self._write_tier
        entries, touch = self.index.entries, self.index.touch
        t_bit, upto_t = 1 << t, (1 << (t + 1)) - 1
        # Values of the run that fit whatever their sizes: counted, not summed, per value.
        sure_hits = (limit - total) // SMALL_VALUE_BYTES if limit < math.inf else math.inf
        start, queries, hits = i, 0, 0
        stop = None
        while i < len(keys):
            entry = entries.get(keys[i])
            if entry is not None and entry.residency:
                if (tier is None or entry.residency & upto_t != t_bit  # t: its fastest tier
                        or entry.nbytes > SMALL_VALUE_BYTES or hits >= sure_hits):
                    stop = entry  # get's path for this one
                    break
                touch(entry)
                results[i] = tier.view(*tier.slot_of(keys[i])).tobytes()
                hits += 1
            queries += 1
            i += 1
        self._queries += queries
        self._hits += hits
        self._tier_hits[t] += hits
        if hits and limit < math.inf:
            total += sum(len(v) for v in results[start:i] if v is not None)
        # A value that would pass the limit is not read only to be dropped.
        is_full = stop is not None and total > 0 and total + stop.nbytes > limit
        return i, total, is_full

    def match_prefix(self, keys: Sequence[bytes], *, probe: bool = False) -> int:
        """How many leading keys are held in some tier. ``probe`` marks a lookup that is not
        a request (a router comparing engines): a daemon keeps it out of its access log and
        lookup counts; here it changes nothing."""
        checked = [check_key(k) for k in keys]
        with self._lock:
            self._check_open()
            return self.index.match_prefix(checked)

    def contains(self, key: bytes) -> bool:
        key = check_key(key)
        with self._lock:
            self._check_open()
            return self.index.get(key) is not None

    __contains__ = contains

    def tier_of(self, key: bytes) -> str | None:
        key = check_key(key)
        with self._lock:
            self._check_open()
            entry = self.index.get(key)
            return None if entry is None else self._kinds[entry.fastest_tier].value

    def delete(self, key: bytes) -> bool:
        """Remove ``key`` from every tier (durably on NVMe at the next flush).

        `StorageError`, changing nothing, if the NVMe tier stopped writing after a disk
        error and holds a record of ``key``: the delete could not be made durable."""
        key = check_key(key)
        with self._lock:
            self._check_open()
            if self._is_pinned_on_disk(key):
                raise StorageError(
                    "cannot delete this key durably: the NVMe tier stopped writing after a "
                    "disk error and holds a record of it, which a restart would bring back")
            entry = self.index.get(key)
            if entry is None:
                if self._nvme is not None:
                    # An evicted copy may still lie in a segment: tombstone it too, so
                    # that a reopen cannot bring back what was deleted.
                    self._nvme.delete(key)
                return False
            self._forget(entry, durable=True)
            return True

    def flush(self) -> None:
        """Make everything stored so far durable on NVMe (a no-op without an NVMe tier)."""
        with self._lock:
            self._check_open()
            if self._nvme is None:
                return
            t_nvme = self._nvme_tier
            pending = [e for e in self.index.entries.values()
                       if e.residency and not e.is_in(t_nvme)]
            pending.sort(key=lambda e: e.last_access)
            dropped = 0
            for entry in pending:
                t = entry.fastest_tier
                if entry.is_in(t_nvme) or t is None:  # written while making room for another
                    continue
                view = self._tiers[t].view(*self._tiers[t].slot_of(entry.key))
                if not self._store_in(t_nvme, entry, view):
                    dropped += 1
            if dropped:
                log.warning("flush: %d blocks did not fit in the NVMe tier and are not durable",
                            dropped)
            self._nvme.flush()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            tiers = {}
            for t, (kind, tier) in enumerate(zip(self._kinds, self._tiers, strict=True)):
                tier_stats = tier.stats() if not self._closed else {}
                tiers[kind.value] = {
                    **tier_stats,
                    "capacity_bytes": tier.capacity_bytes,
                    "used_bytes": tier.used_bytes if not self._closed else 0,
                    "blocks": len(tier) if not self._closed else 0,
                    "hits": self._tier_hits[t],
                }
            checksum_failures = 0
            if self._nvme is not None and not self._closed:
                checksum_failures = self._nvme.stats().get("checksum_failures", 0)
            return {
                "tiers": tiers,
                "queries": self._queries,
                "hits": self._hits,
                "hit_rate": self._hits / self._queries if self._queries else 0.0,
                "evictions": self._evictions,
                "demotions": self._demotions,
                "promotions": self._promotions,
                "checksum_failures": checksum_failures,
                "torn_reads": self._torn_reads,
                "blocks": len(self.index),
            }

    def close(self) -> None:
        """Flush to NVMe (if present) and release every tier. Idempotent.

        If the flush fails (the NVMe tier stopped writing after a disk error), every tier is
        released all the same and the flush's `StorageError` is raised after."""
        with self._lock:
            if self._closed:
                return
            error: StorageError | None = None
            try:
                if self._nvme is not None:
                    self.flush()
            except StorageError as e:
                error = e
            finally:
                self._closed = True
                for tier in self._tiers:
                    try:
                        tier.close()
                    except StorageError as e:  # the NVMe tier's own last flush
                        error = error or e
            if error is not None:
                raise error

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writes -------------------------------------------------------------------------------

    def _source(self, value: Any) -> ByteView:
        src = value_view(value)
        if src.shape[0] > self.config.max_value_bytes:
            raise InvalidValueError(f"value of {src.shape[0]} bytes exceeds max_value_bytes "
                                    f"({self.config.max_value_bytes})")
        return src

    def _put(self, key: bytes, src: ByteView, parent: bytes | None,
             protect: set[bytes] | None = None, owner: int = 0) -> bool:
        """Store into the write tier or, failing that, the tiers below it.

        ``protect`` holds the blocks this put_many call already stored (the new block's
        ancestors): evicting one of them to make room for its own descendant would push
        a chain's head below its tail, so such a block goes one tier down instead.
        """
        nbytes = int(src.shape[0])
        if self._is_pinned_on_disk(key):
            return False
        for t in range(self._write_tier, len(self._tiers)):
            tier = self._tiers[t]
            if isinstance(tier, MemoryTier):
                if self._put_memory(t, tier, key, src, parent, protect, owner):
                    return True
                continue
            with self._lock:
                self._check_open()
                self._discard_old(key)
                entry = self.index.ensure(key, parent, nbytes, owner)
                self.index.touch(entry)
                if self._store_in(t, entry, src, protect):
                    return True
                self.index.drop_if_unused(entry)
        return False

    def _put_host(self, tier: MemoryTier, key: bytes, src: np.ndarray,
                  parent: bytes | None, owner: int) -> bool:
        """put_many's fast path (lock held): a small host value into a free slot of the
        host write tier. False, with nothing changed, when that needs an eviction (or its
        owner's quota would)."""
        nbytes = src.shape[0]
        if owner and not self._fits_quota(self._write_tier, owner, nbytes):
            return False
        offset = tier.allocator.allocate(nbytes)
        if offset is None:
            return False
        entry = self.index.entries.get(key)
        if entry is not None and entry.residency:
            self._forget(entry, durable=True)
        np.copyto(tier.view(offset, nbytes), src)
        tier.commit(key, offset, nbytes, parent)
        self.index.insert(key, parent, nbytes, self._write_tier, owner)
        return True

    def _put_memory(self, t: int, tier: MemoryTier, key: bytes, src: ByteView,
                    parent: bytes | None, protect: set[bytes] | None, owner: int) -> bool:
        nbytes = int(src.shape[0])
        if nbytes <= SMALL_VALUE_BYTES:
            with self._lock:
                self._check_open()
                offset = self._reserve(t, nbytes, protect, owner)
                if offset is None:
                    return False
                copy_bytes(tier.view(offset, nbytes), src)
                self._commit(t, key, parent, offset, nbytes, owner)
            return True
        with self._lock:
            self._check_open()
            offset = self._reserve(t, nbytes, protect, owner)
            if offset is not None:
                self._hold(t, offset, owner, nbytes)  # copied outside the lock
        if offset is None:
            return False
        try:
            copy_bytes(tier.view(offset, nbytes), src)
        except BaseException:
            with self._lock:
                self._unhold(t, offset)
                tier.release(offset)
            raise
        with self._lock:
            if self._closed:
                raise StoreClosedError("the store was closed during put")
            self._commit(t, key, parent, offset, nbytes, owner)
        return True

    def _commit(self, t: int, key: bytes, parent: bytes | None, offset: int,
                nbytes: int, owner: int = 0) -> None:
        self._discard_old(key)
        self._tiers[t].commit(key, offset, nbytes, parent)
        self.index.insert(key, parent, nbytes, t, owner)
        if owner:
            self._unhold(t, offset)
            self._enforce_quota(t, owner, keep=key)

    def _discard_old(self, key: bytes) -> None:
        """Drop the value being overwritten; its NVMe copy gets a tombstone so that a crash
        can bring back the new value or none, never the old one."""
        entry = self.index.get(key)
        if entry is not None:
            self._forget(entry, durable=True)

    def _forget(self, entry: BlockEntry, *, durable: bool) -> None:
        """Drop every copy of ``entry``. A memory slot that readers still copy from (live
        pins) is retired, not freed: it keeps the old value whole until the last of those
        pins is released, so a reader racing an overwrite or delete gets the old value,
        never a torn one. Other pins are revoked: those reads become misses."""
        live = self.index.live_pins(entry)
        self.index.revoke_pins(entry)
        retired = False
        for t, tier in enumerate(self._tiers):
            if entry.is_in(t):
                if live and not retired and isinstance(tier, MemoryTier):
                    offset = tier.detach(entry.key)
                    self._retired_readers[(t, offset)] = len(live)
                    for pin in live:
                        self._retired[pin] = (t, offset)
                    retired = True  # pins read the fastest copy: only that one is in use
                else:
                    tier.delete(entry.key) if durable else tier.evict(entry.key)
                self.index.remove(entry, t)

    def _unpin(self, entry: BlockEntry | None, pin: int) -> bool:
        """Release a pin; True if the copy made under it is whole (see `_forget`)."""
        slot = self._retired.pop(pin, None)
        if slot is not None:
            readers = self._retired_readers[slot] - 1
            if readers:
                self._retired_readers[slot] = readers
            else:
                del self._retired_readers[slot]
                if not self._closed:
                    self._tiers[slot[0]].release(slot[1])
            return True
        return entry is not None and self.index.unpin(entry, pin)

    def _reserve(self, t: int, nbytes: int, protect: set[bytes] | None = None,
                 owner: int = 0) -> int | None:
        """A slot in memory tier ``t`` for a value of ``owner``, evicting (and demoting)
        victims until one is free: its own first while it is at its quota (`StoreQuotas`)."""
        tier: MemoryTier = self._tiers[t]
        if owner and not self._make_quota_room(t, owner, nbytes, protect):
            return None
        while True:
            offset = tier.reserve(nbytes)
            if offset is not None:
                return offset
            if not self._evict_for(t, nbytes, protect):
                return None

    def _evict_for(self, t: int, nbytes: int, protect: set[bytes] | None = None) -> bool:
        """Evict from tier ``t`` for a value of ``nbytes``: one victim of its partition (in
        a memory tier, its size class, so that a slot of the class comes free); False if
        nothing can go. A memory tier with no such victim frees the cheapest window of its
        pool whose values are all unpinned and not in ``protect`` (`reclaim_window`)."""
        tier = self._tiers[t]
        is_memory = isinstance(tier, MemoryTier)
        victim = self.index.policies[t].victim(size_class(nbytes) if is_memory else 0)
        if victim is not None:
            if protect and victim.key in protect:
                return False
            self._evict(victim, t)
            return True
        if not is_memory:
            return False
        owners = tier.owners()
        index = self.index

        def can_free(offset: int) -> bool:
            key = owners.get(offset)  # None: reserved, or retired while readers copy
            entry = None if key is None else index.get(key)
            return (entry is not None and not index.is_pinned(entry)
                    and not (protect and key in protect))

        offsets = tier.allocator.reclaim_window(nbytes, can_free)
        if not offsets:
            return False
        for offset in offsets:
            self._evict(index.get(owners[offset]), t)
        return True

    def _evict(self, entry: BlockEntry, t: int) -> None:
        """Take ``entry`` out of tier ``t``, demoting it to the next tier if none holds it."""
        self._evictions += 1
        tier = self._tiers[t]
        lower = t + 1
        if lower < len(self._tiers) and entry.residency >> lower == 0:
            if lower != self._nvme_tier or admits(self.config.nvme_admission, entry):
                try:
                    if self._store_in(lower, entry, tier.view(*tier.slot_of(entry.key))):
                        self._demotions += 1
                except StorageError as e:  # the disk's trouble: the victim goes all the same
                    log.warning("eviction: could not demote a block to NVMe: %s", e)
        if t == self._nvme_tier:
            # Durably: an evicted record still on disk must not come back at reopen, where
            # it would count against capacity and push out blocks that were live.
            try:
                tier.delete(entry.key)
            except StorageError as e:  # no room for its tombstone: forgotten, not deleted
                log.warning("eviction: could not delete an NVMe record durably: %s", e)
                tier.evict(entry.key)
        else:
            tier.evict(entry.key)
        self.index.remove(entry, t)

    def _store_in(self, t: int, entry: BlockEntry, src: ByteView,
                  protect: set[bytes] | None = None) -> bool:
        """Write a copy of ``entry`` into tier ``t`` (making room); False if it cannot fit."""
        nbytes = entry.nbytes
        tier = self._tiers[t]
        if isinstance(tier, MemoryTier):
            offset = self._reserve(t, nbytes, protect, entry.owner)
            if offset is None:
                return False
            copy_bytes(tier.view(offset, nbytes), src)
            tier.commit(entry.key, offset, nbytes, entry.parent)
        else:
            footprint = tier.footprint_bytes(nbytes)
            if footprint > tier.capacity_bytes or tier.is_read_only:
                return False  # read only: a failed disk (logged) takes nothing new
            if entry.owner and not self._make_quota_room(t, entry.owner, nbytes, protect):
                return False
            while tier.used_bytes + footprint > tier.capacity_bytes:
                if not self._evict_for(t, 0, protect):
                    return False
            host = src if isinstance(src, np.ndarray) else src.cpu().numpy()
            try:
                if not tier.put(entry.key, host, entry.parent):
                    return False
            except OSError as e:
                raise StorageError(f"NVMe write failed: {e}") from e
        self.index.add(entry, t)
        return True

    def _is_pinned_on_disk(self, key: bytes) -> bool:
        """Whether a new value of ``key`` (or its delete) cannot be acknowledged: the NVMe
        tier is read only and holds a record of it that a reopen would bring back (a crash
        may bring back the new value or none, never the old one)."""
        nvme = self._nvme
        if nvme is None or not nvme.pins_old_records_of(key):
            return False
        log.warning("refused to replace or delete a key whose old record the read-only NVMe "
                    "tier holds (a restart would bring it back)")
        return True

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError("the store is closed; open a new kvstore.Store")

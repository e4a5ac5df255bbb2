"""The embedded multi-tier Store: the library API (docs/ARCHITECTURE.md).

    put ──> write tier (fastest present) ──evict──> next tier (demote) ──evict──> dropped
    get <── fastest tier holding the key  ──hit in a slower tier──> promoted to the write tier

Where blocks go is decided by the placement core (`kvstore.placement`), over the tiers as
its media (`TierMedia`); this module holds the API, `Writes` the write paths, `Reads` the
read paths, `HostPlane` the shared-memory clients' slots, all over one `StoreState` (its
lock and concurrency rules are there).

Invariants: every present tier keeps ``used_bytes <= capacity_bytes``; a key is held
exactly when at least one tier holds a committed copy; victims are never pinned.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import numpy as np

from kvstore.config import StoreConfig
from kvstore.errors import ConfigError, InvalidValueError, StorageError
from kvstore.placement import Admission, Placement
from kvstore.store.host import HostPlane
from kvstore.store.media import TierMedia, open_tiers
from kvstore.store.reads import SMALL_VALUE_BYTES, Borrowed, Reads
from kvstore.store.state import StoreState
from kvstore.store.writes import Writes
from kvstore.tiers.base import TIER_BIT, TierKind, check_key
from kvstore.tiers.slab import size_class

log = logging.getLogger("kvstore.store")


class Store:
    """A KV store over HBM, DRAM and NVMe tiers; see the module docstring."""

    def __init__(self, config: StoreConfig | None = None, *,
                 check_stop: Callable[[], None] | None = None) -> None:
        """``check_stop`` runs between chunks of the DRAM pool's allocation; what it raises
        stops the construction, with every tier made so far closed."""
        self.config = config = config if config is not None else StoreConfig()
        kinds, tiers = open_tiers(config, check_stop)
        media = TierMedia(kinds, tiers)
        write_tier = kinds.index(TierKind(config.write_tier)) if config.write_tier else 0
        self.placement = Placement(
            [config.eviction_policy] * len(tiers),
            admissions=[config.nvme_admission if t == media.nvme_tier else Admission.ALWAYS
                        for t in range(len(tiers))],
            partition_of=[size_class if memory else None for memory in media.is_memory],
            media=media, write_tier=write_tier, promote_on_hit=config.promote_on_hit)
        self._state = state = StoreState(config, media, self.placement)
        self._media = media
        self._tiers = tiers
        dram_tier = media.tier_of_kind(TierKind.DRAM)
        # The write tier when it is host memory: put_many copies small values straight in.
        self._host_write_tier = tiers[write_tier] if kinds[write_tier] is TierKind.DRAM else None
        self._reads = Reads(state, self._host_write_tier)
        self._writes = Writes(config, state, self.placement, media, tiers)
        self._host = HostPlane(state, dram_tier, self._writes.commit)
        self._dram_tier = dram_tier
        # The core's residency bits (bit t: tier t) as bits by tier kind (`TIER_BIT`).
        kind_bits = [TIER_BIT[kind] for kind in kinds]
        self._res_bits = [sum(b for t, b in enumerate(kind_bits) if res >> t & 1)
                          for res in range(256)]
        if media.nvme is not None:
            self._recover()

    def _recover(self) -> None:
        """Index what the NVMe tier found on disk, oldest first so LRU order survives."""
        records = self._media.nvme.recovered()
        for record in records:
            self.placement.recover(record.key, record.parent, record.nbytes,
                                   self._media.nvme_tier)
        if records:
            log.info("recovered %d blocks from %s", len(records), self.config.nvme_path)

    # -- the public API -----------------------------------------------------------------------

    def put(self, key: bytes, value: Any, *, owner: int = 0, replace: bool = True) -> bool:
        """Store ``value`` under ``key`` (replacing any earlier value). False if no room:
        then an earlier value stays as it was, or was evicted making room, never replaced.
        ``owner`` (a tenant's number; 0: nobody) is charged for it (`set_quota`).
        ``replace=False``: store it only if ``key`` is not held (False if it is), decided
        at the instant it would be committed (a block arriving from a peer never replaces
        what a client wrote here meanwhile)."""
        key = check_key(key)
        src = self._writes.source(value)
        return self._writes.put(key, src, None, None, owner, replace)

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
        sources = [self._writes.source(v) for v in values]
        parent, i = None, 0
        chain: list[bytes] = []  # the blocks stored so far, never evicted for the next
        state = self._state
        nvme = self._media.nvme
        if nvme is not None and nvme.is_read_only:  # (rare: the NVMe disk failed)
            for i, key in enumerate(checked):
                if self._media.pins_old_record(key):
                    checked, sources = checked[:i], sources[:i]  # stored up to there
                    break
            i = 0
        while i < len(checked):
            if sources[i].shape[0] <= SMALL_VALUE_BYTES:
                # A run of small values: one lock hold, copies inside it (cheaper than pins).
                with state.lock:
                    state.check_open()
                    host_tier = self._host_write_tier
                    while i < len(checked) and sources[i].shape[0] <= SMALL_VALUE_BYTES:
                        key, src = checked[i], sources[i]
                        if not (host_tier is not None and isinstance(src, np.ndarray)
                                and self._writes.put_host(host_tier, key, src, parent, owner)):
                            if not self._writes.put(key, src, parent, chain, owner):
                                return i
                        parent = key
                        chain.append(parent)
                        i += 1
            else:
                if not self._writes.put(checked[i], sources[i], parent, chain, owner):
                    return i
                parent = checked[i]
                chain.append(parent)
                i += 1
        return i

    def put_in_tier(self, tier: str, keys: Sequence[bytes], values: Sequence[Any], *,
                    owner: int = 0) -> int:
        """`put_many` into ``tier`` (a present tier's name) rather than the write tier, and
        into that tier only (a block it has no room for is not stored, nor are those after
        it): how many leading blocks were stored. Blocks put into NVMe are on the disk when
        it returns (its write buffer written out and synced), so reading them reads the disk.
        For measuring what a fetch from each tier costs (`engines.cost_model`): afterwards
        they are ordinary blocks (a hit promotes them, eviction moves them)."""
        t = self._tier_index(tier, what="put_in_tier")
        if len(keys) != len(values):
            raise InvalidValueError(f"put_in_tier got {len(keys)} keys but {len(values)} "
                                    "values")
        checked = [check_key(k) for k in keys]
        sources = [self._writes.source(v) for v in values]
        chain: list[bytes] = []
        for key, src in zip(checked, sources, strict=True):
            parent = chain[-1] if chain else None
            if not self._writes.put(key, src, parent, chain, owner, tiers=[t]):
                break
            chain.append(key)
        if chain and self._media.kinds[t] is TierKind.NVME:
            with self._state.lock:
                self._state.check_open()
                self._media.nvme.flush()
        return len(chain)

    def get(self, key: bytes) -> bytes | None:
        result = self._reads.read(check_key(key), None)
        assert result is not True, "a read without an output buffer returns bytes"
        return result

    def get_into(self, key: bytes, out: Any) -> bool:
        """Copy the value into ``out`` (a tensor on any device or a writable buffer).

        ``out`` must have exactly the value's size (`BufferSizeError` otherwise). On a miss
        it returns False and the contents of ``out`` are unspecified.
        """
        return self._reads.read(check_key(key), out) is not None

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
        state = self._state
        while i < len(checked):
            with state.lock:
                state.check_open()
                i, total, is_full = self._reads.get_run(checked, i, results, total, limit)
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

    def get_many_into(self, keys: Sequence[bytes], outs: Sequence[Any]) -> int:
        """Copy the values of leading ``keys`` into ``outs`` (one buffer or tensor each,
        of exactly the value's size); returns how many leading keys were copied, stopping
        at the first miss. Same effect as `get_into` on each key in turn until one misses.
        """
        return self._reads.get_many_into(keys, outs)

    def borrow(self, keys: Sequence[bytes]) -> AbstractContextManager[Borrowed]:
        """Pin the leading ``keys`` held in memory tiers (stopping at the first that is
        missing or only on NVMe) and yield their slots (`Borrowed`); unpin on exit."""
        return self._reads.borrow(keys)

    def match_prefix(self, keys: Sequence[bytes], *, probe: bool = False) -> int:
        """How many leading keys are held in some tier. ``probe`` marks a lookup that is not
        a request (a router comparing engines): a daemon keeps it out of its access log and
        lookup counts; here it changes nothing."""
        checked = [check_key(k) for k in keys]
        with self._state.lock:
            self._state.check_open()
            return self.placement.match_prefix(checked)

    def contains(self, key: bytes) -> bool:
        key = check_key(key)
        with self._state.lock:
            self._state.check_open()
            return self.placement.lookup(key) >= 0

    __contains__ = contains

    def tier_of(self, key: bytes) -> str | None:
        key = check_key(key)
        with self._state.lock:
            self._state.check_open()
            block = self.placement.lookup(key)
            return None if block < 0 else self._media.kinds[self.placement.fastest(block)].value

    def delete(self, key: bytes) -> bool:
        """Remove ``key`` from every tier (durably on NVMe at the next flush).

        `StorageError`, changing nothing, if the NVMe tier stopped writing after a disk
        error and holds a record of ``key``: the delete could not be made durable."""
        key = check_key(key)
        with self._state.lock:
            self._state.check_open()
            if self._media.pins_old_record(key):
                raise StorageError(
                    "cannot delete this key durably: the NVMe tier stopped writing after a "
                    "disk error and holds a record of it, which a restart would bring back")
            if self.placement.lookup(key) < 0:
                if self._media.nvme is not None:
                    # An evicted copy may still lie in a segment: tombstone it too, so
                    # that a reopen cannot bring back what was deleted.
                    self._media.nvme.delete(key)
                return False
            self.placement.forget(key, durable=True)
            return True

    def flush(self) -> None:
        """Make everything stored so far durable on NVMe (a no-op without an NVMe tier)."""
        with self._state.lock:
            self._state.check_open()
            t_nvme = self._media.nvme_tier
            if t_nvme is None:
                return
            dropped = 0
            core = self.placement
            for key in core.missing_from(t_nvme):  # least recently used first
                block = core.lookup(key)
                if block < 0 or core.is_in(block, t_nvme):  # written while making room
                    continue
                view = self._media.source(core.fastest(block), key)
                if not core.store_in(t_nvme, key, view):
                    dropped += 1
            if dropped:
                log.warning("flush: %d blocks did not fit in the NVMe tier and are not durable",
                            dropped)
            self._media.nvme.flush()

    def stats(self) -> dict[str, Any]:
        state = self._state
        with state.lock:
            tiers = {}
            closed = state.closed
            for t, (kind, tier) in enumerate(zip(self._media.kinds, self._tiers, strict=True)):
                tiers[kind.value] = {
                    **(tier.stats() if not closed else {}),
                    "capacity_bytes": tier.capacity_bytes,
                    "used_bytes": tier.used_bytes if not closed else 0,
                    "blocks": len(tier) if not closed else 0,
                    "hits": state.counters.tier_hits[t],
                }
            checksum_failures = 0
            if self._media.nvme is not None and not closed:
                checksum_failures = self._media.nvme.stats().get("checksum_failures", 0)
            counters, core = state.counters, self.placement
            return {
                "tiers": tiers,
                "queries": counters.queries,
                "hits": counters.hits,
                "hit_rate": counters.hits / counters.queries if counters.queries else 0.0,
                "evictions": core.evictions,
                "demotions": core.demotions,
                "promotions": core.promotions,
                "checksum_failures": checksum_failures,
                "torn_reads": counters.torn_reads,
                "blocks": len(core),
            }

    def close(self) -> None:
        """Flush to NVMe (if present) and release every tier. Idempotent.

        If the flush fails (the NVMe tier stopped writing after a disk error), every tier is
        released all the same and the flush's `StorageError` is raised after."""
        state = self._state
        self._reads.close()  # (its reader thread takes the lock: stopped before)
        with state.lock:
            if state.closed:
                return
            error: StorageError | None = None
            try:
                if self._media.nvme is not None:
                    self.flush()
            except StorageError as e:
                error = e
            finally:
                state.closed = self._media.closed = True
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

    # -- per-owner quotas (the core enforces them; see kvstore.placement) ---------------------

    def set_quota(self, owner: int, tier: str, nbytes: int | None) -> None:
        """Bound ``owner``'s value bytes in ``tier`` ("hbm", "dram", "nvme") to ``nbytes``
        (None: no bound). Blocks already over it go at the owner's next write there.

        Before a block of an owner lands in a tier (a put, a reservation of shared memory,
        a demotion, a promotion) its own least recently used blocks leave the tier until the
        new one fits its quota there, so a tenant at its quota makes room from its own blocks
        instead of evicting others'. A reserved, uncommitted slot counts too."""
        if isinstance(owner, bool) or not isinstance(owner, int) or owner <= 0:
            raise ConfigError(f"a quota's owner is a positive int, got {owner!r}")
        t = self._tier_index(tier)
        if nbytes is not None and (isinstance(nbytes, bool) or not isinstance(nbytes, int)
                                   or nbytes < 0):
            raise ConfigError(f"a quota is a byte count >= 0, got {nbytes!r}")
        with self._state.lock:
            self.placement.set_quota(owner, t, nbytes)

    def usage(self, owner: int) -> dict[str, dict[str, int | None]]:
        """``owner``'s blocks per present tier: used bytes (of values), blocks, quota."""
        with self._state.lock:
            nbytes, blocks = self.placement.usage(owner)
            return {kind.value: {"used_bytes": nbytes[t], "blocks": blocks[t],
                                 "quota_bytes": self.placement.quota(owner, t)}
                    for t, kind in enumerate(self._media.kinds)}

    def capacities(self) -> dict[str, int]:
        """Each present tier's capacity in bytes, fastest first."""
        return {kind.value: tier.capacity_bytes
                for kind, tier in zip(self._media.kinds, self._tiers, strict=True)}

    def _tier_index(self, tier: str, *, what: str = "a quota") -> int:
        names = [kind.value for kind in self._media.kinds]
        if tier not in names:
            raise ConfigError(f"{what} names tier {tier!r}, which this store does not have "
                              f"(tiers: {', '.join(names)})")
        return names.index(tier)

    # -- what the store holds, for a cluster node to publish (`kvstore.cluster`) ---------------

    def inventory(self, *, track: bool = False) -> list[tuple[bytes, int]]:
        """``(key, tier bits)`` of every held block (bits: 1 HBM, 2 DRAM, 4 NVMe). With
        ``track``, in the same instant, start recording what changes from here on
        (`take_changes`), dropping anything recorded before."""
        with self._state.lock:
            self._state.check_open()
            bits = self._res_bits
            held = [(key, bits[res]) for key, res in self.placement.residencies()]
            if track:
                self.placement.track_changes(True)
            return held

    def spill_to(self, on_spill: Callable[[bytes, bytes], None] | None) -> None:
        """Hand ``on_spill(key, value)`` every block whose last copy an eviction drops,
        before it is dropped (None: stop). It is called with the store's lock held, from
        whichever thread evicts: it must only queue the block."""
        with self._state.lock:
            self._media.on_spill = on_spill
            self.placement.spills = on_spill is not None

    def tier_bits(self, keys: Sequence[bytes]) -> list[int]:
        """Each key's tier bits now (0: not held)."""
        checked = [check_key(k) for k in keys]
        with self._state.lock:
            self._state.check_open()
            core, bits = self.placement, self._res_bits
            return [bits[core.residency(i)] if (i := core.lookup(k)) >= 0 else 0
                    for k in checked]

    def take_changes(self) -> list[tuple[bytes, int]]:
        """``(key, tier bits now; 0: gone)`` of each key whose tiers changed since
        `inventory` (``track=True``) or the last call, each once."""
        with self._state.lock:
            self._state.check_open()
            bits = self._res_bits
            return [(key, bits[res]) for key, res in self.placement.take_changes()]

    # -- the daemon's host-memory plane (`HostPlane`) -----------------------------------------

    @property
    def has_nvme(self) -> bool:
        return self._media.nvme is not None

    def try_lock(self) -> bool:
        """Take the store lock only if it is free; True if taken (then call `unlock`).

        The daemon's event loop runs short calls inline this way, and hands them to a
        thread when another thread holds the lock (for NVMe I/O, say)."""
        return self._state.lock.acquire(blocking=False)

    def unlock(self) -> None:
        self._state.lock.release()

    @property
    def host_pool(self) -> Any | None:
        """The DRAM tier's pool (``.array``, ``.shm_name``), or None without DRAM."""
        return None if self._dram_tier is None else self._tiers[self._dram_tier].pool

    def reserve_host(self, nbytes: int, protect: set[bytes] | None = None,
                     owner: int = 0) -> int | None:
        """Reserve a DRAM slot for a value of ``owner`` (evicting and demoting as needed,
        its own blocks first at its quota, never a key of ``protect``): its offset, or
        None."""
        return self._host.reserve(nbytes, protect, owner)

    def commit_host(self, key: bytes, offset: int, nbytes: int, parent: bytes | None,
                    owner: int = 0) -> bool:
        """Make a reserved DRAM slot, now filled, the value of ``key``, charged to
        ``owner``; False, the slot still reserved (release it), if ``key`` cannot take a new
        value (its old record is on a read-only NVMe disk: `put`)."""
        return self._host.commit(key, offset, nbytes, parent, owner)

    def release_host(self, offset: int) -> None:
        """Give back a reserved DRAM slot that will not be committed."""
        self._host.release(offset)

    def pin_host(self, key: bytes) -> tuple[int, int, int] | None:
        """``(offset, nbytes, pin)`` of a block whose fastest tier is DRAM, counted as a
        hit; None (nothing counted) when it is elsewhere or absent: use `get` for it."""
        return self._host.pin(key)

    def pin_host_many(self, keys: list[bytes]) -> list[tuple[int, int, int] | None]:
        """`pin_host` of each of ``keys`` at once (one hold of the store's lock)."""
        return self._host.pin_many(keys)

    def unpin_host_many(self, pins: list[tuple[bytes, int]], *, after_copy: bool = True
                        ) -> list[bool]:
        """`unpin_host` of each ``(key, pin)`` at once."""
        return self._host.unpin_many(pins, after_copy=after_copy)

    def touch_host(self, keys: list[bytes]) -> None:
        """Count blocks a client read from the DRAM pool on its own (through the shared
        directory) as DRAM hits, and make those still stored the most recently used."""
        self._host.touch(keys)

    def unpin_host(self, key: bytes, pin: int, *, after_copy: bool = True) -> bool:
        """Release a pin_host pin; False if the block changed meanwhile or the lease ran
        out (the copy may be torn: treat it as a miss). ``after_copy=False`` drops a pin
        whose copy nobody will use (its holder went away): no torn read is counted."""
        return self._host.unpin(key, pin, after_copy=after_copy)

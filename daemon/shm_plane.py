"""The daemon's shared-memory data plane: same-host clients copy values straight into
and out of the Store's DRAM pool, which they map from /dev/shm.

    put:  reserve -> (client copies into the slot) -> commit   (or abort)
    get:  pin     -> (client copies out of the slot) -> unpin

Each connection holds its reservations and pins under handles, each with a lease: they go
when the connection closes (however it closes: a SIGKILLed client's socket is closed by its
kernel), and a live client that holds one past ``lease_s`` loses it to the sweeper (a pin
at once, a reservation as below). The Store's own pin lease makes an expired pin stop
protecting its block, so no eviction waits forever.

Invariants (no reader ever gets bytes other than what was committed for its key):

- A slot is written by the client that reserved it, and by no one else, until that client
  can no longer write into it. An expired reservation is therefore *quarantined*, not
  given back: its slot stays out of the allocator (counted in DRAM's used bytes and in
  `LeaseStats`) until its handle is committed or aborted on its connection, or the
  connection ends. A client finishes its copy before it commits or aborts (the protocol
  asks it; the reference client's operation does reserve -> copy -> commit in order on
  one connection), and a connection that ended has no operation left. A late copy lands
  in the quarantined slot, which no key owns. The price: a client paused for good keeps
  what it reserved until its connection ends (it could write into it on waking).
- A commit naming an expired handle stores nothing and is answered ``lease_expired``
  (all its slots go back); an abort of one is answered as any abort (its slot goes back).
- An expired pin is dropped: its block may be evicted and its slot reused. Pins only read;
  the client keeps a copy only if it finished within half a lease of *sending* the pin
  request (`kvstore.client.operations`), so before the pin's deadline here.

`SharedMemoryPlane` owns the handles and the lease bookkeeping; its operations run on the
daemon's event loop, which finds them in its dispatch table (`daemon.server`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from daemon.connection import Connection, Pin, Reservation
from daemon.read_stats import ReadStats
from daemon.store_calls import StoreCalls
from kvstore.errors import KVStoreError
from kvstore.shm.directory import BEAT_S
from kvstore.wire.error_codes import ErrorCode, RequestError

log = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 1.0
MAX_PINS = 65536  # held by one connection at a time


@dataclass
class LeaseStats:
    """Leases that ran out since start, and the slots they keep quarantined now (changed on
    the loop only, so no lock)."""

    num_expired_reservations: int = 0
    num_expired_pins: int = 0
    num_quarantined_slots: int = 0
    quarantined_bytes: int = 0

    def record(self, *, expired: Sequence[Reservation] = (), num_expired_pins: int = 0,
               released: Sequence[Reservation] = ()) -> None:
        """Reservations that ``expired`` (now quarantined), pins that expired, and
        quarantined reservations whose slots were ``released``."""
        self.num_expired_reservations += len(expired)
        self.num_expired_pins += num_expired_pins
        self.num_quarantined_slots += len(expired) - len(released)
        self.quarantined_bytes += (sum(r.nbytes for r in expired)
                                   - sum(r.nbytes for r in released))
        assert self.num_quarantined_slots >= 0 and self.quarantined_bytes >= 0, \
            "a quarantined slot was released twice"

    def as_dict(self) -> dict[str, int]:
        return {"expired_reservations": self.num_expired_reservations,
                "expired_pins": self.num_expired_pins,
                "quarantined_slots": self.num_quarantined_slots,
                "quarantined_bytes": self.quarantined_bytes}


class SharedMemoryPlane:
    """The reserve/commit/abort, pin/unpin and touch operations, and the leases behind
    them; ``read_stats`` gets a tenant's reads (pins and directory reads)."""

    def __init__(self, calls: StoreCalls, read_stats: ReadStats, *, lease_s: float,
                 metrics: Any | None) -> None:
        self.calls = calls
        self.store = calls.store
        self.read_stats = read_stats
        self.lease_s = lease_s
        self.metrics = metrics
        self.lease_stats = LeaseStats()
        self._handles = itertools.count(1)
        self.cluster: Any | None = None  # the pool (daemon.cluster.ClusterMember), if any

    # -- the shared-memory data plane -------------------------------------------------------------

    async def reserve(self, conn: Connection, meta: dict[str, Any], data: bytes) -> Any:
        """Reserve DRAM slots for the leading keys that find room."""
        conn.check_shared_memory()
        sizes: list[int] = meta["sizes"]
        keys = conn.scope_many(meta["keys"])  # refused before any slot is taken

        # One store call, so that a deadline cannot separate a slot from its handle: if the
        # request gives up while the call runs on, the slots it reserves are given back.
        # Without an NVMe tier (no demotion I/O), a short one runs on the loop when the
        # lock is free (a long batch would stall every other client meanwhile).
        offsets = await self.calls.run_to_end(
            lambda: self._reserve_slots(sizes, conn.owner),
            inline=not self.store.has_nvme and len(sizes) <= 64, release=self._release_slots)
        return self._reservations(conn, keys, offsets, sizes)

    def _reserve_slots(self, sizes: list[int], owner: int,
                       protect: set[bytes] | None = None) -> list[int]:
        """DRAM slots for the leading sizes that find room for ``owner``'s values, evicting
        no key of ``protect`` (worker thread or lock held)."""
        offsets: list[int] = []
        try:
            for nbytes in sizes:
                offset = self.store.reserve_host(nbytes, protect, owner)
                if offset is None:
                    break
                offsets.append(offset)
        except BaseException:  # a size over the limit: the client gets no handle at all
            self._release_slots(offsets)
            raise
        return offsets

    def _release_slots(self, offsets: list[int]) -> None:
        for offset in offsets:
            self.store.release_host(offset)

    def _reservations(self, conn: Connection, keys: list[bytes | None], offsets: list[int],
                      sizes: list[int]) -> tuple[dict[str, Any], list[Any]]:
        """File reserved slots under new handles of ``conn`` (``keys`` scoped already; None
        for a spare slot); the reserve answer."""
        deadline = time.monotonic() + self.lease_s
        handles = []
        for key, offset, nbytes in zip(keys, offsets, sizes, strict=False):
            handle = next(self._handles)
            conn.reservations[handle] = Reservation(key, offset, nbytes, deadline)
            handles.append(handle)
        return {"handles": handles, "offsets": offsets}, []

    @staticmethod
    def _take(table: dict[int, Any], handles: list[int]) -> list[Any]:
        """Take ``handles`` out of ``table``; none taken if one is not there (or named
        twice)."""
        missing = [h for h in handles if h not in table]
        if missing or len(set(handles)) != len(handles):
            raise RequestError(ErrorCode.UNKNOWN_HANDLE,
                               f"handles {missing or handles} are not held by this connection "
                               "(given back already, or never given)")
        return [table.pop(h) for h in handles]

    def _take_held(self, conn: Connection, handles: list[int]
                   ) -> tuple[list[Reservation], list[Reservation]]:
        """Take reservations out of ``conn``, live or quarantined: (all taken, the
        quarantined ones among them)."""
        quarantined = conn.quarantined
        if not quarantined or not any(h in quarantined for h in handles):
            return self._take(conn.reservations, handles), []  # the usual case: a dict each
        expired = {h for h in handles if h in quarantined}
        # Checked in both tables before anything is taken (a copy, on this rare path).
        taken = self._take({**conn.reservations, **quarantined}, handles)
        for h in handles:
            (quarantined if h in expired else conn.reservations).pop(h)
        return taken, [r for h, r in zip(handles, taken, strict=True) if h in expired]

    async def _take_reserved(self, conn: Connection, handles: list[int]) -> list[Reservation]:
        """Take reservations out of ``conn`` to commit them; if one had expired
        (quarantined), every slot taken goes back and `lease_expired` is raised: the
        client is past its copy, so no one writes into them any more."""
        taken, expired = self._take_held(conn, handles)
        if expired:
            await self._give_back(taken, expired)
            raise RequestError(ErrorCode.LEASE_EXPIRED,
                               f"{len(expired)} of {len(taken)} reservations were held past "
                               f"the lease ({self.lease_s:g} s): nothing was stored, "
                               "put again")
        return taken

    async def _give_back(self, taken: list[Reservation], quarantined: list[Reservation]
                         ) -> None:
        """Release the slots of ``taken``, which were taken out of the tables and so must
        be released even if the request's deadline passes (shielded); ``quarantined`` are
        those of them that had expired."""
        if quarantined:  # counted first: the release below finishes even if cancelled
            self._record_leases(released=quarantined)
        await self.calls.run_short(self._release_slots, [r.offset for r in taken], shield=True)

    async def commit(self, conn: Connection, meta: dict[str, Any], data: bytes) -> Any:
        """Commit reservations in order, as one chain (each the parent of the next), to
        their reserved keys or to ``keys``; then reserve spare slots of ``reserve_sizes``
        for the client's next puts (answered as ``handles`` and ``offsets``)."""
        keys, spare_sizes = meta.get("keys"), meta.get("reserve_sizes") or []
        if spare_sizes:
            conn.check_shared_memory()
        taken = await self._take_reserved(conn, meta["handles"])
        if keys is not None:
            for r, key in zip(taken, keys, strict=True):
                r.key = conn.scope(key)
        if any(r.key is None for r in taken):
            for r in taken:
                self.store.release_host(r.offset)
            raise RequestError(ErrorCode.BAD_REQUEST, "a spare slot is committed with keys")

        def commit() -> tuple[int, list[int]]:
            parent, stored = None, 0
            for i, r in enumerate(taken):
                is_stored = False
                try:
                    is_stored = self.store.commit_host(r.key, r.offset, r.nbytes, parent,
                                                       conn.owner)
                finally:
                    if not is_stored:  # failed or refused: this slot and the rest go back
                        for rest in taken[i:]:
                            self.store.release_host(rest.offset)
                if not is_stored:
                    break
                parent = r.key
                stored += 1
            # A spare is a guess at the next put: it may evict as that put would, but
            # never what was just stored (in a full pool the spare's room would otherwise
            # come from the value this commit acknowledges).
            return stored, self._reserve_slots(spare_sizes, conn.owner,
                                               {r.key for r in taken[:stored]})

        # The reservations are no longer in the table, so once taken they must be committed
        # (or released) even if the deadline passes before a worker thread is free: the
        # store call is shielded, and spares it reserves after a deadline are given back.
        stored, offsets = await self.calls.run_to_end(
            commit, inline=not (spare_sizes and self.store.has_nvme),  # NVMe: a thread
            release=lambda result: self._release_slots(result[1]))
        nbytes = sum(r.nbytes for r in taken)
        if self.metrics is not None and nbytes:
            self.metrics.record_transfer("in", nbytes)
        if stored and self.cluster is not None:  # other nodes' older copies go, after
            self.cluster.after_commit([r.key for r in taken[:stored]])
        spares, _ = self._reservations(conn, [None] * len(offsets), offsets, spare_sizes)
        return {"stored": stored, **spares}, []

    async def abort(self, conn: Connection, meta: dict[str, Any], data: bytes) -> Any:
        """Give reserved slots back, expired ones too: an abort does what it asks either
        way (and the client may be aborting after an error it should see, not this)."""
        await self._give_back(*self._take_held(conn, meta["handles"]))
        return {}, []

    async def pin(self, conn: Connection, meta: dict[str, Any], data: bytes) -> Any:
        """Pin the blocks held in DRAM: [offset, nbytes, handle] each, nil for the others
        (not in DRAM or absent: the client fetches those with get_many)."""
        conn.check_shared_memory()
        deadline = time.monotonic() + self.lease_s
        keys = conn.scope_many(meta["keys"])
        # A key asked for twice is pinned once (its places share the handle): 65,536 copies
        # of one key must not make 65,536 pins live for a lease. Past MAX_PINS held by the
        # connection, blocks are answered nil (the client asks get_many for those).
        unique = list(dict.fromkeys(keys))[:max(0, MAX_PINS - len(conn.pins))]
        pinned = await self.calls.run_short(self.store.pin_host_many, unique)
        num_found = len(pinned) - pinned.count(None)  # the others are asked for by get_many
        self.read_stats.record_reads(conn.owner, num_found, num_found)
        block_of: dict[bytes, list[int]] = {}
        for key, found in zip(unique, pinned, strict=True):
            if found is not None:
                offset, nbytes, pin = found
                handle = next(self._handles)
                conn.pins[handle] = Pin(key, pin, deadline)
                block_of[key] = [offset, nbytes, handle]
        return {"blocks": [block_of.get(key) for key in keys]}, []

    async def touch(self, conn: Connection, meta: dict[str, Any], data: bytes) -> Any:
        """Blocks the client copied straight from the pool, found through the directory:
        counted as DRAM hits and made the most recently used, as a pin would have."""
        conn.check_shared_memory()
        keys = conn.scope_many(meta["keys"])
        await self.calls.run_short(self.store.touch_host, keys)
        self.read_stats.record_reads(conn.owner, len(keys), len(keys))
        return {}, []

    async def unpin(self, conn: Connection, meta: dict[str, Any], data: bytes) -> Any:
        """Release pins; ``intact[i]`` False means that copy may be torn (drop it)."""
        taken = self._take(conn.pins, meta["handles"])
        intact = await self.calls.run_short(
            lambda: self.store.unpin_host_many([(p.key, p.pin) for p in taken]), shield=True)
        return {"intact": intact}, []

    # -- leases -----------------------------------------------------------------------------------

    async def release_connection(self, conn: Connection) -> None:
        """Give back what a connection that ended held: its reservations, quarantined ones
        included (nobody writes into them any more), and its pins."""
        if not (conn.reservations or conn.quarantined or conn.pins):
            return
        quarantined = list(conn.quarantined.values())
        reserved = [*conn.reservations.values(), *quarantined]
        pins = list(conn.pins.values())
        conn.reservations.clear()
        conn.quarantined.clear()
        conn.pins.clear()
        if quarantined:
            self._record_leases(released=quarantined)
        await self.calls.run(self._release_held, reserved, pins)
        log.info("released %d reservations (%d of them quarantined) and %d pins of peer=%s",
                 len(reserved), len(quarantined), len(pins), conn.peer)

    def _release_held(self, reserved: list[Reservation], pins: list[Pin]) -> None:
        """(worker thread) Release reserved slots and drop pins nobody copies under."""
        self._release_slots([r.offset for r in reserved])
        for p in pins:
            with contextlib.suppress(KVStoreError):  # nobody copies from these any more
                self.store.unpin_host(p.key, p.pin, after_copy=False)

    def _record_leases(self, *, expired: Sequence[Reservation] = (),
                       num_expired_pins: int = 0, released: Sequence[Reservation] = ()
                       ) -> None:
        stats = self.lease_stats
        stats.record(expired=expired, num_expired_pins=num_expired_pins, released=released)
        if self.metrics is not None:
            self.metrics.record_leases(len(expired), num_expired_pins,
                                       stats.num_quarantined_slots, stats.quarantined_bytes)

    async def keep_directory_alive(self) -> None:
        """Stamp the pool directory's heartbeat while the loop runs: clients stop reading
        through a directory whose daemon stopped stamping (`kvstore.shm.directory`, Liveness)."""
        pool = self.store.host_pool
        directory = None if pool is None else pool.directory
        while directory is not None:
            directory.beat()
            await asyncio.sleep(BEAT_S)

    async def sweep_leases(self, connections: Collection[Connection]) -> None:
        """Every `SWEEP_INTERVAL_S`: quarantine the expired reservations of
        ``connections`` (the daemon's, as they come and go), drop their expired pins."""
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            now = time.monotonic()
            for conn in list(connections):
                expired = [h for h, r in conn.reservations.items() if r.deadline < now]
                quarantined = [conn.reservations.pop(h) for h in expired]
                conn.quarantined.update(zip(expired, quarantined, strict=True))
                pins = [conn.pins.pop(h) for h, p in list(conn.pins.items())
                        if p.deadline < now]
                if not quarantined and not pins:
                    continue
                self._record_leases(expired=quarantined, num_expired_pins=len(pins))
                log.warning("lease expired peer=%s: %d reservations and %d pins; pins "
                            "dropped, %d bytes of reservations quarantined until the client "
                            "commits, aborts or hangs up", conn.peer, len(quarantined),
                            len(pins), sum(r.nbytes for r in quarantined))
                if pins:
                    await self.calls.run(self._release_held, [], pins)

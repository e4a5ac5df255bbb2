"""The daemon's shared-memory data plane: same-host clients copy values straight into
and out of the Store's DRAM pool, which they map from /dev/shm.

    put:  reserve -> (client copies into the slot) -> commit   (or abort)
    get:  pin     -> (client copies out of the slot) -> unpin

Each connection holds its reservations and pins under handles, each with a lease: they go
when the connection closes (however it closes: a SIGKILLed client's socket is closed by its
kernel), and a live client that holds one past ``lease_s`` loses it to the sweeper. The
Store's own pin lease makes an expired pin stop protecting its block, so no slot leaks and
no eviction waits forever.

`SharedMemoryPlane` is a part of `daemon.server.Daemon` (its base class): the operations
and the lease bookkeeping, on the daemon's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from daemon.tenants import Tenant
from kvstore.errors import KVStoreError
from kvstore.keys import scoped_key
from kvstore.protocol import ErrorCode, RequestError
from kvstore.tiers.shm_directory import BEAT_S

log = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 1.0


@dataclass
class _Reservation:
    key: bytes | None  # scoped; None for a spare slot, bound to a key at commit
    offset: int
    nbytes: int
    deadline: float


@dataclass
class _Pin:
    key: bytes  # scoped
    pin: int
    deadline: float


@dataclass
class _Expired:
    """Reservations and pins whose lease ran out (shaped like a Connection's tables)."""

    reservations: dict[int, _Reservation]
    pins: dict[int, _Pin]


def _nothing() -> None:
    return None


@dataclass(eq=False)
class Connection:
    peer: str
    tenant: Tenant | None = None
    namespace: str | None = None
    secret: bytes = b""
    shared_memory: bool = False
    reservations: dict[int, _Reservation] = field(default_factory=dict)
    pins: dict[int, _Pin] = field(default_factory=dict)
    busy: bool = False  # a request is being answered
    # Set by whoever serves it (daemon.tcp, or Daemon._serve for a stream):
    stop: Callable[[], None] = _nothing  # hang up when idle: now, or after the request
    kill: Callable[[], None] = _nothing  # hang up now
    closed: Any = None  # awaitable: done once it ended and gave back what it held
    doorbell: Any = None  # the transport of its commit doorbell (daemon.doorbell), if rung
    doorbell_secret: bytes | None = None  # issued, not yet bound

    def scope(self, key: bytes) -> bytes:
        """``key`` as it is stored for this connection's namespace."""
        if not self.secret:
            raise RequestError(ErrorCode.FORBIDDEN, "this connection named no namespace and "
                               "its token grants several: connect with namespace=... (one of "
                               f"{sorted(self.tenant.namespaces) if self.tenant else []})")
        return scoped_key(self.secret, key)


class SharedMemoryPlane:
    """The reserve/commit/abort and pin/unpin operations, and the leases behind them.
    Uses the daemon's ``config``, ``store``, ``_handles``, ``_connections`` and its
    ``_run*`` helpers."""

    config: Any
    store: Any
    _handles: Any
    _connections: set[Connection]

    # -- the shared-memory data plane -------------------------------------------------------------

    def _check_shm(self, conn: Connection) -> None:
        if not conn.shared_memory:
            raise RequestError(ErrorCode.FORBIDDEN, "this connection has no shared memory; "
                                                    "use put/get")

    async def _op_reserve(self, conn: Connection, meta: dict[str, Any], data: bytes) -> Any:
        """Reserve DRAM slots for the leading keys that find room."""
        self._check_shm(conn)
        sizes: list[int] = meta["sizes"]

        # One store call, so that a deadline cannot separate a slot from its handle: if the
        # request gives up while the call runs on, the slots it reserves are given back.
        # Without an NVMe tier (no demotion I/O), a short one runs on the loop when the
        # lock is free (a long batch would stall every other client meanwhile).
        offsets = await self._run_to_end(
            lambda: self._reserve_slots(sizes),
            inline=not self.store.has_nvme and len(sizes) <= 64, release=self._release_slots)
        return self._reservations(conn, meta["keys"], offsets, sizes)

    def _reserve_slots(self, sizes: list[int], protect: set[bytes] | None = None
                       ) -> list[int]:
        """DRAM slots for the leading sizes that find room, evicting no key of ``protect``
        (worker thread or lock held)."""
        offsets: list[int] = []
        try:
            for nbytes in sizes:
                offset = self.store.reserve_host(nbytes, protect)
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
        """File reserved slots under new handles of ``conn``; the reserve answer."""
        deadline = time.monotonic() + self.config.lease_s
        handles = []
        for key, offset, nbytes in zip(keys, offsets, sizes, strict=False):
            handle = next(self._handles)
            scoped = None if key is None else conn.scope(key)  # None: a spare slot
            conn.reservations[handle] = _Reservation(scoped, offset, nbytes, deadline)
            handles.append(handle)
        return {"handles": handles, "offsets": offsets}, []

    def _take(self, table: dict[int, Any], handles: list[int]) -> list[Any]:
        missing = [h for h in handles if h not in table]
        if missing or len(set(handles)) != len(handles):
            raise RequestError(ErrorCode.UNKNOWN_HANDLE,
                               f"handles {missing or handles} are not held by this connection "
                               "(expired after the lease, or never given)")
        return [table.pop(h) for h in handles]

    async def _op_commit(self, conn: Connection, meta: dict[str, Any], data: bytes) -> Any:
        """Commit reservations in order, as one chain (each the parent of the next), to
        their reserved keys or to ``keys``; then reserve spare slots of ``reserve_sizes``
        for the client's next puts (answered as ``handles`` and ``offsets``)."""
        keys, spare_sizes = meta.get("keys"), meta.get("reserve_sizes") or []
        if spare_sizes:
            self._check_shm(conn)
        taken = self._take(conn.reservations, meta["handles"])
        if keys is not None:
            for r, key in zip(taken, keys, strict=True):
                r.key = conn.scope(key)
        if any(r.key is None for r in taken):
            for r in taken:
                self.store.release_host(r.offset)
            raise RequestError(ErrorCode.BAD_REQUEST, "a spare slot is committed with keys")

        def commit() -> tuple[int, list[int]]:
            parent = None
            for i, r in enumerate(taken):
                try:
                    self.store.commit_host(r.key, r.offset, r.nbytes, parent)
                except BaseException:
                    for rest in taken[i:]:
                        self.store.release_host(rest.offset)
                    raise
                parent = r.key
            # A spare is a guess at the next put: it may evict as that put would, but
            # never what was just stored (in a full pool the spare's room would otherwise
            # come from the value this commit acknowledges).
            return len(taken), self._reserve_slots(spare_sizes, {r.key for r in taken})

        # The reservations are no longer in the table, so once taken they must be committed
        # (or released) even if the deadline passes before a worker thread is free: the
        # store call is shielded, and spares it reserves after a deadline are given back.
        stored, offsets = await self._run_to_end(
            commit, inline=not (spare_sizes and self.store.has_nvme),  # NVMe: a thread
            release=lambda result: self._release_slots(result[1]))
        self._count_in_bytes(sum(r.nbytes for r in taken))
        spares, _ = self._reservations(conn, [None] * len(offsets), offsets, spare_sizes)
        return {"stored": stored, **spares}, []

    async def _op_abort(self, conn: Connection, meta: dict[str, Any], data: bytes) -> Any:
        taken = self._take(conn.reservations, meta["handles"])
        await self._run_short(self._release_slots, [r.offset for r in taken],
                              shield=True)  # shielded as in commit
        return {}, []

    async def _op_pin(self, conn: Connection, meta: dict[str, Any], data: bytes) -> Any:
        """Pin the blocks held in DRAM: [offset, nbytes, handle] each, nil for the others
        (not in DRAM or absent: the client fetches those with get_many)."""
        self._check_shm(conn)
        deadline = time.monotonic() + self.config.lease_s
        keys = [conn.scope(k) for k in meta["keys"]]
        pinned = await self._run_short(lambda: [self.store.pin_host(k) for k in keys])
        blocks: list[list[int] | None] = []
        for key, found in zip(keys, pinned, strict=True):
            if found is None:
                blocks.append(None)
                continue
            offset, nbytes, pin = found
            handle = next(self._handles)
            conn.pins[handle] = _Pin(key, pin, deadline)
            blocks.append([offset, nbytes, handle])
        return {"blocks": blocks}, []

    async def _op_touch(self, conn: Connection, meta: dict[str, Any], data: bytes) -> Any:
        """Blocks the client copied straight from the pool, found through the directory:
        counted as DRAM hits and made the most recently used, as a pin would have."""
        self._check_shm(conn)
        keys = [conn.scope(k) for k in meta["keys"]]
        await self._run_short(self.store.touch_host, keys)
        return {}, []

    async def _op_unpin(self, conn: Connection, meta: dict[str, Any], data: bytes) -> Any:
        """Release pins; ``intact[i]`` False means that copy may be torn (drop it)."""
        taken = self._take(conn.pins, meta["handles"])
        intact = await self._run_short(
            lambda: [self.store.unpin_host(p.key, p.pin) for p in taken], shield=True)
        return {"intact": intact}, []

    # -- leases -----------------------------------------------------------------------------------

    def _release_all(self, conn: Connection | _Expired) -> None:
        """Give back reservations and drop pins (a closed connection's, or expired ones)."""
        if not conn.reservations and not conn.pins:
            return
        for r in conn.reservations.values():
            self.store.release_host(r.offset)
        for p in conn.pins.values():
            with contextlib.suppress(KVStoreError):  # nobody copies from these any more
                self.store.unpin_host(p.key, p.pin, after_copy=False)
        if isinstance(conn, Connection):
            log.info("released %d reservations and %d pins of peer=%s",
                     len(conn.reservations), len(conn.pins), conn.peer)
        conn.reservations.clear()
        conn.pins.clear()

    async def _keep_directory_alive(self) -> None:
        """Stamp the pool directory's heartbeat while the loop runs: clients stop reading
        through a directory whose daemon stopped stamping (`shm_directory`, Liveness)."""
        pool = self.store.host_pool
        directory = None if pool is None else pool.directory
        while directory is not None:
            directory.beat()
            await asyncio.sleep(BEAT_S)

    async def _sweep_leases(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            now = time.monotonic()
            for conn in list(self._connections):
                expired = _Expired(
                    {h: conn.reservations.pop(h) for h, r in list(conn.reservations.items())
                     if r.deadline < now},
                    {h: conn.pins.pop(h) for h, p in list(conn.pins.items()) if p.deadline < now})
                if expired.reservations or expired.pins:
                    log.warning("lease expired peer=%s: %d reservations and %d pins released",
                                conn.peer, len(expired.reservations), len(expired.pins))
                    await self._run(self._release_all, expired)

"""The daemon: one `kvstore.Store` served to many clients over asyncio.

    client ──frames (kvstore.wire)──> TCP connection (daemon.tcp) ──────┐
                                     UCX endpoint (daemon.streams) ───┴─> `Daemon.reply`
                                                                             │ handlers[op]
           Daemon: hello, doorbell, stats ─┬─ StoreOperations (daemon.operations) ─> Store
                                           └─ SharedMemoryPlane (daemon.shm_plane) ─┘
    same-host client ──maps /dev/shm/NAME──> the Store's DRAM pool (reserve/commit, pin/unpin)

One event loop owns the connections, handles and leases. Every operation a request may
name (`kvstore.wire.ops.OPERATIONS`) has one handler in one dispatch table,
`Daemon.handlers`: the daemon's own (hello, doorbell, stats), the Store's
(`daemon.operations`) and the shared-memory data plane's (`daemon.shm_plane`, which owns
the handles and leases). A Store call that may wait on NVMe I/O runs in a worker thread
(`daemon.store_calls`: the Store is thread-safe; the loop must never stall); a short one
runs on the loop when the store lock is free, and its request is then answered in the
callback that received it. Each connection serves its requests in order; concurrency
comes from many connections.

Memory (`daemon.frame_memory`): a request frame carries at most ``max_frame_data_bytes``
of data and a get_many answer at most ``max_answer_data_bytes`` of values (the client asks
again for the rest); the large bodies of all connections share one budget, and memory goes
back to the system once a burst of large frames is over.

Shutdown (SIGTERM): stop accepting, let requests in flight finish (up to ``drain_s``),
write out the access log, close the Store (which flushes NVMe), stop metrics and the
registry.

Prefix lookups (`match_prefix`, asked once per engine request) are counted on the loop
(``stats()["prefix"]``: lookups, blocks queried and hit, and tokens as blocks times
``config.block_tokens``; `daemon.read_stats`) and, with ``--access-log``, logged
(`daemon.access_log`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any

from daemon import segments
from daemon.access_log import AccessLog
from daemon.answering import Answer, Handler, Request, within
from daemon.config import DaemonConfig
from daemon.connection import Connection
from daemon.doorbell import Doorbells
from daemon.frame_memory import (
    FrameMemory,
    default_budget_bytes,
    max_answer_data_bytes,
    max_frame_data_bytes,
)
from daemon.host_memory import check_pool_fits
from daemon.operations import StoreOperations
from daemon.read_stats import ReadStats
from daemon.scope import load_scope_key
from daemon.shm_plane import SharedMemoryPlane
from daemon.store_calls import StoreCalls
from daemon.tcp import OWN_BUFFER_BYTES, FrameProtocol
from daemon.tenants import (
    DEFAULT_NAMESPACE,
    PEER_TENANT,
    Tenants,
    grants,
)
from kvstore.errors import KVStoreError, StorageError
from kvstore.keys import namespace_secret
from kvstore.shm.mapping import boot_id
from kvstore.store import Store
from kvstore.wire import error_codes, frames, ops
from kvstore.wire.error_codes import ErrorCode, RequestError

log = logging.getLogger(__name__)


def bind_error(flag: str, address: str, error: OSError) -> OSError:
    """A listener's bind failure as an error that names the flag that chose the address."""
    reason = (os.strerror(error.errno) if error.errno and error.errno > 0
              else error.strerror or str(error))
    return OSError(error.errno, f"{flag} {address}: cannot listen there ({reason})")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.partition("%")[0]).is_loopback
    except ValueError:
        return False


class Daemon:
    """Serve a Store; `start`, then `serve_until_stopped` (or `stop`)."""

    def __init__(self, config: DaemonConfig, *, check_stop: Callable[[], None] | None = None
                 ) -> None:
        """Build the Store: first reclaim what dead daemons left in /dev/shm, then check
        that the DRAM pool fits the machine (`ConfigError` if not, unless ``force``);
        ``check_stop`` runs between chunks of the pool (what it raises stops it all).
        With ``config.metrics``, the daemon keeps its Prometheus metrics (``metrics``)."""
        self.config = config
        self.tenants = Tenants.load(config.token_file)
        # Metrics first: nothing to undo if they fail; they read the Store when scraped.
        self.metrics: Any | None = None
        if config.metrics is not None:
            from daemon.metrics import DaemonMetrics

            self.metrics = DaemonMetrics(self._metrics_stats)
        segments.reclaim_dead()
        if config.dram_bytes:
            check_pool_fits(config.dram_bytes, shared=config.shared_memory, force=config.force)
        # Opened before the Store, so that a bad path leaves no shared memory behind.
        self.access_log = (None if config.access_log is None else
                           AccessLog(config.access_log, block_tokens=config.block_tokens))
        self.shm_name = segments.new_pool_name()
        try:
            self.store = Store(config.store_config(self.shm_name), check_stop=check_stop)
        except BaseException:
            if self.access_log is not None:
                self.access_log.close_unstarted()
            raise
        self.cluster_secret: bytes | None = None
        try:  # after the Store: the default file is in the NVMe directory it makes
            if config.redis_url is not None:  # a node of a pool: the pool's scope key
                from daemon.cluster import load_cluster_secret
                from kvstore.cluster.peers import scope_key_of

                self.cluster_secret = load_cluster_secret(config)
                self.scope_key = scope_key_of(self.cluster_secret)
            else:
                self.scope_key = load_scope_key(config.scope_key_path)
        except BaseException:
            self.store.close()
            if self.access_log is not None:
                self.access_log.close_unstarted()
            raise
        self.boot_id = boot_id()
        max_value_bytes = self.store.config.max_value_bytes
        self.max_frame_data_bytes = max_frame_data_bytes(max_value_bytes)
        self.calls = StoreCalls(self.store, config.workers)
        self.frame_memory = FrameMemory(
            config.frame_memory_bytes or default_budget_bytes(max_value_bytes),
            executor=self.calls.executor)
        self.read_stats = ReadStats(config.block_tokens)
        self.store_ops = StoreOperations(
            self.calls, self.read_stats, metrics=self.metrics, access_log=self.access_log,
            max_answer_data_bytes=max_answer_data_bytes(max_value_bytes))
        self.shm = SharedMemoryPlane(self.calls, self.read_stats, lease_s=config.lease_s,
                                     metrics=self.metrics)
        self.cluster: Any | None = None  # the pool, once joined (`join_cluster`)
        self.handlers = self._dispatch_table()
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[Connection] = set()
        self._stopping = asyncio.Event()
        self._closed = False
        self._sweeper: asyncio.Task[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self.address: tuple[str, int] | None = None
        self.started_at = time.time()
        self._set_quotas()
        self.doorbells: Doorbells | None = None

    def _dispatch_table(self) -> dict[str, Handler]:
        """Every operation of the wire, and the one handler that serves it."""
        store, shm = self.store_ops, self.shm
        handlers: dict[str, Handler] = {
            "hello": self.hello, "doorbell": self.doorbell, "stats": self.stats,
            "put": store.put, "put_many": store.put_many, "get": store.get,
            "get_many": store.get_many, "match_prefix": store.match_prefix,
            "contains": store.contains, "delete": store.delete, "tier_of": store.tier_of,
            "tier_bits": store.tier_bits, "put_in_tier": store.put_in_tier,
            "flush": store.flush,
            "reserve": shm.reserve, "commit": shm.commit, "abort": shm.abort,
            "pin": shm.pin, "unpin": shm.unpin, "touch": shm.touch,
            "peer_get": self._peer_op("peer_get"), "peer_held": self._peer_op("peer_held"),
            "peer_drop": self._peer_op("peer_drop"), "peer_put": self._peer_op("peer_put"),
        }
        assert handlers.keys() == ops.OPERATIONS, \
            f"no handler for {ops.OPERATIONS - handlers.keys()} or no operation for " \
            f"{handlers.keys() - ops.OPERATIONS}"
        return handlers

    def _peer_op(self, name: str) -> Handler:
        """The handler of a peer operation: the pool's (`daemon.cluster`), once this
        daemon has joined one."""
        async def handler(conn: Connection, meta: dict[str, Any], data: bytes) -> Any:
            if self.cluster is None:
                raise RequestError(ErrorCode.FORBIDDEN, "this daemon is in no cluster")
            if name == "peer_put":
                return await self.cluster.peer_put(self.calls, conn, meta, data)
            return await getattr(self.cluster, name)(self.calls, conn, meta)
        return handler

    def _metrics_stats(self) -> dict[str, Any]:
        """What a metrics scrape reads: the store's figures, and the pool's if any."""
        stats = self.store.stats()
        if self.cluster is not None:
            stats["cluster"] = self.cluster.stats()
        return stats

    def join_cluster(self, member: Any) -> None:
        """Serve the pool (`daemon.cluster.ClusterMember`): peers' operations, and the
        remote tier for this daemon's clients."""
        self.cluster = member
        self.store_ops.cluster = member
        self.shm.cluster = member

    def _set_quotas(self) -> None:
        """The token file's quotas, on the tiers this daemon has (others: a warning)."""
        tiers = self.store.config.tier_names
        for tenant in self.tenants.all():
            for tier, nbytes in tenant.quota_bytes:
                if tier in tiers:
                    self.store.set_quota(tenant.owner, tier, nbytes)
                else:
                    log.warning("tenant %s has a quota for %s, which this daemon does not "
                                "have; ignored", tenant.name, tier)

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        host, port = self.config.listen_address
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(lambda: FrameProtocol(self), host, port)
        except OSError as e:
            raise bind_error("--listen", self.config.listen, e) from e
        self.address = self._server.sockets[0].getsockname()[:2]
        if self.config.token_file is None and not all(
                _is_loopback(sock.getsockname()[0]) for sock in self._server.sockets):
            log.warning("listening on %s, not a loopback address, with no --token-file: "
                        "anyone who reaches this port can read and write every block "
                        "(give --token-file to require tokens)", self.config.listen)
        pool = self.store.host_pool
        if pool is not None and pool.shm_name:  # same-host clients commit through these
            self.doorbells = Doorbells(self, segments.doorbell_directory(pool.shm_name))
            await self.doorbells.start()
        self._sweeper = asyncio.create_task(self.shm.sweep_leases(self._connections),
                                            name="kvstored-sweeper")
        self._heartbeat = asyncio.create_task(self.shm.keep_directory_alive(),
                                              name="kvstored-directory-heartbeat")
        if self.access_log is not None:
            await self.access_log.start()
        pool = self.store.host_pool
        log.info("kvstored listening on %s:%d tiers=%s shm=%s", *self.address,
                 ",".join(self.store.config.tier_names),
                 pool.shm_name if pool is not None and pool.shm_name else "off")

    def request_stop(self) -> None:
        self._stopping.set()

    @property
    def is_stopping(self) -> bool:
        """Stopping or stopped: no new connection or request is served."""
        return self._stopping.is_set()

    @property
    def is_closed(self) -> bool:
        """`stop` has begun (a connection cancelled now is being drained, not failing)."""
        return self._closed

    async def serve_until_stopped(self) -> None:
        await self._stopping.wait()
        await self.stop()

    async def stop(self) -> None:
        """Drain and close; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        if self._server is not None:
            self._server.close()
        connections = list(self._connections)
        busy = sum(conn.busy for conn in connections)
        for conn in connections:
            conn.stop()  # an idle one hangs up now, a busy one once its request is answered
        if busy:
            log.info("draining %d requests in flight (up to %.1f s)", busy,
                     self.config.drain_s)
        if connections:  # answers already queued are written before a connection ends
            await asyncio.wait([conn.closed for conn in connections],
                               timeout=self.config.drain_s)
        for conn in connections:
            if not conn.closed.done():
                conn.kill()
        await asyncio.gather(*(conn.closed for conn in connections), return_exceptions=True)
        if self.doorbells is not None:
            await self.doorbells.stop()
        for task in (self._sweeper, self._heartbeat):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self.frame_memory.close()
        if self.access_log is not None:
            await self.access_log.aclose()  # every lookup answered is in it now
        try:
            await self.calls.run(self.store.close)  # flushes NVMe
        except StorageError as e:  # the disk failed: what was on it stays, the rest is gone
            log.error("kvstored stopped; the store is closed but not everything it held was "
                      "written to NVMe: %s", e)
        else:
            log.info("kvstored stopped; store closed and flushed")
        self.calls.shutdown()

    # -- connections (served by daemon.tcp and daemon.streams) ---------------------------------

    def connected(self, conn: Connection) -> None:
        self._connections.add(conn)
        if self.metrics is not None:
            self.metrics.client_connected()
        log.info("client connected peer=%s", conn.peer)

    async def disconnected(self, conn: Connection, reason: str) -> None:
        """Give back what a connection held; once per connection, however it ended."""
        self._connections.discard(conn)
        if self.doorbells is not None:
            self.doorbells.forget(conn)
        await self.shm.release_connection(conn)
        if self.metrics is not None:
            self.metrics.client_disconnected()
        log.info("client disconnected peer=%s tenant=%s reason=%s", conn.peer,
                 conn.tenant.name if conn.tenant else "-", reason)

    # -- requests -----------------------------------------------------------------------------

    @staticmethod
    def check_large_body(conn: Connection, nbytes: int) -> None:
        if conn.tenant is None:  # a hello is small: nothing large before it
            raise RequestError(ErrorCode.BAD_FRAME, f"a frame of {nbytes} bytes before hello")

    def start_request(self, conn: Connection, header: frames.Header, raw_meta: bytes,
                      data: Any, request: Request) -> Coroutine[Any, Any, Any]:
        """Check one whole request (filling in ``request``) and return its handler, not
        started; raises what `answer_error` answers."""
        meta = frames.decode_meta(raw_meta, frames.MAX_REQUEST_CONTAINERS)
        request.id, request.op, request.timeout_s = ops.check_request(meta, header.data_bytes)
        if request.op != "hello" and conn.tenant is None:
            raise RequestError(ErrorCode.AUTH_REQUIRED, "the first request must be hello")
        return self.handlers[request.op](conn, meta, data)

    async def reply(self, conn: Connection, header: frames.Header, raw_meta: bytes,
                    data: Any) -> Answer:
        """Run one whole request under its deadline; its answer."""
        request = Request()
        try:
            handler = self.start_request(conn, header, raw_meta, data, request)
            result = await within(handler, request.timeout_s)
        except BaseException as e:
            return self.answer_error(conn, request, e)
        return self.answer_ok(request, result)

    @staticmethod
    def answer_ok(request: Request, result: tuple[dict[str, Any], list[Any]]) -> Answer:
        fields, out = result
        return {"id": request.id, "ok": True, **fields}, out, True, request.op

    def answer_error(self, conn: Connection, request: Request, error: BaseException
                     ) -> Answer:
        """The answer to a request that raised ``error`` (re-raised if it is a
        cancellation); a broken frame or a refused hello also ends the connection."""
        if isinstance(error, TimeoutError):
            error = RequestError(ErrorCode.DEADLINE_EXCEEDED,
                                 f"{request.op} did not finish within {request.timeout_s:g} s; "
                                 "it may still take effect")
        if not isinstance(error, Exception):  # cancelled: the connection is going away
            raise error
        if not isinstance(error, KVStoreError):  # RequestError is one
            log.error("internal error peer=%s op=%s", conn.peer, request.op, exc_info=error)
            return ({"id": request.id, "ok": False, "code": ErrorCode.INTERNAL.value,
                     "message": f"internal error: {type(error).__name__}: {error}"}, [], True,
                    request.op)
        code = error_codes.code_of(error)
        request_id = getattr(error, "request_id", request.id)
        keep_open = code not in (ErrorCode.BAD_FRAME, ErrorCode.UNSUPPORTED_VERSION,
                                 ErrorCode.AUTH_FAILED)
        log.warning("request failed peer=%s op=%s code=%s: %s", conn.peer, request.op,
                    code.value, error)
        if self.metrics is not None:
            self.metrics.error(code.value)
        return ({"id": request_id, "ok": False, "code": code.value, "message": str(error)},
                [], keep_open, request.op)

    def observe(self, op: str, started: float, ok: bool, data_bytes: int) -> None:
        if data_bytes > OWN_BUFFER_BYTES:  # its values go back to the heap once written
            self.frame_memory.note_use()
        if self.metrics is not None:
            self.metrics.observe_request(op, time.perf_counter() - started, ok)
            if data_bytes:
                self.metrics.record_transfer("out", data_bytes)

    # -- the daemon's own operations: each returns (response fields, data parts) --------------

    async def hello(self, conn: Connection, meta: dict[str, Any], data: bytes) -> Any:
        if meta["version"] != frames.PROTOCOL_VERSION:
            raise RequestError(ErrorCode.UNSUPPORTED_VERSION,
                               f"client speaks protocol {meta['version']}, daemon "
                               f"{frames.PROTOCOL_VERSION}")
        if self.cluster is not None and self.cluster.is_peer_token(meta["token"]):
            conn.tenant, conn.is_peer = PEER_TENANT, True
            log.info("peer hello peer=%s", conn.peer)
            return {"version": frames.PROTOCOL_VERSION, "node_id": self.cluster.node_id,
                    "namespace": None, "max_value_bytes": self.store.config.max_value_bytes,
                    "max_frame_data_bytes": self.max_frame_data_bytes,
                    "lease_s": self.config.lease_s, "tiers": self.store.config.tier_names,
                    "shm": None}, []
        tenant = self.tenants.authenticate(meta["token"])
        if tenant is None:
            raise RequestError(ErrorCode.AUTH_FAILED, "invalid or missing token")
        namespace = meta["namespace"] or tenant.default_namespace()
        if namespace is None and self.tenants.is_open:
            namespace = DEFAULT_NAMESPACE
        if namespace is not None and not grants(tenant, namespace):
            raise RequestError(ErrorCode.FORBIDDEN,
                               f"the token does not grant namespace {namespace!r}")
        # A token of several namespaces that names none may still ask for stats; its key
        # operations are refused (Connection.scope) until it names one.
        conn.tenant, conn.namespace = tenant, namespace
        conn.secret = b"" if namespace is None else namespace_secret(namespace, self.scope_key)
        pool = self.store.host_pool
        # (no namespace, no keys: nothing to put or get through the pool either)
        conn.shared_memory = bool(meta["shm"] and tenant.can_share_memory and pool is not None
                                  and pool.shm_name and namespace is not None)
        log.info("client hello peer=%s tenant=%s namespace=%s shm=%s", conn.peer, tenant.name,
                 namespace, conn.shared_memory)
        return {
            "version": frames.PROTOCOL_VERSION,
            # A node of a pool tells a client its namespace's secret (as it does a
            # shared-memory client's): a cluster-aware client looks its keys up in the
            # pool's index, where they are stored scoped (kvstore.cluster.client).
            **({"scope": conn.secret} if self.cluster is not None and conn.secret else {}),
            "node_id": self.config.node_id or f"{socket.gethostname()}:{self.address[1]}",
            "namespace": namespace,
            "max_value_bytes": self.store.config.max_value_bytes,
            "max_frame_data_bytes": self.max_frame_data_bytes,
            "lease_s": self.config.lease_s,
            "tiers": self.store.config.tier_names,
            "shm": ({"name": pool.shm_name, "nbytes": pool.nbytes, "boot_id": self.boot_id,
                     "directory": pool.directory.name if pool.directory is not None else None,
                     # to look its own keys up in the directory: scoped as the daemon does
                     "scope": conn.secret or None}
                    if conn.shared_memory else None),
        }, []

    async def doorbell(self, conn: Connection, meta: dict[str, Any], data: bytes) -> Any:
        """Where and how this shared-memory connection rings its commit doorbell."""
        conn.check_shared_memory()
        if self.doorbells is None:
            raise RequestError(ErrorCode.FORBIDDEN, "this daemon has no commit doorbell")
        return {"path": self.doorbells.path, "secret": self.doorbells.issue(conn)}, []

    async def stats(self, conn: Connection, meta: dict[str, Any], data: bytes) -> Any:
        """The whole store's figures for an admin (or without a token file: one trusted
        tenant); for any other tenant only its own: its blocks and quotas per tier, its
        reads and prefix lookups."""
        assert conn.tenant is not None
        if not conn.tenant.is_admin:
            usage = await self.calls.run_short(self.store.usage, conn.tenant.owner)
            return {"stats": self._tenant_stats(conn, usage)}, []
        stats = await self.calls.run_short(self.store.stats)
        stats["clients"] = len(self._connections)
        stats["started_at"] = self.started_at
        stats["uptime_s"] = time.time() - self.started_at
        stats["prefix"] = self.read_stats.prefix_figures(self.read_stats.total)
        stats["leases"] = self.shm.lease_stats.as_dict()
        if self.cluster is not None:
            stats["cluster"] = self.cluster.stats()
        if not self.tenants.is_open:
            stats["tenants"] = await self.calls.run_short(
                lambda: {t.name: self.store.usage(t.owner) for t in self.tenants.all()})
        return {"stats": stats}, []

    def _tenant_stats(self, conn: Connection, usage: dict[str, Any]) -> dict[str, Any]:
        """What one tenant may see (``usage``: its blocks per tier): nothing of another's."""
        tenant = conn.tenant
        assert tenant is not None
        counts = self.read_stats.of(tenant.owner)
        tiers = {name: {"capacity_bytes": (figures["quota_bytes"]
                                           if figures["quota_bytes"] is not None
                                           else capacity),
                        "used_bytes": figures["used_bytes"], "blocks": figures["blocks"],
                        "quota_bytes": figures["quota_bytes"]}
                 for (name, figures), capacity in zip(
                     usage.items(), self.store.capacities().values(), strict=True)}
        return {"tenant": tenant.name, "namespaces": sorted(tenant.namespaces),
                "tiers": tiers,
                "queries": counts.num_gets, "hits": counts.num_get_hits,
                "hit_rate": counts.num_get_hits / counts.num_gets if counts.num_gets else 0.0,
                "prefix": self.read_stats.prefix_figures(counts),
                "started_at": self.started_at, "uptime_s": time.time() - self.started_at}

    def health(self) -> tuple[bool, dict[str, Any]]:
        ok = not self.is_stopping
        return ok, {"status": "ok" if ok else "stopping", "clients": len(self._connections)}

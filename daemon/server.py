"""The daemon: one `kvstore.Store` served to many clients over asyncio.

    client ──frames (kvstore.protocol)──> TCP connection (daemon.tcp) ──┐
                                         UCX endpoint (`_serve`) ─────┴─> `_reply` ──> Store
    same-host client ──maps /dev/shm/NAME──> the Store's DRAM pool (reserve/commit, pin/unpin)

One event loop owns the connections, handles and leases. A Store call that may wait on
NVMe I/O runs in a worker thread (the Store is thread-safe; the loop must never stall); a
short one runs on the loop when the store lock is free, and its request is then answered
in the callback that received it. Each connection serves its requests in order;
concurrency comes from many connections. The shared-memory operations and their leases
are `daemon.shm_plane`'s.

Memory (`daemon.frame_memory`): a request frame carries at most ``max_frame_data_bytes``
of data and a get_many answer at most ``max_answer_data_bytes`` of values (the client asks
again for the rest); the large bodies of all connections share one budget, and memory goes
back to the system once a burst of large frames is over.

Shutdown (SIGTERM): stop accepting, let requests in flight finish (up to ``drain_s``),
write out the access log, close the Store (which flushes NVMe), stop metrics and the
registry.

Prefix lookups (`match_prefix`, asked once per engine request) are counted on the loop
(``stats()["prefix"]``: lookups, blocks queried and hit, and tokens as blocks times
``config.block_tokens``) and, with ``--access-log``, logged (`daemon.access_log`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import itertools
import logging
import os
import socket
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from daemon import segments
from daemon.access_log import AccessLog
from daemon.answering import Answer, Request, within
from daemon.config import DaemonConfig
from daemon.doorbell import Doorbells
from daemon.frame_memory import (
    FrameMemory,
    LogThrottle,
    Share,
    default_budget_bytes,
    max_answer_data_bytes,
    max_frame_data_bytes,
)
from daemon.host_memory import check_pool_fits
from daemon.scope import load_scope_key
from daemon.shm_plane import Connection, LeaseStats, SharedMemoryPlane
from daemon.tcp import OWN_BUFFER_BYTES, FrameProtocol
from daemon.tenants import (
    DEFAULT_NAMESPACE,
    Tenants,
    grants,
)
from kvstore import protocol
from kvstore.errors import KVStoreError, StorageError
from kvstore.keys import namespace_secret
from kvstore.protocol import ErrorCode, FrameKind, RequestError
from kvstore.shm.mapping import boot_id
from kvstore.store import Store

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


@dataclass
class _Lookups:
    """Prefix lookups and block reads since start, of the daemon or of one tenant (changed
    on the loop only, so no lock)."""

    num_lookups: int = 0
    num_blocks_queried: int = 0
    num_blocks_hit: int = 0
    num_gets: int = 0      # blocks asked for: get, get_many, pin, read through the directory
    num_get_hits: int = 0


class Daemon(SharedMemoryPlane):
    """Serve a Store; `start`, then `serve_until_stopped` (or `stop`)."""

    def __init__(self, config: DaemonConfig, *, metrics: Any | None = None,
                 registry: Any | None = None, check_stop: Callable[[], None] | None = None
                 ) -> None:
        """Build the Store: first reclaim what dead daemons left in /dev/shm, then check
        that the DRAM pool fits the machine (`ConfigError` if not, unless ``force``);
        ``check_stop`` runs between chunks of the pool (what it raises stops it all)."""
        self.config = config
        self.tenants = Tenants.load(config.token_file)
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
        try:  # after the Store: the default file is in the NVMe directory it makes
            self.scope_key = load_scope_key(config.scope_key_path)
        except BaseException:
            self.store.close()
            if self.access_log is not None:
                self.access_log.close_unstarted()
            raise
        self.metrics = metrics
        self.registry = registry
        self.boot_id = boot_id()
        max_value_bytes = self.store.config.max_value_bytes
        self.max_frame_data_bytes = max_frame_data_bytes(max_value_bytes)
        self.max_answer_data_bytes = max_answer_data_bytes(max_value_bytes)
        self._executor = ThreadPoolExecutor(config.workers, thread_name_prefix="kvstored")
        self.frame_memory = FrameMemory(
            config.frame_memory_bytes or default_budget_bytes(max_value_bytes),
            executor=self._executor)
        self._cut_log = LogThrottle()
        self._handles = itertools.count(1)
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[Connection] = set()
        self._stopping = asyncio.Event()
        self._closed = False
        self._sweeper: asyncio.Task[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self.address: tuple[str, int] | None = None
        self.started_at = time.time()
        self._lookups = _Lookups()
        self._tenant_counts: dict[int, _Lookups] = {}  # owner -> its own
        self._set_quotas()
        self.lease_stats = LeaseStats()
        self.doorbells: Doorbells | None = None

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

    def _count_reads(self, conn: Connection, num_asked: int, num_hit: int) -> None:
        """Blocks ``conn``'s tenant asked for and found (its own stats)."""
        counts = self._tenant_counts.get(conn.owner)
        if counts is None:
            counts = self._tenant_counts[conn.owner] = _Lookups()
        counts.num_gets += num_asked
        counts.num_get_hits += num_hit

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
        self._sweeper = asyncio.create_task(self._sweep_leases(), name="kvstored-sweeper")
        self._heartbeat = asyncio.create_task(self._keep_directory_alive(),
                                              name="kvstored-directory-heartbeat")
        if self.access_log is not None:
            await self.access_log.start()
        pool = self.store.host_pool
        log.info("kvstored listening on %s:%d tiers=%s shm=%s", *self.address,
                 ",".join(self.store.config.tier_names),
                 pool.shm_name if pool is not None and pool.shm_name else "off")

    def request_stop(self) -> None:
        self._stopping.set()

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
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self.store.close)  # flushes NVMe
        except StorageError as e:  # the disk failed: what was on it stays, the rest is gone
            log.error("kvstored stopped; the store is closed but not everything it held was "
                      "written to NVMe: %s", e)
        else:
            log.info("kvstored stopped; store closed and flushed")
        self._executor.shutdown(wait=True)

    # -- connections --------------------------------------------------------------------------

    def _connected(self, conn: Connection) -> None:
        self._connections.add(conn)
        if self.metrics is not None:
            self.metrics.client_connected()
        log.info("client connected peer=%s", conn.peer)

    async def _disconnected(self, conn: Connection, reason: str) -> None:
        """Give back what a connection held; once per connection, however it ended."""
        self._connections.discard(conn)
        if self.doorbells is not None:
            self.doorbells.forget(conn)
        await self._release_connection(conn)
        if self.metrics is not None:
            self.metrics.client_disconnected()
        log.info("client disconnected peer=%s tenant=%s reason=%s", conn.peer,
                 conn.tenant.name if conn.tenant else "-", reason)

    async def _serve(self, reader: Any, writer: Any) -> None:
        """Serve one connection given as a stream (a UCX endpoint's `UcxStream`; TCP goes
        through `daemon.tcp.FrameProtocol`, which answers the same way without streams)."""
        task = asyncio.current_task()
        assert task is not None
        peername = writer.get_extra_info("peername")
        conn = Connection(peer=f"{peername[0]}:{peername[1]}" if peername else "?")
        conn.stop = lambda: None if conn.busy else task.cancel()  # busy: ends after it
        conn.kill, conn.closed = task.cancel, task
        self._connected(conn)
        reason = "closed by client"
        try:
            while not self._stopping.is_set():
                try:
                    # Idle between requests may last; a started frame must finish in time.
                    first = await reader.readexactly(1)
                    rest, = await self._read_in_time(reader, protocol.HEADER_BYTES - 1)
                    raw = first + rest
                except asyncio.IncompleteReadError:
                    break
                conn.busy = True
                keep_open = await self._answer(conn, raw, reader, writer)
                conn.busy = False
                if not keep_open:
                    reason = "bad frame"
                    await writer.linger(self.config.frame_timeout_s)  # the answer arrives
                    break
            else:
                reason = "daemon stopping"
        except asyncio.CancelledError:
            reason = "daemon stopping"
            if not self._closed:
                raise
            # stop() cancelled this idle connection: end normally
        except (ConnectionError, TimeoutError) as e:
            reason = f"connection lost ({type(e).__name__})"
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)
            await self._disconnected(conn, reason)

    async def _answer(self, conn: Connection, raw: bytes, reader: Any, writer: Any) -> bool:
        """Read the rest of one request from a stream, run it, write the response; False
        to hang up."""
        started = time.perf_counter()
        share: Share | None = None
        try:
            header = protocol.decode_header(raw, max_data_bytes=self.max_frame_data_bytes,
                                            expect=FrameKind.REQUEST)
            share = await self._share_of(conn, header)
            try:
                raw_meta, data = await self._read_in_time(reader, header.meta_bytes,
                                                          header.data_bytes)
            except TimeoutError:
                # Half a frame was read: the stream cannot be resynchronised, so hang up.
                raise ConnectionError("frame not complete within the frame timeout") from None
        except asyncio.IncompleteReadError:
            raise ConnectionError("frame cut short") from None
        except RequestError as e:
            answer = self._answer_error(conn, Request(), e)
        else:
            answer = await self._reply(conn, header, raw_meta, data)
        finally:
            if share is not None:  # the body lies in ucxx's buffers: nothing to reuse
                self.frame_memory.give_back(share, reuse=False)
        response, out, keep_open, op = answer
        data_bytes = sum(len(part) for part in out)
        writer.write(protocol.encode(FrameKind.RESPONSE, response, data_bytes))
        for part in out:
            writer.write(part)
        async with asyncio.timeout(self.config.frame_timeout_s):
            await writer.drain()
        self._observe(op, started, response["ok"], data_bytes)
        return keep_open

    async def _share_of(self, conn: Connection, header: protocol.Header) -> Share | None:
        """A stream's share of the frame memory for a large body, taken before the body is
        read (waiting, unread and untimed, while it does not fit); None for a small one.

        Over UCX this bounds what the daemon reads on, not what ucxx received: ucxx takes
        each message whole, into buffers of the sizes its sender announced, before the
        daemon sees the frame's header (so a body sent with its header is already here)."""
        nbytes = header.meta_bytes + header.data_bytes
        if nbytes <= OWN_BUFFER_BYTES:
            return None
        self._check_large_body(conn, nbytes)
        return await self.frame_memory.take(nbytes, conn.peer)

    @staticmethod
    def _check_large_body(conn: Connection, nbytes: int) -> None:
        if conn.tenant is None:  # a hello is small: nothing large before it
            raise RequestError(ErrorCode.BAD_FRAME, f"a frame of {nbytes} bytes before hello")

    def _start(self, conn: Connection, header: protocol.Header, raw_meta: bytes, data: Any,
               request: Request) -> Coroutine[Any, Any, Any]:
        """Check one whole request (filling in ``request``) and return its handler, not
        started; raises what `_answer_error` answers."""
        meta = protocol.decode_meta(raw_meta, protocol.MAX_REQUEST_CONTAINERS)
        request.id, request.op, request.timeout_s = protocol.check_request(meta,
                                                                           header.data_bytes)
        if request.op != "hello" and conn.tenant is None:
            raise RequestError(ErrorCode.AUTH_REQUIRED, "the first request must be hello")
        return getattr(self, f"_op_{request.op}")(conn, meta, data)

    async def _reply(self, conn: Connection, header: protocol.Header, raw_meta: bytes,
                     data: Any) -> Answer:
        """Run one whole request under its deadline; its answer."""
        request = Request()
        try:
            handler = self._start(conn, header, raw_meta, data, request)
            result = await within(handler, request.timeout_s)
        except BaseException as e:
            return self._answer_error(conn, request, e)
        return self._answer_ok(request, result)

    @staticmethod
    def _answer_ok(request: Request, result: tuple[dict[str, Any], list[Any]]) -> Answer:
        fields, out = result
        return {"id": request.id, "ok": True, **fields}, out, True, request.op

    def _answer_error(self, conn: Connection, request: Request, error: BaseException
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
        code = protocol.code_of(error)
        request_id = getattr(error, "request_id", request.id)
        keep_open = code not in (ErrorCode.BAD_FRAME, ErrorCode.UNSUPPORTED_VERSION,
                                 ErrorCode.AUTH_FAILED)
        log.warning("request failed peer=%s op=%s code=%s: %s", conn.peer, request.op,
                    code.value, error)
        if self.metrics is not None:
            self.metrics.error(code.value)
        return ({"id": request_id, "ok": False, "code": code.value, "message": str(error)},
                [], keep_open, request.op)

    def _observe(self, op: str, started: float, ok: bool, data_bytes: int) -> None:
        if data_bytes > OWN_BUFFER_BYTES:  # its values go back to the heap once written
            self.frame_memory.note_use()
        if self.metrics is not None:
            self.metrics.observe_request(op, time.perf_counter() - started, ok)
            if data_bytes:
                self.metrics.record_transfer("out", data_bytes)

    async def _read_in_time(self, reader: Any, *sizes: int) -> list[bytes]:
        """The next parts of a started frame, of ``sizes`` bytes, within the frame timeout.
        Bytes already buffered are taken without arming a timer (most requests arrive in
        one segment; a timer costs as much as the rest of a small request's reading)."""
        if isinstance(reader, asyncio.StreamReader) and len(reader._buffer) >= sum(sizes):
            return [await reader.readexactly(n) if n else b"" for n in sizes]  # no waiting
        async with asyncio.timeout(self.config.frame_timeout_s):
            return [await reader.readexactly(n) if n else b"" for n in sizes]

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in a worker thread: calls that may wait on NVMe I/O."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args))

    async def _run_short(self, fn: Callable[..., Any], *args: Any,
                         shield: bool = False) -> Any:
        """``fn(*args)`` on the loop itself when the store lock is free (a short call with
        no disk I/O saves two thread switches), else in a worker thread (``shield``: one
        that runs to the end even if the request's deadline passes)."""
        if self.store.try_lock():
            try:
                return fn(*args)
            finally:
                self.store.unlock()
        call = self._run(fn, *args)
        return await (asyncio.shield(call) if shield else call)

    async def _run_to_end(self, fn: Callable[[], Any], *, inline: bool,
                          release: Callable[[Any], Any]) -> Any:
        """``fn()``, run to its end even if the request's deadline passes meanwhile (on the
        loop if ``inline`` and the lock is free); ``release`` gets a result nobody reads."""
        if inline and self.store.try_lock():
            try:
                return fn()
            finally:
                self.store.unlock()
        future = self._executor.submit(fn)
        try:
            return await asyncio.shield(asyncio.wrap_future(future))
        except asyncio.CancelledError:
            future.add_done_callback(
                lambda f: None if f.cancelled() or f.exception() else release(f.result()))
            raise

    def _run_put(self, nbytes: int) -> Callable[..., Any]:
        """How to run a put of ``nbytes``: on the loop when it cannot reach the disk."""
        return self._run_short if not self.store.has_nvme and nbytes <= 1 << 20 else self._run

    def _run_get(self) -> Callable[..., Any]:
        return self._run if self.store.has_nvme else self._run_short

    # -- operations: each returns (response fields, data parts) ----------------------------------

    async def _op_hello(self, conn: Connection, meta: dict[str, Any], data: bytes) -> Any:
        if meta["version"] != protocol.PROTOCOL_VERSION:
            raise RequestError(ErrorCode.UNSUPPORTED_VERSION,
                               f"client speaks protocol {meta['version']}, daemon "
                               f"{protocol.PROTOCOL_VERSION}")
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
            "version": protocol.PROTOCOL_VERSION,
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

    async def _op_doorbell(self, conn: Connection, meta: dict[str, Any], data: bytes) -> Any:
        """Where and how this shared-memory connection rings its commit doorbell."""
        self._check_shm(conn)
        if self.doorbells is None:
            raise RequestError(ErrorCode.FORBIDDEN, "this daemon has no commit doorbell")
        return {"path": self.doorbells.path, "secret": self.doorbells.issue(conn)}, []

    async def _op_put(self, conn: Connection, meta: dict[str, Any], data: bytes) -> Any:
        self._count_in(data)
        stored = await self._run_put(len(data))(
            functools.partial(self.store.put, owner=conn.owner), conn.scope(meta["key"]), data)
        return {"stored": stored}, []

    async def _op_put_many(self, conn: Connection, meta: dict[str, Any], data: bytes) -> Any:
        self._count_in(data)
        view, values, offset = memoryview(data), [], 0
        for size in meta["sizes"]:
            values.append(view[offset:offset + size])
            offset += size
        keys = [conn.scope(k) for k in meta["keys"]]
        return {"stored": await self._run_put(len(data))(
            functools.partial(self.store.put_many, owner=conn.owner), keys, values)}, []

    async def _op_get(self, conn: Connection, meta: dict[str, Any], data: bytes) -> Any:
        value = await self._run_get()(self.store.get, conn.scope(meta["key"]))
        self._count_reads(conn, 1, value is not None)
        return {"found": value is not None}, [value] if value is not None else []

    async def _op_get_many(self, conn: Connection, meta: dict[str, Any], data: bytes) -> Any:
        """The values of the leading keys whose values fit in ``max_answer_data_bytes``
        (at least one key): ``answered`` says how many when that is not all of them, and
        the others' sizes are nil (the client asks again for those)."""
        keys = [conn.scope(k) for k in meta["keys"]]
        values = await self._run_get()(self._get_leading, keys)
        sizes = [None if v is None else len(v) for v in values]
        self._count_reads(conn, len(sizes), len(sizes) - sizes.count(None))
        fields: dict[str, Any] = {"sizes": sizes + [None] * (len(keys) - len(values))}
        if len(values) < len(keys):
            fields["answered"] = len(values)
            count = self._cut_log.count()
            if count:
                log.info("get_many answer cut at %d of %d keys (%d bytes of values; limit "
                         "%d) peer=%s; %d answers cut since the last such line", len(values),
                         len(keys), sum(s or 0 for s in sizes), self.max_answer_data_bytes,
                         conn.peer, count)
        return fields, [v for v in values if v]

    def _get_leading(self, keys: list[bytes]) -> list[bytes | None]:
        return self.store.get_many(keys, max_bytes=self.max_answer_data_bytes)

    async def _op_match_prefix(self, conn: Connection, meta: dict[str, Any], data: bytes) -> Any:
        keys = [conn.scope(k) for k in meta["keys"]]
        count = await self._run_short(self.store.match_prefix, keys)
        if keys and not meta.get("probe"):  # empty lookups and routing probes: no requests
            for lookups in (self._lookups, self._tenant_counts.setdefault(conn.owner,
                                                                         _Lookups())):
                lookups.num_lookups += 1
                lookups.num_blocks_queried += len(keys)
                lookups.num_blocks_hit += count
            if self.metrics is not None:
                tokens = self.config.block_tokens
                self.metrics.record_prefix("local", len(keys) * tokens, count * tokens)
            if self.access_log is not None:
                self.access_log.record(meta["keys"], hit_blocks=count,
                                       namespace=conn.namespace)
        return {"count": count}, []

    async def _op_contains(self, conn: Connection, meta: dict[str, Any], data: bytes) -> Any:
        return {"present": await self._run_short(self.store.contains,
                                                 conn.scope(meta["key"]))}, []

    async def _op_delete(self, conn: Connection, meta: dict[str, Any], data: bytes) -> Any:
        return {"deleted": await self._run(self.store.delete, conn.scope(meta["key"]))}, []

    async def _op_tier_of(self, conn: Connection, meta: dict[str, Any], data: bytes) -> Any:
        return {"tier": await self._run_short(self.store.tier_of, conn.scope(meta["key"]))}, []

    async def _op_flush(self, conn: Connection, meta: dict[str, Any], data: bytes) -> Any:
        await self._run(self.store.flush)
        return {}, []

    async def _op_stats(self, conn: Connection, meta: dict[str, Any], data: bytes) -> Any:
        """The whole store's figures for an admin (or without a token file: one trusted
        tenant); for any other tenant only its own: its blocks and quotas per tier, its
        reads and prefix lookups."""
        assert conn.tenant is not None
        if not conn.tenant.is_admin:
            usage = await self._run_short(self.store.usage, conn.tenant.owner)
            return {"stats": self._tenant_stats(conn, usage)}, []
        stats = await self._run_short(self.store.stats)
        stats["clients"] = len(self._connections)
        stats["started_at"] = self.started_at
        stats["uptime_s"] = time.time() - self.started_at
        stats["prefix"] = self.prefix_stats()
        stats["leases"] = self.lease_stats.as_dict()
        if not self.tenants.is_open:
            stats["tenants"] = await self._run_short(
                lambda: {t.name: self.store.usage(t.owner) for t in self.tenants.all()})
        return {"stats": stats}, []

    def _tenant_stats(self, conn: Connection, usage: dict[str, Any]) -> dict[str, Any]:
        """What one tenant may see (``usage``: its blocks per tier): nothing of another's."""
        tenant = conn.tenant
        assert tenant is not None
        counts = self._tenant_counts.get(tenant.owner, _Lookups())
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
                "prefix": self._prefix_figures(counts),
                "started_at": self.started_at, "uptime_s": time.time() - self.started_at}

    def prefix_stats(self) -> dict[str, int]:
        """Prefix lookups since start; tokens are blocks times ``config.block_tokens``."""
        return self._prefix_figures(self._lookups)

    def _prefix_figures(self, lookups: _Lookups) -> dict[str, int]:
        block_tokens = self.config.block_tokens
        return {"lookups": lookups.num_lookups,
                "blocks_queried": lookups.num_blocks_queried,
                "blocks_hit": lookups.num_blocks_hit,
                "block_tokens": block_tokens,
                "tokens_queried": lookups.num_blocks_queried * block_tokens,
                "tokens_hit": lookups.num_blocks_hit * block_tokens}

    def _count_in(self, data: bytes) -> None:
        self._count_in_bytes(len(data))

    def _count_in_bytes(self, nbytes: int) -> None:
        if self.metrics is not None and nbytes:
            self.metrics.record_transfer("in", nbytes)

    def health(self) -> tuple[bool, dict[str, Any]]:
        ok = not self._stopping.is_set()
        return ok, {"status": "ok" if ok else "stopping", "clients": len(self._connections)}

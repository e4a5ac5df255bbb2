"""The client of `kvstored`: the Store API over the wire (`connect`, `aconnect`).

    Client / AsyncClient ──pool of connections──> kvstored
        │ same host: values copied straight into / out of the daemon's DRAM pool
        │            (/dev/shm, mapped here): reserve -> copy -> commit, pin -> copy -> unpin
        └ other hosts, or no shared memory: values streamed in the frames

Each operation is written once, as a generator that yields requests and receives
responses (`_Operations`); the sync and the asyncio client only move frames. An
operation runs on one connection (shared-memory handles belong to it); if the
connection breaks (`StoreConnectionError`: a socket error, an EOF, an answer that is not
a frame), the whole operation is retried on a fresh one with jittered backoff (every
operation is idempotent in effect: a put of the same value, a delete, reads), so a
daemon restart is invisible beyond the delay. An error the daemon answered (`AuthError`,
`StorageError`, `LeaseExpiredError`, ...) is raised at once, and the connection kept. A
call that runs out of time raises `DeadlineExceededError` and drops its connection (a
late answer could not be matched).
"""

from __future__ import annotations

import asyncio
import itertools
import random
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kvstore import protocol
from kvstore.buffers import value_view
from kvstore.client_ops import (
    Operation,
    Request,
    Response,
    _checked,
    _Operations,
    _Session,
    ahello,
    hello,
    transport_failed,
)
from kvstore.errors import (
    AuthError,
    DeadlineExceededError,
    InvalidValueError,
    KVStoreError,
    ProtocolError,
    StoreConnectionError,
)
from kvstore.protocol import FrameKind
from kvstore.tiers.base import check_key

RECEIVE_BUFFER_BYTES = 64 * 1024


@dataclass(frozen=True)
class Retry:
    """How often, and how patiently, a call is retried after its connection broke."""

    attempts: int = 4
    base_s: float = 0.05
    cap_s: float = 1.0

    def delay_s(self, attempt: int) -> float:
        return random.uniform(0, min(self.cap_s, self.base_s * 2 ** attempt))



# -- the sync transport -------------------------------------------------------------------------


class _Connection:
    """One socket to the daemon, after hello."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self._ids = itertools.count(1)
        self._unanswered = 0
        try:
            self.sock = socket.create_connection(client.address, client.connect_timeout_s)
        except OSError as e:
            raise StoreConnectionError(f"cannot reach kvstored at {client.url}: "
                                       f"{e.strerror or e}") from e
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Answers are received into this buffer, as much as has arrived per receive (a
        # header and its meta usually come in one); a larger data part gets its own.
        self._received = bytearray(RECEIVE_BUFFER_BYTES)
        self._view = memoryview(self._received)
        self._start = self._end = 0  # received, not yet taken
        self.session: _Session
        self.doorbell: socket.socket | None = None  # commits of single puts, same host
        hello(self, client)  # (closes the socket if it fails)
        if self.session.pool is not None:
            try:
                self.doorbell = self._open_doorbell()
            except BaseException:
                self.close()
                raise

    def _open_doorbell(self) -> socket.socket | None:
        """The daemon's commit doorbell for this connection (`daemon.doorbell`), or None:
        a daemon without one, or a socket this process cannot reach (another container),
        leaves commits on TCP."""
        timeout_s = self.client.connect_timeout_s
        try:
            meta, _ = self.request({"op": "doorbell"}, [], timeout_s)
        except (ProtocolError, AuthError):  # an older daemon, or none offered
            return None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout_s)
            sock.connect(meta["path"])
            sock.sendall(meta["secret"])
            if sock.recv(1) == b"\x01":
                return sock
        except OSError:
            pass
        sock.close()
        return None

    def request(self, meta: dict[str, Any], parts: list[Any], timeout_s: float,
                wait: bool = True) -> Response | None:
        """Send a request and read its answer; with ``wait=False`` only send it (its answer
        is read and dropped before the next one: requests on a connection are pipelined)."""
        if self.doorbell is not None and wait and _rings_doorbell(meta):
            return self._ring(meta, timeout_s)
        request_id = next(self._ids)
        meta = {**meta, "id": request_id, "timeout_ms": max(1, int(timeout_s * 1000))}
        data_bytes = sum(memoryview(p).nbytes for p in parts)
        try:
            self.sock.settimeout(timeout_s + 1.0)  # the daemon answers a deadline first
            head = protocol.encode(FrameKind.REQUEST, meta, data_bytes)
            if data_bytes <= 65536:
                self.sock.sendall(b"".join([head, *(memoryview(p).cast("B") for p in parts)]))
            else:
                self.sock.sendall(head)
                for part in parts:
                    self.sock.sendall(memoryview(part).cast("B"))
            if not wait:
                self._unanswered += 1
                return None
            while True:
                header = protocol.decode_header(self._take(protocol.HEADER_BYTES),
                                                max_data_bytes=1 << 40,
                                                expect=FrameKind.RESPONSE)
                answer = protocol.decode_meta(self._take(header.meta_bytes))
                data = memoryview(self._take(header.data_bytes))
                if not self._unanswered:
                    break
                self._unanswered -= 1  # the answer of a request sent with wait=False
        except Exception as e:
            transport_failed(e, self.client.url, meta["op"], timeout_s)
        return _checked(answer, request_id, data, self.client.url)

    def _ring(self, meta: dict[str, Any], timeout_s: float) -> Response:
        """A commit of one slot (and one spare) through the doorbell: one 32-byte message
        each way, the answer shaped as the TCP commit's."""
        spare = meta.get("reserve_sizes") or [0]
        message = protocol.DOORBELL_REQUEST.pack(meta["handles"][0], meta["keys"][0], spare[0])
        answer = bytearray(protocol.DOORBELL_MESSAGE_BYTES)
        assert self.doorbell is not None
        try:
            self.doorbell.settimeout(timeout_s)
            self.doorbell.sendall(message)
            _receive_into(self.doorbell, memoryview(answer))
        except Exception as e:
            transport_failed(e, self.client.url, "commit", timeout_s)
        status, stored, handle, offset = protocol.DOORBELL_RESPONSE.unpack(answer)
        if status:
            code = protocol.doorbell_code(status).value
            raise protocol.error_class(code)(f"{self.client.url}: commit refused [{code}]")
        spares = {"handles": [handle], "offsets": [offset]} if handle else {}
        return {"ok": True, "stored": stored, **spares}, memoryview(b"")

    def _take(self, nbytes: int) -> bytes | bytearray:
        """The next ``nbytes`` of the answers."""
        buffered = self._end - self._start
        if nbytes > len(self._received):  # a large data part: received straight into it
            taken = bytearray(nbytes)
            have = min(buffered, nbytes)
            taken[:have] = self._view[self._start:self._start + have]
            self._start += have
            _receive_into(self.sock, memoryview(taken)[have:])
            return taken
        if buffered < nbytes:
            if len(self._received) - self._start < nbytes:  # move the rest to the front
                self._view[:buffered] = self._view[self._start:self._end]
                self._start, self._end = 0, buffered
            while self._end - self._start < nbytes:
                self._end += _receive_into(self.sock, self._view[self._end:], whole=False)
        taken = bytes(self._view[self._start:self._start + nbytes])
        self._start += nbytes
        if self._start == self._end:
            self._start = self._end = 0
        return taken

    def close(self) -> None:
        self.sock.close()
        if self.doorbell is not None:
            self.doorbell.close()


def _receive_into(sock: socket.socket, view: memoryview, whole: bool = True) -> int:
    """Receive from ``sock`` into ``view``: all of it, or (``whole`` False) what came in
    one receive; the number of bytes."""
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if not n:
            raise ConnectionResetError("the daemon closed the connection")
        got += n
        if not whole:
            break
    return got


def _rings_doorbell(meta: dict[str, Any]) -> bool:
    """Whether a request is a commit the doorbell carries: one slot bound to one key, and
    at most one spare slot to reserve."""
    return (meta["op"] == "commit" and len(meta["handles"]) == 1
            and len(meta.get("keys") or ()) == 1 and len(meta.get("reserve_sizes") or ()) <= 1)


def _split_keys(keys: Sequence[bytes]) -> list[bytes]:
    return [check_key(k) for k in keys]


class _Api:
    """The Store methods, on top of ``_run(operation factory)``."""

    def _run(self, make: Any) -> Any:
        raise NotImplementedError

    def put(self, key: bytes, value: Any) -> Any:
        key, src = check_key(key), value_view(value)
        return self._run(lambda s: _Operations.put(s, key, src))

    def put_many(self, keys: Sequence[bytes], values: Sequence[Any]) -> Any:
        if len(keys) != len(values):
            raise InvalidValueError(f"put_many got {len(keys)} keys but {len(values)} values")
        checked, srcs = _split_keys(keys), [value_view(v) for v in values]
        return self._run(lambda s: _Operations.put_many(s, checked, srcs))

    def get(self, key: bytes) -> Any:
        key = check_key(key)
        return self._map(self._run(lambda s: _Operations.get_many(s, [key])), lambda r: r[0])

    def get_into(self, key: bytes, out: Any) -> Any:
        key = check_key(key)
        return self._map(self._run(lambda s: _Operations.get_many(s, [key], [out])),
                         lambda r: r[0])

    def get_many(self, keys: Sequence[bytes]) -> Any:
        checked = _split_keys(keys)
        return self._run(lambda s: _Operations.get_many(s, checked))

    def match_prefix(self, keys: Sequence[bytes], *, probe: bool = False) -> Any:
        checked = _split_keys(keys)
        return self._run(lambda s: _Operations.match_prefix(checked, probe))

    def contains(self, key: bytes) -> Any:
        key = check_key(key)
        return self._run(lambda s: _Operations.simple("contains", "key", key, "present"))

    def delete(self, key: bytes) -> Any:
        key = check_key(key)
        return self._run(lambda s: _Operations.simple("delete", "key", key, "deleted"))

    def tier_of(self, key: bytes) -> Any:
        key = check_key(key)
        return self._run(lambda s: _Operations.simple("tier_of", "key", key, "tier"))

    def flush(self) -> Any:
        return self._run(lambda s: _Operations.simple("flush", "", None, "none"))

    def stats(self) -> Any:
        return self._run(lambda s: _Operations.simple("stats", "", None, "stats"))

    @staticmethod
    def _map(result: Any, fn: Any) -> Any:
        return fn(result)


class _Settings:
    def __init__(self, url: str, token: str | None, namespace: str | None, timeout_s: float,
                 connect_timeout_s: float, shared_memory: bool, max_connections: int,
                 retry: Retry) -> None:
        try:
            self.transport, self.address = protocol.parse_url(url)
        except ValueError as e:
            raise KVStoreError(str(e)) from None
        if not timeout_s > 0 or not connect_timeout_s > 0 or max_connections < 1:
            raise KVStoreError("timeouts must be positive and max_connections at least 1")
        self.url = url
        self.token = token
        self.namespace = namespace
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.shared_memory = shared_memory
        self.max_connections = max_connections
        self.retry = retry

    def _retry_delay_s(self, attempt: int, deadline: float,
                       error: StoreConnectionError) -> float:
        """How long to wait before retrying on a fresh connection after ``error`` broke
        one (or found none); `StoreConnectionError` when no attempt or time is left."""
        if attempt + 1 >= self.retry.attempts or time.monotonic() >= deadline:
            raise StoreConnectionError(
                f"lost the connection to kvstored at {self.url}: {error}") from error
        return min(self.retry.delay_s(attempt), max(0.0, deadline - time.monotonic()))

    def hello_request(self) -> Request:
        return {"op": "hello", "version": protocol.PROTOCOL_VERSION, "token": self.token,
                "namespace": self.namespace, "shm": self.shared_memory}, []


class Client(_Settings, _Api):
    """The Store API against a daemon; thread-safe (one pool of connections)."""

    def __init__(self, url: str, *, token: str | None = None, namespace: str | None = None,
                 timeout_s: float = 30.0, connect_timeout_s: float = 5.0,
                 shared_memory: bool = True, max_connections: int = 8,
                 retry: Retry = Retry()) -> None:
        super().__init__(url, token, namespace, timeout_s, connect_timeout_s, shared_memory,
                         max_connections, retry)
        self._idle: list[_Connection] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_connections)
        self._closed = False
        self._release(self._connect())  # fail now, clearly, if the daemon is not there

    def _connect(self) -> Any:
        if self.transport == "ucx":
            from kvstore.ucx_transport import UcxConnection

            return UcxConnection(self)
        return _Connection(self)

    def _acquire(self) -> _Connection:
        with self._lock:
            if self._closed:
                raise KVStoreError(f"the client of {self.url} is closed")
            if self._idle:
                return self._idle.pop()
        return self._connect()

    def _release(self, conn: _Connection) -> None:
        with self._lock:
            if self._closed:
                conn.close()
            else:
                self._idle.append(conn)

    def _run(self, make: Any) -> Any:
        deadline = time.monotonic() + self.timeout_s
        with self._slots:
            for attempt in itertools.count():
                conn = None
                try:
                    conn = self._acquire()
                    result = _drive(make(conn.session), conn, deadline)
                except DeadlineExceededError:
                    if conn is not None:
                        conn.close()
                    raise
                except StoreConnectionError as e:  # only a broken connection is retried
                    if conn is not None:
                        conn.close()
                    time.sleep(self._retry_delay_s(attempt, deadline, e))
                    continue
                except BaseException:
                    if conn is not None:
                        self._release(conn)
                    raise
                self._release(conn)
                return result

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _call(request: Request, deadline: float, url: str) -> tuple[Any, ...]:
    """The arguments of ``conn.request`` for an operation's next request: meta, parts,
    the time left, and whether to wait for the answer (not for a ``noreply`` request)."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlineExceededError(f"call to {url} ran out of time")
    meta, parts = request
    wait = not meta.pop("noreply", False)
    return meta, parts, left, wait


def _drive(operation: Operation, conn: _Connection, deadline: float) -> Any:
    try:
        request = next(operation)
        while True:
            request = operation.send(conn.request(*_call(request, deadline, conn.client.url)))
    except StopIteration as done:
        return done.value


# -- the asyncio transport ----------------------------------------------------------------------


class _AsyncConnection:
    def __init__(self, client: AsyncClient, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.client = client
        self.reader, self.writer = reader, writer
        self._ids = itertools.count(1)
        self._unanswered = 0
        self.session: _Session | None = None

    @classmethod
    async def open(cls, client: AsyncClient) -> _AsyncConnection:
        host, port = client.address
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, limit=1 << 20), client.connect_timeout_s)
        except (OSError, TimeoutError) as e:
            raise StoreConnectionError(f"cannot reach kvstored at {client.url}: "
                                       f"{getattr(e, 'strerror', None) or e}") from e
        conn = cls(client, reader, writer)
        await ahello(conn, client)
        return conn

    async def request(self, meta: dict[str, Any], parts: list[Any], timeout_s: float,
                      wait: bool = True) -> Response | None:
        """As `_Connection.request`."""
        request_id = next(self._ids)
        meta = {**meta, "id": request_id, "timeout_ms": max(1, int(timeout_s * 1000))}
        data_bytes = sum(memoryview(p).nbytes for p in parts)
        try:
            async with asyncio.timeout(timeout_s + 1.0):
                self.writer.write(protocol.encode(FrameKind.REQUEST, meta, data_bytes))
                for part in parts:
                    self.writer.write(memoryview(part).cast("B"))
                await self.writer.drain()
                if not wait:
                    self._unanswered += 1
                    return None
                while True:
                    header = protocol.decode_header(
                        await self.reader.readexactly(protocol.HEADER_BYTES),
                        max_data_bytes=1 << 40, expect=FrameKind.RESPONSE)
                    answer = protocol.decode_meta(
                        await self.reader.readexactly(header.meta_bytes))
                    data = memoryview(await self.reader.readexactly(header.data_bytes))
                    if not self._unanswered:
                        break
                    self._unanswered -= 1
        except Exception as e:
            transport_failed(e, self.client.url, meta["op"], timeout_s)
        return _checked(answer, request_id, data, self.client.url)

    def close(self) -> None:
        self.writer.close()


class AsyncClient(_Settings, _Api):
    """The Store API against a daemon, as coroutines (`await client.get(key)`)."""

    def __init__(self, url: str, *, token: str | None = None, namespace: str | None = None,
                 timeout_s: float = 30.0, connect_timeout_s: float = 5.0,
                 shared_memory: bool = True, max_connections: int = 8,
                 retry: Retry = Retry()) -> None:
        super().__init__(url, token, namespace, timeout_s, connect_timeout_s, shared_memory,
                         max_connections, retry)
        self._idle: list[_AsyncConnection] = []
        self._slots = asyncio.Semaphore(max_connections)
        self._closed = False

    async def _run(self, make: Any) -> Any:
        deadline = time.monotonic() + self.timeout_s
        async with self._slots:
            for attempt in itertools.count():
                conn = None
                try:
                    if self._closed:
                        raise KVStoreError(f"the client of {self.url} is closed")
                    conn = self._idle.pop() if self._idle else await self._open()
                    result = await _adrive(make(conn.session), conn, deadline)
                except (DeadlineExceededError, asyncio.CancelledError):
                    if conn is not None:
                        conn.close()
                    raise
                except StoreConnectionError as e:  # only a broken connection is retried
                    if conn is not None:
                        conn.close()
                    await asyncio.sleep(self._retry_delay_s(attempt, deadline, e))
                    continue
                except BaseException:
                    if conn is not None:
                        self._idle.append(conn)
                    raise
                self._idle.append(conn)
                return result

    async def _open(self) -> Any:
        if self.transport == "ucx":
            from kvstore.ucx_transport import AsyncUcxConnection

            return await AsyncUcxConnection.open(self)
        return await _AsyncConnection.open(self)

    @staticmethod
    async def _map(result: Any, fn: Any) -> Any:
        return fn(await result)

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def _adrive(operation: Operation, conn: _AsyncConnection, deadline: float) -> Any:
    try:
        request = next(operation)
        while True:
            request = operation.send(
                await conn.request(*_call(request, deadline, conn.client.url)))
    except StopIteration as done:
        return done.value


def connect(url: str, token: str | None = None, *, namespace: str | None = None,
            timeout_s: float = 30.0, shared_memory: bool = True) -> Client:
    """A client of the daemon at ``url`` (``kvstore://HOST:PORT``) with Store's methods.

    ``namespace`` scopes the keys (the token must grant it; default: the token's only
    namespace, or "default"). ``shared_memory``: copy values through the daemon's DRAM pool
    when it is on this host.
    """
    return Client(url, token=token, namespace=namespace, timeout_s=timeout_s,
                  shared_memory=shared_memory)


async def aconnect(url: str, token: str | None = None, *, namespace: str | None = None,
                   timeout_s: float = 30.0, shared_memory: bool = True) -> AsyncClient:
    """`connect`, for asyncio: the methods are coroutines. Connects once to fail early."""
    client = AsyncClient(url, token=token, namespace=namespace, timeout_s=timeout_s,
                         shared_memory=shared_memory)
    await client.stats()
    return client

"""The client of `kvstored`: the Store API over the wire (`connect`, `aconnect`).

    Client / AsyncClient ──pool of connections──> kvstored
        │ same host: values copied straight into / out of the daemon's DRAM pool
        │            (/dev/shm, mapped here): reserve -> copy -> commit, pin -> copy -> unpin
        └ other hosts, or no shared memory: values streamed in the frames

Each operation is written once, as a generator that yields requests and receives
responses (`_Operations`); the sync and the asyncio client only move frames. An
operation runs on one connection (shared-memory handles belong to it); if the
connection breaks, the whole operation is retried on a fresh one with jittered backoff
(every operation is idempotent in effect: a put of the same value, a delete, reads), so a
daemon restart is invisible beyond the delay. A call that runs out of time raises
`DeadlineExceededError` and drops its connection (a late answer could not be matched).
"""

from __future__ import annotations

import asyncio
import itertools
import random
import socket
import threading
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvstore import protocol
from kvstore.buffers import copy_bytes, output_view, value_view
from kvstore.errors import (
    DeadlineExceededError,
    InvalidValueError,
    KVStoreError,
    ProtocolError,
    StoreConnectionError,
)
from kvstore.protocol import FrameKind
from kvstore.tiers.base import check_key
from kvstore.tiers.dram import boot_id

SHM_MIN_BYTES = 64 * 1024  # smaller puts go in the frame: one round trip instead of two

Request = tuple[dict[str, Any], list[Any]]  # meta (op and fields), data parts
Response = tuple[dict[str, Any], memoryview]  # meta, data
Operation = Generator[Request, Response, Any]


@dataclass(frozen=True)
class Retry:
    """How often, and how patiently, a call is retried after its connection broke."""

    attempts: int = 4
    base_s: float = 0.05
    cap_s: float = 1.0

    def delay_s(self, attempt: int) -> float:
        return random.uniform(0, min(self.cap_s, self.base_s * 2 ** attempt))


class _Session:
    """What one connection learned at hello, and the shared pool it mapped (if any)."""

    def __init__(self, hello: dict[str, Any], address: tuple[str, int]) -> None:
        self.namespace: str = hello["namespace"]
        self.max_value_bytes: int = hello["max_value_bytes"]
        self.max_frame_data_bytes: int = hello["max_frame_data_bytes"]
        self.node_id: str = hello["node_id"]
        self.lease_s: float = hello["lease_s"]
        self.pool: np.ndarray | None = None
        self.is_pool_registered = False  # page-locked for CUDA: GPUs DMA straight into it
        self._spare: tuple[int, int, int, float] | None = None  # handle, offset, nbytes, when
        shm = hello.get("shm")
        if shm and shm.get("boot_id") == boot_id():
            mapped = _shared_pool(address, shm["name"], shm["nbytes"])
            if mapped is not None:
                self.pool, self.is_pool_registered = mapped


    def take_spare(self, nbytes: int) -> tuple[int, int] | None:
        """(handle, offset) of this connection's spare slot if it fits ``nbytes`` exactly
        and is young enough that its lease cannot run out before the commit."""
        spare = self._spare
        if (spare is None or spare[2] != nbytes
                or time.monotonic() - spare[3] > self.lease_s / 2):
            return None
        self._spare = None
        return spare[0], spare[1]

    def keep_spare(self, handle: int, offset: int, nbytes: int) -> int | None:
        """Keep a new spare slot; returns the handle of the one it replaces, if any."""
        old, self._spare = self._spare, (handle, offset, nbytes, time.monotonic())
        return None if old is None else old[0]


# Pools mapped by this process, by shared-memory name: a pool is mapped (and registered
# with CUDA, which refuses a second registration of the same pages) once per process.
_pools: dict[str, tuple[np.ndarray, bool]] = {}
_pool_of_address: dict[tuple[str, int], str] = {}
_pools_lock = threading.Lock()


def _shared_pool(address: tuple[str, int], name: str,
                 nbytes: int) -> tuple[np.ndarray, bool] | None:
    """The daemon's DRAM pool mapped here; None if it is not reachable from here (another
    host or container, or no permission): values then travel in the frames. A daemon
    that restarted has a new pool: the old one's mapping is let go."""
    from kvstore.tiers.dram import map_shared, register_with_cuda, unregister_with_cuda

    with _pools_lock:
        old = _pool_of_address.get(address)
        if old is not None and old != name and old in _pools:
            array, registered = _pools.pop(old)
            if registered:
                unregister_with_cuda(array)
        _pool_of_address[address] = name
        if name not in _pools:
            try:
                mapping = map_shared(name, nbytes, create=False)
            except (OSError, ValueError):
                return None
            array = np.frombuffer(mapping, dtype=np.uint8)[:nbytes]
            _pools[name] = (array, register_with_cuda(array))
        return _pools[name]


# -- the operations, once, independent of the transport ---------------------------------------


def _host(src: Any) -> Any:
    """A host byte view of a value view (device tensors are copied to the host)."""
    return src if isinstance(src, np.ndarray) else src.cpu().numpy()


class _Operations:
    """Generators: yield (meta, data parts), receive (meta, data), return the result."""

    @staticmethod
    def put_many(session: _Session, keys: list[bytes], srcs: list[Any],
                 use_spare: bool = False) -> Operation:
        """``use_spare`` (single puts): keep a spare slot for the next put of this size."""
        if not keys:
            return 0
        sizes = [int(s.shape[0]) for s in srcs]
        for size in sizes:
            if size > session.max_value_bytes:
                raise InvalidValueError(f"value of {size} bytes exceeds the daemon's "
                                        f"max_value_bytes ({session.max_value_bytes})")
        pool = session.pool
        if pool is not None and sum(sizes) >= SHM_MIN_BYTES:
            # A single put reuses the spare slot its last commit reserved: copy + commit,
            # one round trip; the commit reserves the next spare.
            single = use_spare and len(keys) == 1
            spare = session.take_spare(sizes[0]) if single else None
            if spare is not None:
                handles, offsets = [spare[0]], [spare[1]]
            else:
                meta, _ = yield {"op": "reserve", "keys": keys, "sizes": sizes}, []
                handles, offsets = meta["handles"], meta["offsets"]
            if len(handles) == len(keys):
                try:
                    for src, offset, size in zip(srcs, offsets, sizes, strict=True):
                        copy_bytes(pool[offset:offset + size], src)
                except BaseException:
                    yield {"op": "abort", "handles": handles}, []
                    raise
                commit = {"op": "commit", "handles": handles, "keys": keys}
                if single:
                    commit["reserve_sizes"] = sizes
                meta, _ = yield commit, []
                if single and meta.get("handles"):
                    old = session.keep_spare(meta["handles"][0], meta["offsets"][0], sizes[0])
                    if old is not None:  # one spare per connection: the other goes back
                        yield {"op": "abort", "handles": [old], "noreply": True}, []
                return meta["stored"]
            if handles:  # no room for all in DRAM: let the daemon place them (and demote)
                yield {"op": "abort", "handles": handles}, []
        stored = 0
        for start, stop in _batches(sizes, session.max_frame_data_bytes):
            parts = [_host(s) for s in srcs[start:stop]]
            meta, _ = yield ({"op": "put_many", "keys": keys[start:stop],
                              "sizes": sizes[start:stop]}, parts)
            stored += meta["stored"]
            if meta["stored"] < stop - start:
                break
        return stored

    @staticmethod
    def put(session: _Session, key: bytes, src: Any) -> Operation:
        if session.pool is not None and src.shape[0] >= SHM_MIN_BYTES:
            return (yield from _Operations.put_many(session, [key], [src], True)) == 1
        if src.shape[0] > session.max_value_bytes:
            raise InvalidValueError(f"value of {src.shape[0]} bytes exceeds the daemon's "
                                    f"max_value_bytes ({session.max_value_bytes})")
        meta, _ = yield {"op": "put", "key": key}, [_host(src)]
        return meta["stored"]

    @staticmethod
    def get_many(session: _Session, keys: list[bytes],
                 outs: list[Any] | None = None) -> Operation:
        """Values as bytes, or (with ``outs``) copied into them: True/False per key."""
        results: list[Any] = [None if outs is None else False] * len(keys)
        rest = list(range(len(keys)))
        pool = session.pool
        if pool is not None and keys:
            meta, _ = yield {"op": "pin", "keys": keys}, []
            pinned_at = time.monotonic()
            pinned = [(i, b) for i, b in enumerate(meta["blocks"]) if b is not None]
            copied: list[Any] = []
            try:
                for i, (offset, nbytes, _handle) in pinned:
                    view = pool[offset:offset + nbytes]
                    if outs is None:
                        copied.append(view.tobytes())
                    else:
                        copy_bytes(output_view(outs[i], nbytes), view)
                        copied.append(True)
            finally:
                if pinned:
                    # Not waited for: the daemon keeps a pinned slot whole until its pins
                    # go, even if the block is deleted or overwritten meanwhile.
                    yield {"op": "unpin", "handles": [b[2] for _, b in pinned],
                           "noreply": True}, []
            # A copy that outlasted the lease may have raced a reuse of its slot: redo it.
            if time.monotonic() - pinned_at < session.lease_s / 2:
                for (i, _), value in zip(pinned, copied, strict=True):
                    results[i] = value
                found = {i for i, _ in pinned}
                rest = [i for i in range(len(keys)) if i not in found]
        if rest:
            meta, data = yield {"op": "get_many", "keys": [keys[i] for i in rest]}, []
            offset = 0
            for i, size in zip(rest, meta["sizes"], strict=True):
                if size is None:
                    continue
                value = data[offset:offset + size]
                offset += size
                if outs is None:
                    results[i] = bytes(value)
                else:
                    copy_bytes(output_view(outs[i], size), np.frombuffer(value, np.uint8))
                    results[i] = True
        return results

    @staticmethod
    def simple(op: str, field: str, value: Any, result: str) -> Operation:
        meta, _ = yield {"op": op, field: value} if field else {"op": op}, []
        return meta.get(result)


def _batches(sizes: list[int], limit: int) -> list[tuple[int, int]]:
    """Cut a put_many into frames of at most ``limit`` data bytes."""
    batches, start, total = [], 0, 0
    for i, size in enumerate(sizes):
        if i > start and total + size > limit:
            batches.append((start, i))
            start, total = i, 0
        total += size
    batches.append((start, len(sizes)))
    return batches


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
        meta, _ = self.request(*client.hello_request(), client.connect_timeout_s)
        self.session = _Session(meta, client.address)

    def request(self, meta: dict[str, Any], parts: list[Any], timeout_s: float,
                wait: bool = True) -> Response | None:
        """Send a request and read its answer; with ``wait=False`` only send it (its answer
        is read and dropped before the next one: requests on a connection are pipelined)."""
        request_id = next(self._ids)
        meta = {**meta, "id": request_id, "timeout_ms": max(1, int(timeout_s * 1000))}
        data_bytes = sum(memoryview(p).nbytes for p in parts)
        self.sock.settimeout(timeout_s + 1.0)  # the daemon answers a deadline itself first
        try:
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
                header = protocol.decode_header(self._read(protocol.HEADER_BYTES),
                                                max_data_bytes=1 << 40,
                                                expect=FrameKind.RESPONSE)
                answer = protocol.decode_meta(bytes(self._read(header.meta_bytes)))
                data = self._read(header.data_bytes)
                if not self._unanswered:
                    break
                self._unanswered -= 1  # the answer of a request sent with wait=False
        except TimeoutError:
            raise DeadlineExceededError(f"{meta['op']} to {self.client.url} did not finish "
                                        f"within {timeout_s:g} s") from None
        except protocol.RequestError as e:
            raise ProtocolError(f"bad answer from {self.client.url}: {e}") from None
        return _checked(answer, request_id, data, self.client.url)

    def _read(self, nbytes: int) -> memoryview:
        buffer = memoryview(bytearray(nbytes))
        got = 0
        while got < nbytes:
            n = self.sock.recv_into(buffer[got:])
            if not n:
                raise ConnectionResetError("the daemon closed the connection")
            got += n
        return buffer

    def close(self) -> None:
        self.sock.close()


def _checked(answer: dict[str, Any], request_id: int, data: memoryview, url: str) -> Response:
    if answer.get("id") not in (request_id, None):
        raise ProtocolError(f"answer to request {answer.get('id')} from {url}, expected "
                            f"{request_id}")
    if not answer.get("ok"):
        code = str(answer.get("code"))
        raise protocol.error_class(code)(f"{url}: {answer.get('message')} [{code}]")
    return answer, data


_BROKEN = (OSError, EOFError, ProtocolError)  # the connection cannot be trusted any more


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

    def match_prefix(self, keys: Sequence[bytes]) -> Any:
        checked = _split_keys(keys)
        return self._run(lambda s: _Operations.simple("match_prefix", "keys", checked, "count"))

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

    def _retry_delay_s(self, attempt: int, deadline: float, error: BaseException) -> float:
        """How long to wait before retrying on a fresh connection after ``error`` broke
        one; `StoreConnectionError` when no attempt or time is left."""
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
                except _BROKEN as e:
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
        try:
            meta, _ = await conn.request(*client.hello_request(), client.connect_timeout_s)
        except BaseException:
            conn.close()
            raise
        conn.session = _Session(meta, client.address)
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
        except TimeoutError:
            raise DeadlineExceededError(f"{meta['op']} to {self.client.url} did not finish "
                                        f"within {timeout_s:g} s") from None
        except asyncio.IncompleteReadError:
            raise ConnectionResetError("the daemon closed the connection") from None
        except protocol.RequestError as e:
            raise ProtocolError(f"bad answer from {self.client.url}: {e}") from None
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
                except _BROKEN as e:
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

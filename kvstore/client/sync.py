"""The client of `kvstored`: the Store API over the wire (`connect`, `Client`).

    Client / AsyncClient ──pool of connections──> kvstored
        │ same host: values copied straight into / out of the daemon's DRAM pool
        │            (/dev/shm, mapped here): reserve -> copy -> commit, pin -> copy -> unpin
        └ other hosts, or no shared memory: values streamed in the frames

Each operation is written once, as a generator that yields requests and receives
responses (`kvstore.client.operations`); this sync client, the asyncio one
(`kvstore.client.aio`) and the UCX connections (`kvstore.client.ucx`) only move frames. An
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

import contextlib
import itertools
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from kvstore.client.answers import Response, checked, transport_failed
from kvstore.client.api import StoreApi, check_keys
from kvstore.client.operations import Operation, Operations, PoolLoan, call_args
from kvstore.client.session import Session, hello, hold_pool, release_pool
from kvstore.client.settings import ClientSettings
from kvstore.errors import (
    AuthError,
    DeadlineExceededError,
    KVStoreError,
    ProtocolError,
    StoreConnectionError,
)
from kvstore.wire import frames
from kvstore.wire.doorbell import (
    DOORBELL_MESSAGE_BYTES,
    DOORBELL_REQUEST,
    DOORBELL_RESPONSE,
    doorbell_code,
)
from kvstore.wire.error_codes import error_class
from kvstore.wire.frames import FrameKind

RECEIVE_BUFFER_BYTES = 64 * 1024


class _Connection:
    """One socket to the daemon, after hello."""

    def __init__(self, settings: ClientSettings) -> None:
        self.settings = settings
        self._ids = itertools.count(1)
        self._unanswered = 0
        try:
            self.sock = socket.create_connection(settings.address, settings.connect_timeout_s)
        except OSError as e:
            raise StoreConnectionError(f"cannot reach kvstored at {settings.url}: "
                                       f"{e.strerror or e}") from e
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Answers are received into this buffer, as much as has arrived per receive (a
        # header and its meta usually come in one); a larger data part gets its own.
        self._received = bytearray(RECEIVE_BUFFER_BYTES)
        self._view = memoryview(self._received)
        self._start = self._end = 0  # received, not yet taken
        self.session: Session
        self.doorbell: socket.socket | None = None  # commits of single puts, same host
        hello(self, settings)  # (closes the socket if it fails)
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
        timeout_s = self.settings.connect_timeout_s
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
            head = frames.encode(FrameKind.REQUEST, meta, data_bytes)
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
                header = frames.decode_header(self._take(frames.HEADER_BYTES),
                                              max_data_bytes=1 << 40,
                                              expect=FrameKind.RESPONSE)
                answer = frames.decode_meta(self._take(header.meta_bytes))
                data = memoryview(self._take(header.data_bytes))
                if not self._unanswered:
                    break
                self._unanswered -= 1  # the answer of a request sent with wait=False
        except Exception as e:
            transport_failed(e, self.settings.url, meta["op"], timeout_s)
        return checked(answer, request_id, data, self.settings.url)

    def _ring(self, meta: dict[str, Any], timeout_s: float) -> Response:
        """A commit of one slot (and one spare) through the doorbell: one 32-byte message
        each way, the answer shaped as the TCP commit's."""
        spare = meta.get("reserve_sizes") or [0]
        message = DOORBELL_REQUEST.pack(meta["handles"][0], meta["keys"][0], spare[0])
        answer = bytearray(DOORBELL_MESSAGE_BYTES)
        assert self.doorbell is not None
        try:
            self.doorbell.settimeout(timeout_s)
            self.doorbell.sendall(message)
            _receive_into(self.doorbell, memoryview(answer))
        except Exception as e:
            transport_failed(e, self.settings.url, "commit", timeout_s)
        status, stored, handle, offset = DOORBELL_RESPONSE.unpack(answer)
        if status:
            code = doorbell_code(status).value
            raise error_class(code)(f"{self.settings.url}: commit refused [{code}]")
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


class Client(StoreApi):
    """The Store API against a daemon; thread-safe (one pool of connections)."""

    def _open_pool(self) -> None:
        self._idle: list[_Connection] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(self.settings.max_connections)
        self._closed = False
        self._release(self._connect())  # fail now, clearly, if the daemon is not there

    def _connect(self) -> Any:
        if self.settings.transport == "ucx":
            from kvstore.client.ucx import UcxConnection

            return UcxConnection(self.settings)
        return _Connection(self.settings)

    def _acquire(self) -> _Connection:
        with self._lock:
            if self._closed:
                raise KVStoreError(f"the client of {self.settings.url} is closed")
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
        deadline = time.monotonic() + self.settings.timeout_s
        with self._slots:
            for attempt in itertools.count():
                conn = None
                try:
                    conn = self._acquire()
                    result = _drive(make(conn.session), conn, deadline)
                except StoreConnectionError as e:  # only a broken connection is retried
                    if conn is not None:
                        conn.close()
                    time.sleep(self.settings.retry_delay_s(attempt, deadline, e))
                    continue
                except BaseException as e:
                    if conn is not None:
                        self._drop(conn, e)
                    raise
                self._release(conn)
                return result

    @contextlib.contextmanager
    def lend(self, keys: Sequence[bytes]) -> Iterator[PoolLoan]:
        """Pin ``keys``' blocks that lie in the daemon's shared DRAM pool (same host), to
        be read in place, e.g. by a GPU kernel through the page-locked pool: a `PoolLoan`
        of their addresses, unpinned when the block exits. Blocks elsewhere (another
        tier, absent, or no pool mapped here) are lent as None: read them with
        `get_many_into`. A read counts only if it ended before the loan's
        ``valid_until``; after that the slot may have been reused."""
        checked = check_keys(keys)
        # One connection for the loan (its pins belong to it), taken outside the
        # ``max_connections`` bound: the loan's holder goes on to call the client (the
        # blocks not lent), which must not wait for the loan's connection.
        conn = self._acquire()
        session = conn.session
        # A registered pool stays registered while lent, even if a restarted daemon's
        # hello replaces it meanwhile (a GPU may still be reading it).
        held = session.pool is not None and session.is_pool_registered and (
            hold_pool(session.pool_name))
        try:
            loan = _drive(Operations.pin_in_pool(
                session, checked, lend=held or not session.is_pool_registered), conn,
                time.monotonic() + self.settings.timeout_s)
        except BaseException as e:
            if held:
                release_pool(session.pool_name)
            self._drop(conn, e)
            raise
        try:
            yield loan
        finally:
            try:
                _drive(Operations.unpin(loan.handles), conn,
                       time.monotonic() + self.settings.timeout_s)
            except BaseException as e:  # (a closed connection's pins are let go)
                self._drop(conn, e)
                if not isinstance(e, (StoreConnectionError, DeadlineExceededError)):
                    raise
            else:
                self._release(conn)
            finally:
                if held:
                    release_pool(session.pool_name)

    @property
    def can_lend(self) -> bool:
        """Whether `lend` can lend blocks for a GPU to read in place: the daemon's pool is
        mapped here and page-locked (registered with CUDA)."""
        conn = self._acquire()
        try:
            return conn.session.pool is not None and conn.session.is_pool_registered
        finally:
            self._release(conn)

    def _drop(self, conn: _Connection, error: BaseException) -> None:
        """After ``error`` on ``conn``: a broken or timed-out connection is closed, any
        other kept."""
        if isinstance(error, (StoreConnectionError, DeadlineExceededError)):
            conn.close()
        else:
            self._release(conn)

    @property
    def node_id(self) -> str:
        """The id of the daemon this client talks to, as its hello said (a pool's node
        id: `kvstore.cluster`)."""
        conn = self._acquire()
        try:
            return conn.session.node_id
        finally:
            self._release(conn)

    @property
    def tiers(self) -> list[str]:
        """The daemon's tiers, fastest first, as its hello said, then ``"remote"`` where
        it is a node of a pool (its `tier_bits` answers 8 for a block only a peer holds)."""
        conn = self._acquire()
        try:
            session = conn.session
            return [*session.tiers, *(["remote"] if session.scope else [])]
        finally:
            self._release(conn)

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


def _drive(operation: Operation, conn: _Connection, deadline: float) -> Any:
    try:
        request = next(operation)
        while True:
            request = operation.send(conn.request(*call_args(request, deadline, conn.settings.url)))
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



RawConnection = _Connection  # one connection, requests as meta dicts (kvstore.cluster.peers)

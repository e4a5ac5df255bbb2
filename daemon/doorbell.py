"""The commit doorbell: a same-host client's single puts committed over a Unix socket in
fixed-size binary messages, beside its TCP connection.

A put through shared memory is "copy into a spare slot -> commit", and it may only return
once the daemon holds the block, so each put waits for one commit. Over TCP that round
trip (msgpack, validation, two Python event loops and loopback TCP) costs about 170 us on
a 2-core VM, beside a ~480 us copy of 4 MiB; a 32-byte message over a Unix socket, read on
the daemon's loop and answered in the same callback, costs a fraction of it. The commit
itself is the TCP one (`SharedMemoryPlane.commit`): the same reservations, leases and
answers.

    client ──TCP: doorbell──> daemon: {path, secret}   (a shared-memory connection only)
    client ──connect(path), secret (32 bytes)──> bound to that connection; 1 byte back
    client ──REQUEST──> commit(handle, key) + a spare slot of spare_size ──RESPONSE──> client

    REQUEST  <Q handle><16s key><Q spare_size>            32 bytes (spare_size 0: none)
    RESPONSE <Q status><Q stored><Q spare_handle><Q spare_offset>   32 bytes
             status 0: done; else an error code (`kvstore.wire.doorbell`)

A doorbell belongs to its TCP connection: it serves that connection's reservations, is
closed when the connection ends, and one secret binds one doorbell. A secret that binds
nothing, or a message after it that is not 32 bytes by the time the socket closes, ends
the doorbell and changes nothing. The socket lives in a directory only the daemon's user
can enter, beside the pool in /dev/shm (`daemon.segments.doorbell_directory`), which is
readable by that user only; named for the daemon like the pool, it is removed with the
pool's leftovers when the daemon dies without stopping.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
from typing import Any

from daemon.answering import Request, run_in_place
from daemon.connection import Connection
from kvstore.wire.doorbell import (
    DOORBELL_MESSAGE_BYTES,
    DOORBELL_REQUEST,
    DOORBELL_RESPONSE,
    doorbell_status,
)
from kvstore.wire.error_codes import ErrorCode

log = logging.getLogger(__name__)

REQUEST, RESPONSE = DOORBELL_REQUEST, DOORBELL_RESPONSE
SECRET_BYTES = MESSAGE_BYTES = DOORBELL_MESSAGE_BYTES


class Doorbells:
    """The Unix socket the doorbells ring on, and the secrets not yet bound."""

    def __init__(self, daemon: Any, directory: str) -> None:
        self.daemon = daemon
        os.mkdir(directory, 0o700)
        self._directory = directory
        self.path = os.path.join(directory, "commit.sock")
        self._secrets: dict[bytes, Connection] = {}
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: DoorbellProtocol(self), self.path)

    def issue(self, conn: Connection) -> bytes:
        """A secret that binds one doorbell to ``conn`` (one at a time per connection)."""
        if conn.doorbell_secret is not None:
            self._secrets.pop(conn.doorbell_secret, None)
        secret = secrets.token_bytes(SECRET_BYTES)
        self._secrets[secret] = conn
        conn.doorbell_secret = secret
        return secret

    def bind(self, secret: bytes) -> Connection | None:
        conn = self._secrets.pop(secret, None)
        if conn is not None:
            conn.doorbell_secret = None
        return conn

    def forget(self, conn: Connection) -> None:
        """``conn`` ended: its secret binds nothing any more, its doorbell closes."""
        if conn.doorbell_secret is not None:
            self._secrets.pop(conn.doorbell_secret, None)
            conn.doorbell_secret = None
        if conn.doorbell is not None:
            conn.doorbell.close()
            conn.doorbell = None

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        shutil.rmtree(self._directory, ignore_errors=True)


class DoorbellProtocol(asyncio.BufferedProtocol):
    """One doorbell: a secret, then 32-byte commit requests answered in order."""

    def __init__(self, doorbells: Doorbells) -> None:
        self.doorbells = doorbells
        self.daemon = doorbells.daemon
        self.transport: Any = None
        self.conn: Connection | None = None
        self._message = bytearray(MESSAGE_BYTES)
        self._view = memoryview(self._message)
        self._filled = 0
        self._waiting: asyncio.Task[None] | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self.conn is not None and self.conn.doorbell is self.transport:
            self.conn.doorbell = None

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view[self._filled:]

    def buffer_updated(self, nbytes: int) -> None:
        self._filled += nbytes
        if self._filled < MESSAGE_BYTES:
            return
        self._filled = 0
        message = bytes(self._message)
        if self.conn is None:
            self._bind(message)
        else:
            self._commit(message)

    def _bind(self, secret: bytes) -> None:
        conn = self.doorbells.bind(secret)  # a connection that ended has no secret
        if conn is None:
            log.warning("doorbell with an unknown secret: closed")
            self.transport.abort()
            return
        if conn.doorbell is not None:
            conn.doorbell.close()
        self.conn, conn.doorbell = conn, self.transport
        self.transport.write(b"\x01")

    def _commit(self, message: bytes) -> None:
        """Commit as the TCP op does: at once when the store lock is free, else on a
        worker thread (reading pauses until it is answered)."""
        conn = self.conn
        assert conn is not None
        handle, key, spare_size = REQUEST.unpack(message)
        meta = {"handles": [handle], "keys": [key],
                "reserve_sizes": [spare_size] if spare_size else []}
        self._waiting = run_in_place(self.daemon.shm.commit(conn, meta, b""), None,
                                     self._settle)
        if self._waiting is not None:
            self.transport.pause_reading()

    def _settle(self, result: Any, error: Exception | None) -> None:
        if error is None:
            self._answer(result)
        else:
            self._fail(error)
        if self._waiting is not None:  # answered by the task: read on
            self._waiting = None
            if not self.transport.is_closing():
                self.transport.resume_reading()

    def _answer(self, result: tuple[dict[str, Any], list[Any]]) -> None:
        fields, _ = result
        handles, offsets = fields.get("handles") or [0], fields.get("offsets") or [0]
        self.transport.write(RESPONSE.pack(0, fields["stored"], handles[0], offsets[0]))

    def _fail(self, error: Exception) -> None:
        """Answer a commit that raised as the TCP op would (logged and counted the same)."""
        assert self.conn is not None
        response = self.daemon.answer_error(self.conn, Request(op="commit"), error)[0]
        status = doorbell_status(ErrorCode(response["code"]))
        self.transport.write(RESPONSE.pack(status, 0, 0, 0))

"""The asyncio client of `kvstored` (`aconnect`, `AsyncClient`): `kvstore.client.sync`'s
Store API as coroutines, over asyncio streams (or UCX, `kvstore.client.ucx`).

The same operations run here as in the sync client, with the same retries: a broken
connection is retried on a fresh one, an answered error is raised at once, and a call
that runs out of time, or is cancelled, drops its connection (`CancelledError` is
re-raised first).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

from kvstore.client.answers import Response, checked, transport_failed
from kvstore.client.api import StoreApi
from kvstore.client.operations import Operation, call_args
from kvstore.client.session import Session, ahello
from kvstore.client.settings import ClientSettings
from kvstore.errors import DeadlineExceededError, KVStoreError, StoreConnectionError
from kvstore.wire import frames
from kvstore.wire.frames import FrameKind


class _AsyncConnection:
    """One asyncio stream to the daemon, after hello."""

    def __init__(self, settings: ClientSettings, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.settings = settings
        self.reader, self.writer = reader, writer
        self._ids = itertools.count(1)
        self._unanswered = 0
        self.session: Session | None = None

    @classmethod
    async def open(cls, settings: ClientSettings) -> _AsyncConnection:
        host, port = settings.address
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, limit=1 << 20), settings.connect_timeout_s)
        except (OSError, TimeoutError) as e:
            raise StoreConnectionError(f"cannot reach kvstored at {settings.url}: "
                                       f"{getattr(e, 'strerror', None) or e}") from e
        conn = cls(settings, reader, writer)
        await ahello(conn, settings)
        return conn

    async def request(self, meta: dict[str, Any], parts: list[Any], timeout_s: float,
                      wait: bool = True) -> Response | None:
        """As `kvstore.client.sync`'s `_Connection.request`."""
        request_id = next(self._ids)
        meta = {**meta, "id": request_id, "timeout_ms": max(1, int(timeout_s * 1000))}
        data_bytes = sum(memoryview(p).nbytes for p in parts)
        try:
            async with asyncio.timeout(timeout_s + 1.0):
                self.writer.write(frames.encode(FrameKind.REQUEST, meta, data_bytes))
                for part in parts:
                    self.writer.write(memoryview(part).cast("B"))
                await self.writer.drain()
                if not wait:
                    self._unanswered += 1
                    return None
                while True:
                    header = frames.decode_header(
                        await self.reader.readexactly(frames.HEADER_BYTES),
                        max_data_bytes=1 << 40, expect=FrameKind.RESPONSE)
                    answer = frames.decode_meta(
                        await self.reader.readexactly(header.meta_bytes))
                    data = memoryview(await self.reader.readexactly(header.data_bytes))
                    if not self._unanswered:
                        break
                    self._unanswered -= 1
        except Exception as e:
            transport_failed(e, self.settings.url, meta["op"], timeout_s)
        return checked(answer, request_id, data, self.settings.url)

    def close(self) -> None:
        self.writer.close()


class AsyncClient(StoreApi):
    """The Store API against a daemon, as coroutines (`await client.get(key)`)."""

    def _open_pool(self) -> None:
        self._idle: list[_AsyncConnection] = []
        self._slots = asyncio.Semaphore(self.settings.max_connections)
        self._closed = False

    async def _run(self, make: Any) -> Any:
        deadline = time.monotonic() + self.settings.timeout_s
        async with self._slots:
            for attempt in itertools.count():
                conn = None
                try:
                    if self._closed:
                        raise KVStoreError(f"the client of {self.settings.url} is closed")
                    conn = self._idle.pop() if self._idle else await self._open()
                    result = await _adrive(make(conn.session), conn, deadline)
                except (DeadlineExceededError, asyncio.CancelledError):
                    if conn is not None:
                        conn.close()
                    raise
                except StoreConnectionError as e:  # only a broken connection is retried
                    if conn is not None:
                        conn.close()
                    await asyncio.sleep(self.settings.retry_delay_s(attempt, deadline, e))
                    continue
                except BaseException:
                    if conn is not None:
                        self._idle.append(conn)
                    raise
                self._idle.append(conn)
                return result

    async def _open(self) -> Any:
        if self.settings.transport == "ucx":
            from kvstore.client.ucx import AsyncUcxConnection

            return await AsyncUcxConnection.open(self.settings)
        return await _AsyncConnection.open(self.settings)

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
                await conn.request(*call_args(request, deadline, conn.settings.url)))
    except StopIteration as done:
        return done.value


async def aconnect(url: str, token: str | None = None, *, namespace: str | None = None,
                   timeout_s: float = 30.0, shared_memory: bool = True) -> AsyncClient:
    """`connect`, for asyncio: the methods are coroutines. Connects once to fail early."""
    client = AsyncClient(url, token=token, namespace=namespace, timeout_s=timeout_s,
                         shared_memory=shared_memory)
    await client.stats()
    return client

"""The client's UCX connections (``kvstore+ucx://HOST:PORT``): the sync and the asyncio
client's requests carried over a `kvstore.wire.ucx.UcxStream`.

ucxx completes requests through Python futures of the loop that initialised it, so one
private loop per process (`ucx_loop`, in a daemon thread) owns every client endpoint: the
sync client (from any thread) and the async client (from any loop) submit coroutines to
it. A request cut short by a timeout leaves a receive posted: its stream is closed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import socket
import threading
from typing import Any

from kvstore.client.answers import Response, checked, transport_failed
from kvstore.client.session import Session, ahello, hello
from kvstore.client.settings import ClientSettings
from kvstore.errors import DeadlineExceededError, StoreConnectionError
from kvstore.wire import frames
from kvstore.wire import ucx as wire_ucx
from kvstore.wire.frames import FrameKind
from kvstore.wire.ucx import UCXError, UcxStream

START_TIMEOUT_S = 30.0  # starting UCX (the first connection of a process)
GRACE_S = 2.0  # past a request's own timeout, before the calling thread gives up on it

_loop_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None


def ucx_loop() -> asyncio.AbstractEventLoop:
    """The loop (in a daemon thread) that owns this process's client endpoints."""
    global _loop
    with _loop_lock:
        if _loop is None:
            wire_ucx.require_ucxx()
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="kvstore-ucx", daemon=True).start()

            async def start() -> None:
                wire_ucx.init_ucx()

            asyncio.run_coroutine_threadsafe(start(), loop).result(START_TIMEOUT_S)
            # ucxx's notifier thread is not a daemon thread: stop it before the interpreter
            # joins threads at exit (atexit runs too late for that).
            threading._register_atexit(_stop_notifier)  # type: ignore[attr-defined]
            _loop = loop
    return _loop


def _stop_notifier() -> None:
    if wire_ucx.ucxx is not None:
        wire_ucx.ucxx.stop_notifier_thread()


async def _open_stream(settings: ClientSettings) -> UcxStream:
    host, port = settings.address
    try:
        async with asyncio.timeout(settings.connect_timeout_s + 1.0):
            infos = await asyncio.get_running_loop().getaddrinfo(host, port,
                                                                 type=socket.SOCK_STREAM)
            ip = infos[0][4][0]
            endpoint = await wire_ucx.ucxx.create_endpoint(
                ip, port, connect_timeout=settings.connect_timeout_s)
    except (OSError, UCXError) as e:  # TimeoutError included: UCX waits out a dead port
        raise StoreConnectionError(f"cannot reach kvstored at {settings.url}: "
                                   f"{e or type(e).__name__}") from e
    return UcxStream(endpoint, (ip, port))


class _Channel:
    """Requests and their answers over a UcxStream (the TCP clients' `request`); its
    coroutines run on the UCX loop."""

    def __init__(self, stream: UcxStream, url: str) -> None:
        self.stream = stream
        self.url = url
        self._ids = itertools.count(1)
        self._unanswered = 0  # requests sent with wait=False: their answers come first

    async def request(self, meta: dict[str, Any], parts: list[Any], timeout_s: float,
                      wait: bool) -> Response | None:
        request_id = next(self._ids)
        meta = {**meta, "id": request_id, "timeout_ms": max(1, int(timeout_s * 1000))}
        data_bytes = sum(memoryview(p).nbytes for p in parts)
        stream = self.stream
        try:
            async with asyncio.timeout(timeout_s + 1.0):  # the daemon answers a deadline first
                stream.write(frames.encode(FrameKind.REQUEST, meta, data_bytes))
                for part in parts:
                    stream.write(part)
                await stream.drain()
                if not wait:
                    self._unanswered += 1
                    return None
                while True:
                    header = frames.decode_header(
                        await stream.readexactly(frames.HEADER_BYTES),
                        max_data_bytes=1 << 40, expect=FrameKind.RESPONSE)
                    answer = frames.decode_meta(await stream.readexactly(header.meta_bytes))
                    data = memoryview(await stream.readexactly(header.data_bytes))
                    if not self._unanswered:
                        break
                    self._unanswered -= 1
        except Exception as e:
            if isinstance(e, TimeoutError):
                stream.close()  # a receive may still be posted: the stream is broken
            transport_failed(e, self.url, meta["op"], timeout_s)
        return checked(answer, request_id, data, self.url)


def _wait(future: concurrent.futures.Future[Any], timeout_s: float, what: str) -> Any:
    """The result of a coroutine submitted to the UCX loop, waited for from another thread."""
    try:
        return future.result(timeout_s)
    except TimeoutError:
        if future.done():
            raise  # the coroutine's own error (a DeadlineExceededError)
        future.cancel()
        raise DeadlineExceededError(f"{what}: no answer from the UCX loop within "
                                    f"{timeout_s:g} s") from None


class UcxConnection:
    """One UCX endpoint to the daemon for the sync `Client`; usable from any thread."""

    def __init__(self, settings: ClientSettings) -> None:
        self.settings = settings
        self._loop = ucx_loop()
        future = asyncio.run_coroutine_threadsafe(_open_stream(settings), self._loop)
        stream = _wait(future, settings.connect_timeout_s + 1.0 + GRACE_S,
                       f"connecting to {settings.url}")
        self._channel = _Channel(stream, settings.url)
        self.session: Session
        hello(self, settings)

    def request(self, meta: dict[str, Any], parts: list[Any], timeout_s: float,
                wait: bool = True) -> Response | None:
        future = asyncio.run_coroutine_threadsafe(
            self._channel.request(meta, parts, timeout_s, wait), self._loop)
        try:
            return _wait(future, timeout_s + 1.0 + GRACE_S,
                         f"{meta['op']} to {self.settings.url}")
        except DeadlineExceededError:
            self.close()
            raise

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._channel.stream.close)


class AsyncUcxConnection:
    """One UCX endpoint for the `AsyncClient`; its I/O runs on the UCX loop, whatever loop
    awaits it (cancelling the awaiting task cancels the I/O there)."""

    def __init__(self, settings: ClientSettings, loop: asyncio.AbstractEventLoop,
                 stream: UcxStream) -> None:
        self.settings = settings
        self._loop = loop
        self._channel = _Channel(stream, settings.url)
        self.session: Session | None = None

    @classmethod
    async def open(cls, settings: ClientSettings) -> AsyncUcxConnection:
        loop = await asyncio.to_thread(ucx_loop)
        stream = await asyncio.wrap_future(
            asyncio.run_coroutine_threadsafe(_open_stream(settings), loop))
        conn = cls(settings, loop, stream)
        await ahello(conn, settings)
        return conn

    async def request(self, meta: dict[str, Any], parts: list[Any], timeout_s: float,
                      wait: bool = True) -> Response | None:
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(
            self._channel.request(meta, parts, timeout_s, wait), self._loop))

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._channel.stream.close)

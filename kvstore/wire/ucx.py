"""The UCX transport (``kvstore+ucx://HOST:PORT``, through ``ucxx``): the same frames as
TCP (`kvstore.wire.frames`), carried as UCX tag messages.

    write(part)... drain() ──ep.send_multi([chunk, ...])──> ep.recv_multi() -> [chunk, ...]
                                                                    │
                              readexactly(n) <── slices of chunks ──┘

`UcxStream` adapts an endpoint to the StreamReader/StreamWriter calls the daemon's
connection loop and the clients make, so both sides keep their framing code unchanged.
Invariants:

- One drain is one multi-buffer message. Parts under `DIRECT_BYTES` are joined into one
  chunk (a small copy); larger parts are sent as they are, so a value is never copied on
  the sending side, and UCX receives it straight into a buffer of its own.
- `readexactly(n)` returns a slice of the received chunk when the n bytes lie in one
  (a value sent whole), and joins chunks only when a read spans them (the values of a
  put_many or get_many): at most one copy per side. Reads of up to `DIRECT_BYTES` return
  ``bytes``, larger ones a ``memoryview``.
- UCX delivers tag messages between two endpoints in order; a receive cut short
  (cancelled, timed out) would leave a posted receive to swallow the next message, so the
  stream is broken from then on and must be closed.

Threads: ucxx completes requests through Python futures of the event loop that
initialised it (its notifier thread wakes that loop, so an idle receive costs no CPU).
One loop per process therefore owns every UCX endpoint: the daemon's own loop
(`daemon.ucx`), or, in a client process, `kvstore.client.ucx.ucx_loop()`, a private loop
in a daemon thread that the sync client (from any thread) and the async client (from any
loop) submit coroutines to.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any

from kvstore.errors import KVStoreError

try:
    import ucxx
    from ucxx.exceptions import UCXError
except ImportError:  # the extra is optional: kvstore:// (TCP) works without it
    ucxx = None

    class UCXError(Exception):  # type: ignore[no-redef]
        """Stands in for ucxx's error root when ucxx is not installed."""


log = logging.getLogger(__name__)

DIRECT_BYTES = 64 * 1024  # parts this large travel as their own buffer, never copied
CLOSE_PERIOD_NS = 100_000_000  # how long closing an endpoint may wait for UCX (0.1 s)


def require_ucxx() -> None:
    if ucxx is None:
        raise KVStoreError("kvstore+ucx:// (and kvstored --ucx) need the ucxx package: "
                           "pip install 'kvstore[ucx]'; without it, use kvstore:// (TCP)")


def init_ucx() -> None:
    """Initialise ucxx for the running loop, with Python futures (no busy polling).

    Call it from the loop that will own every endpoint of the process.
    """
    require_ucxx()
    try:
        ucxx.init(enable_python_future=True, progress_mode="thread")
    except RuntimeError:  # already initialised (by this module or by the application)
        log.debug("ucxx was already initialised; using its context")


class UcxStream:
    """A UCX endpoint as an asyncio StreamReader and StreamWriter (the calls kvstore uses).

    Used only from the loop that owns the endpoint, one reader and one writer at a time.
    """

    def __init__(self, endpoint: Any, peername: tuple[str, Any]) -> None:
        self._endpoint = endpoint
        self._peername = peername
        self._chunks: deque[memoryview] = deque()
        self._buffered_bytes = 0
        self._pending: list[memoryview] = []
        self._broken = False
        self._closing: asyncio.Task[None] | None = None

    # -- the reader -----------------------------------------------------------------------------

    async def readexactly(self, nbytes: int) -> bytes | memoryview:
        while self._buffered_bytes < nbytes:
            if self._broken or self._closing is not None:
                raise asyncio.IncompleteReadError(b"", nbytes)
            try:
                received = await self._endpoint.recv_multi()
            except UCXError as e:
                self._broken = True
                log.debug("UCX receive ended peer=%s: %s", self._peername, e)
                raise asyncio.IncompleteReadError(b"", nbytes) from None
            except BaseException:  # cancelled: a receive may still be posted
                self._broken = True
                raise
            for chunk in received:
                view = memoryview(chunk).cast("B")
                if view.nbytes:
                    self._chunks.append(view)
                    self._buffered_bytes += view.nbytes
        if nbytes == 0:
            return b""
        self._buffered_bytes -= nbytes
        head = self._chunks[0]
        if head.nbytes >= nbytes:  # within one chunk: a slice
            if head.nbytes == nbytes:
                self._chunks.popleft()
            else:
                self._chunks[0] = head[nbytes:]
            piece = head[:nbytes]
            return bytes(piece) if nbytes <= DIRECT_BYTES else piece
        joined = bytearray(nbytes)  # spans chunks: the one copy
        filled = 0
        while filled < nbytes:
            head = self._chunks.popleft()
            take = min(head.nbytes, nbytes - filled)
            joined[filled:filled + take] = head[:take]
            if take < head.nbytes:
                self._chunks.appendleft(head[take:])
            filled += take
        return bytes(joined) if nbytes <= DIRECT_BYTES else memoryview(joined)

    # -- the writer -----------------------------------------------------------------------------

    def write(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        if view.nbytes:
            self._pending.append(view)

    async def drain(self) -> None:
        pending, self._pending = self._pending, []
        if not pending:
            return
        if self._broken or self._closing is not None:
            raise ConnectionResetError("the UCX endpoint is closed")
        chunks: list[Any] = []
        small: list[memoryview] = []
        for part in pending:
            if part.nbytes >= DIRECT_BYTES:
                if small:
                    chunks.append(b"".join(small))
                    small = []
                chunks.append(part)
            else:
                small.append(part)
        if small:
            chunks.append(b"".join(small))
        try:
            await self._endpoint.send_multi(chunks)
        except UCXError as e:
            self._broken = True
            raise ConnectionResetError(f"UCX send failed: {e}") from None
        except BaseException:
            self._broken = True
            raise

    async def linger(self, timeout_s: float) -> None:
        """Wait until the peer hangs up, at most ``timeout_s``, dropping what it sends.

        For a last answer (a refused hello): UCX may fail the peer's receive of a message
        whose endpoint was closed right after the send completed here (ucxx fails the
        receives of an endpoint that errored), so the peer would see a broken connection
        instead of the answer. Hanging up after the peer does cannot lose it."""
        if self._broken or self._closing is not None:
            return
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    await self._endpoint.recv_multi()
        except (UCXError, TimeoutError):
            pass
        finally:
            self._broken = True  # a receive may still be posted

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._peername if name == "peername" else default

    def is_closing(self) -> bool:
        return self._closing is not None

    def close(self) -> None:
        """Start closing the endpoint (the peer's receives then fail); call on the loop."""
        if self._closing is None:
            self._pending.clear()
            self._closing = asyncio.get_running_loop().create_task(self._close_endpoint())

    async def wait_closed(self) -> None:
        self.close()
        assert self._closing is not None
        await asyncio.shield(self._closing)

    async def _close_endpoint(self) -> None:
        try:
            await self._endpoint.close(period=CLOSE_PERIOD_NS)
        except Exception as e:  # closing a broken endpoint: nothing left to save
            log.debug("closing UCX endpoint peer=%s: %s", self._peername, e)

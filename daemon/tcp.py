"""The daemon's TCP connections, served without streams: frames are cut out of a receive
buffer as they arrive and a request is answered in the same callback when its handler
does not wait (the store lock was free), with no task and no extra loop iteration. That
is most requests: the shared-memory commit, pin and unpin, `contains`, `match_prefix`.

    bytes ──get_buffer/buffer_updated──> receive buffer ──one whole frame──> Daemon.reply
          (a frame with large data is received straight into its own buffer)     │
    handler done at once: answered here │ handler waits: a task; reading pauses until it ends

Frames on a connection are answered in order: while a request waits, reading is paused
(the kernel's socket buffer applies backpressure to the client). A started frame must be
complete within the frame timeout, and a client that does not read its answers is dropped
after the same time (the write buffer stays bounded). A large body first takes a share of
the daemon's frame memory (`daemon.frame_memory`): until it gets one, reading is paused
too, and the frame is not timed (the daemon is the one not reading). UCX connections use
the stream form of the same loop (`daemon.streams`).
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import socket
import time
from typing import Any

from daemon.answering import Answer, Request, run_in_place
from daemon.connection import Connection
from daemon.frame_memory import Share, Waiter
from kvstore.wire import frames
from kvstore.wire.error_codes import RequestError
from kvstore.wire.frames import FrameKind

log = logging.getLogger(__name__)

BUFFER_BYTES = 256 * 1024  # the receive buffer; frames up to half of it are cut from it
OWN_BUFFER_BYTES = BUFFER_BYTES // 2  # a frame body larger than this gets its own buffer


def _ignore() -> None:
    return None


class FrameProtocol(asyncio.BufferedProtocol):
    """One TCP client of a `daemon.server.Daemon`."""

    def __init__(self, daemon: Any) -> None:
        self.daemon = daemon
        self.loop = asyncio.get_running_loop()
        self.transport: Any = None
        self.conn = Connection(peer="?")
        self.conn.stop, self.conn.kill = self._stop, self._kill
        self.conn.closed = self.loop.create_future()
        self.reason = "closed by client"
        self._buffer = mmap.mmap(-1, BUFFER_BYTES)  # pages committed as bytes arrive
        self._view = memoryview(self._buffer)
        self._start = self._end = 0  # bytes received, not yet cut into frames
        # A frame whose body is received into its own buffer: header, body, bytes in it,
        # and its share of the frame memory (held until its request is answered).
        self._header: frames.Header | None = None
        self._body: memoryview | None = None
        self._filled = 0
        self._share: Share | None = None
        self._waiter: Waiter | None = None  # waiting for that share
        self._request: asyncio.Task[None] | None = None  # a request's handler that waits
        self._frame_timer: asyncio.TimerHandle | None = None  # a started frame's deadline
        self._write_timer: asyncio.TimerHandle | None = None  # the client must read by then
        self._stopping = False  # hang up once the request in hand is answered
        self._writing_paused = False  # the client does not read its answers fast enough

    # -- the connection -------------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport  # uvloop's transports are not asyncio.Transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        self.conn.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        self.daemon.connected(self.conn)
        if self.daemon.is_stopping:
            self._stop()

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None and self.reason == "closed by client":
            self.reason = f"connection lost ({type(exc).__name__})"
        for timer in (self._frame_timer, self._write_timer):
            if timer is not None:
                timer.cancel()
        if self._waiter is not None:
            self.daemon.frame_memory.cancel(self._waiter)
            self._waiter = None
        self.loop.create_task(self._ended(), name="kvstored-connection-end")

    async def _ended(self) -> None:
        """After the request in hand (its reservations are this connection's too)."""
        try:
            if self._request is not None:
                await asyncio.gather(self._request, return_exceptions=True)
            # A body still held: cut short, or its request cancelled (then a worker thread
            # may still read it: not reused).
            self._give_back(reuse=self._request is None)
            self._header = self._body = None
            await self.daemon.disconnected(self.conn, self.reason)
        finally:
            self.conn.closed.set_result(None)
            # Nothing refers back to this protocol now, so it goes (with its buffers) at
            # once, not when the cycle collector next runs (an idle daemon may never).
            self.conn.stop = self.conn.kill = _ignore

    def _stop(self) -> None:
        """The daemon stops: hang up now if idle, else once the request is answered."""
        self._stopping = True
        if not self.conn.busy and self.transport is not None:
            self._hang_up("daemon stopping")

    def _kill(self) -> None:
        if self._request is not None:
            self._request.cancel()
        if self.transport is not None:
            self.transport.abort()

    def _hang_up(self, reason: str) -> None:
        """End the connection after writing what is queued (the client may still read
        it); a client that reads none of it for a lease is gone: drop it all then."""
        self.reason = reason
        self.transport.close()
        if self._write_timer is not None:
            self._write_timer.cancel()
        self._write_timer = self.loop.call_later(self.daemon.config.lease_s,
                                                 self.transport.abort)

    # -- receiving ------------------------------------------------------------------------------

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._body is not None:
            return self._body[self._filled:]
        if self._start and len(self._buffer) - self._end < OWN_BUFFER_BYTES:
            # Make room at the end: a frame cut from the buffer fits in half of it.
            kept = self._end - self._start
            self._view[:kept] = self._view[self._start:self._end]
            self._start, self._end = 0, kept
        return self._view[self._end:]

    def buffer_updated(self, nbytes: int) -> None:
        if self._body is not None:
            self._filled += nbytes
            if self._filled < len(self._body):
                return
            header, body = self._header, self._body
            assert header is not None
            self._header = self._body = None
            self._frame_complete()
            self._answer(header, bytes(body[:header.meta_bytes]), body[header.meta_bytes:])
            self._cut_frames()
            return
        self._end += nbytes
        self._cut_frames()

    def eof_received(self) -> bool:
        # The client is done (a frame it cut short is dropped): close once what is queued
        # is written, or after a lease if it is never read.
        self._hang_up(self.reason)
        return True

    def _cut_frames(self) -> None:
        """Answer every whole frame received, in order, until one has to wait."""
        view = self._view
        while self._ready():
            start, end = self._start, self._end
            if end - start < frames.HEADER_BYTES:
                break
            try:
                header = frames.decode_header(
                    bytes(view[start:start + frames.HEADER_BYTES]),
                    max_data_bytes=self.daemon.max_frame_data_bytes, expect=FrameKind.REQUEST)
            except RequestError as e:
                self._refuse(e)
                return
            body_bytes = header.meta_bytes + header.data_bytes
            body_start = start + frames.HEADER_BYTES
            have = end - body_start
            if have < body_bytes:
                if body_bytes <= OWN_BUFFER_BYTES:
                    break  # the rest will fit in this buffer
                try:
                    self.daemon.check_large_body(self.conn, body_bytes)
                except RequestError as e:
                    self._refuse(e)
                    return
                if not self._take_share(body_bytes):
                    return  # reading paused until the frame memory has room for it
                # A large body is received straight into a buffer of its own (reused:
                # warm pages, no zero-filling; see daemon.frame_memory).
                assert self._share is not None and self._share.body_bytes == body_bytes, \
                    "a share granted for another frame"
                body = self.daemon.frame_memory.buffer(self._share)
                body[:have] = view[body_start:end]
                self._header, self._body, self._filled = header, body, have
                self._start = self._end = 0
                self._frame_started()
                return
            meta_end = body_start + header.meta_bytes
            self._start = meta_end + header.data_bytes
            self._frame_complete()
            # Copies: the buffer is reused while a handler may still hold its data.
            self._answer(header, bytes(view[body_start:meta_end]),
                         bytes(view[meta_end:self._start]))
        if self._start == self._end:
            self._start = self._end = 0
        elif self._ready():  # a frame has begun; not timed while it waits for us
            self._frame_started()

    def _refuse(self, error: RequestError) -> None:
        """A frame that cannot be read: answer it, and hang up (the stream cannot be
        resynchronised)."""
        self._start = self._end
        self.conn.busy = True
        self._respond(self.daemon.answer_error(self.conn, Request(), error),
                      time.perf_counter())

    def _take_share(self, nbytes: int) -> bool:
        """Hold a share of the frame memory for a body of ``nbytes``: True once held; else
        the connection waits for it (reading paused, the frame not timed meanwhile)."""
        if self._share is None:
            self._share = self.daemon.frame_memory.try_take(nbytes)
        if self._share is not None:
            return True
        self._waiter = self.daemon.frame_memory.wait(nbytes, self._granted, self.conn.peer)
        self.transport.pause_reading()
        self._frame_complete()  # not timed while the daemon is the one not reading
        return False

    def _granted(self, share: Share) -> None:
        self._waiter = None
        if self.transport.is_closing():  # ended meanwhile
            self.daemon.frame_memory.give_back(share)
            return
        self._share = share
        self._go_on()  # the frame is cut again, this time into a buffer of its own

    def _give_back(self, reuse: bool) -> None:
        share, self._share = self._share, None
        if share is not None:
            self.daemon.frame_memory.give_back(share, reuse=reuse)

    def _frame_started(self) -> None:
        if self._frame_timer is None:
            self._frame_timer = self.loop.call_later(
                self.daemon.config.frame_timeout_s, self._hang_up,
                "connection lost (frame not complete within the frame timeout)")

    def _frame_complete(self) -> None:
        if self._frame_timer is not None:
            self._frame_timer.cancel()
            self._frame_timer = None

    # -- answering ------------------------------------------------------------------------------

    def _answer(self, header: frames.Header, raw_meta: bytes, data: Any) -> None:
        """Run one request: answered at once if its handler does not wait, else by a task
        under the request's deadline (reading pauses until it is answered). A body's share
        of the frame memory is given back once the request is done with it."""
        started = time.perf_counter()
        self.conn.busy = True
        daemon, request = self.daemon, Request()
        try:
            handler = daemon.start_request(self.conn, header, raw_meta, data, request)
        except Exception as e:
            self._give_back(reuse=True)
            self._respond(daemon.answer_error(self.conn, request, e), started)
            return

        def settle(result: Any, error: Exception | None) -> None:
            # Past its deadline a handler's worker thread may still read the body.
            self._give_back(reuse=not isinstance(error, TimeoutError))
            answer = (daemon.answer_ok(request, result) if error is None
                      else daemon.answer_error(self.conn, request, error))
            if self._request is None:  # answered in place: the caller reads on
                self._respond(answer, started)
                return
            self._request = None
            try:
                self._respond(answer, started)
                self._go_on()
            except Exception:  # no answer can be trusted to follow: end the connection
                log.exception("answering peer=%s failed", self.conn.peer)
                self._hang_up("internal error")

        self._request = run_in_place(handler, request.timeout_s, settle)
        if self._request is not None:
            self.transport.pause_reading()

    def _ready(self) -> bool:
        """Whether the next frame may be answered now."""
        return (self._request is None and self._waiter is None and not self._writing_paused
                and not self.transport.is_closing())

    def _go_on(self) -> None:
        """Read and answer again, once nothing holds the connection back."""
        if self._ready():
            self.transport.resume_reading()
            self._cut_frames()

    def _respond(self, answer: Answer, started: float) -> None:
        response, out, keep_open, op = answer
        self.conn.busy = False
        transport = self.transport
        if transport.is_closing():  # the client went away meanwhile
            return
        data_bytes = sum(len(part) for part in out)
        transport.write(frames.encode(FrameKind.RESPONSE, response, data_bytes))
        for part in out:
            transport.write(part)
        self.daemon.observe(op, started, response["ok"], data_bytes)
        if not keep_open:
            self._hang_up("bad frame")  # after the answer is written
        elif self._stopping:
            self._hang_up("daemon stopping")

    # -- a client that does not read ------------------------------------------------------------

    def pause_writing(self) -> None:
        self._writing_paused = True  # no new requests while answers pile up
        self.transport.pause_reading()
        if self.transport.is_closing():  # hung up already; its own timer runs
            return
        self._write_timer = self.loop.call_later(
            self.daemon.config.frame_timeout_s, self._hang_up,
            "connection lost (answers not read within the frame timeout)")

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._write_timer is not None and not self.transport.is_closing():
            self._write_timer.cancel()
            self._write_timer = None
        self._go_on()

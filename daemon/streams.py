"""The daemon's connections given as streams (a UCX endpoint's `kvstore.wire.ucx.UcxStream`,
from `daemon.ucx`): one task per connection reads a frame, answers it through
`daemon.server.Daemon.reply`, and writes the response, in order.

TCP connections are served without streams (`daemon.tcp.FrameProtocol`), the same way:
framing, validation, auth, deadlines, frame memory and metrics are the daemon's. Idle
between requests may last; a started frame must be complete within the frame timeout, or
the connection is dropped (half a frame cannot be resynchronised).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any

from daemon.answering import Request
from daemon.connection import Connection
from daemon.frame_memory import Share
from daemon.tcp import OWN_BUFFER_BYTES
from kvstore.wire import frames
from kvstore.wire.error_codes import RequestError
from kvstore.wire.frames import FrameKind

if TYPE_CHECKING:
    from daemon.server import Daemon


class StreamServer:
    """Serves a `Daemon`'s stream connections (`serve`, one task each)."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    async def serve(self, reader: Any, writer: Any) -> None:
        """Serve one connection given as a stream (a UCX endpoint's `UcxStream`; TCP goes
        through `daemon.tcp.FrameProtocol`, which answers the same way without streams)."""
        task = asyncio.current_task()
        assert task is not None
        peername = writer.get_extra_info("peername")
        conn = Connection(peer=f"{peername[0]}:{peername[1]}" if peername else "?")
        conn.stop = lambda: None if conn.busy else task.cancel()  # busy: ends after it
        conn.kill, conn.closed = task.cancel, task
        self.daemon.connected(conn)
        reason = "closed by client"
        try:
            while not self.daemon.is_stopping:
                try:
                    # Idle between requests may last; a started frame must finish in time.
                    first = await reader.readexactly(1)
                    rest, = await self._read_in_time(reader, frames.HEADER_BYTES - 1)
                    raw = first + rest
                except asyncio.IncompleteReadError:
                    break
                conn.busy = True
                keep_open = await self._answer(conn, raw, reader, writer)
                conn.busy = False
                if not keep_open:
                    reason = "bad frame"
                    await writer.linger(self.daemon.config.frame_timeout_s)  # the answer arrives
                    break
            else:
                reason = "daemon stopping"
        except asyncio.CancelledError:
            reason = "daemon stopping"
            if not self.daemon.is_closed:
                raise
            # stop() cancelled this idle connection: end normally
        except (ConnectionError, TimeoutError) as e:
            reason = f"connection lost ({type(e).__name__})"
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)
            await self.daemon.disconnected(conn, reason)

    async def _answer(self, conn: Connection, raw: bytes, reader: Any, writer: Any) -> bool:
        """Read the rest of one request from a stream, run it, write the response; False
        to hang up."""
        started = time.perf_counter()
        share: Share | None = None
        try:
            header = frames.decode_header(raw, max_data_bytes=self.daemon.max_frame_data_bytes,
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
            answer = self.daemon.answer_error(conn, Request(), e)
        else:
            answer = await self.daemon.reply(conn, header, raw_meta, data)
        finally:
            if share is not None:  # the body lies in ucxx's buffers: nothing to reuse
                self.daemon.frame_memory.give_back(share, reuse=False)
        response, out, keep_open, op = answer
        data_bytes = sum(len(part) for part in out)
        writer.write(frames.encode(FrameKind.RESPONSE, response, data_bytes))
        for part in out:
            writer.write(part)
        async with asyncio.timeout(self.daemon.config.frame_timeout_s):
            await writer.drain()
        self.daemon.observe(op, started, response["ok"], data_bytes)
        return keep_open

    async def _share_of(self, conn: Connection, header: frames.Header) -> Share | None:
        """A stream's share of the frame memory for a large body, taken before the body is
        read (waiting, unread and untimed, while it does not fit); None for a small one.

        Over UCX this bounds what the daemon reads on, not what ucxx received: ucxx takes
        each message whole, into buffers of the sizes its sender announced, before the
        daemon sees the frame's header (so a body sent with its header is already here)."""
        nbytes = header.meta_bytes + header.data_bytes
        if nbytes <= OWN_BUFFER_BYTES:
            return None
        self.daemon.check_large_body(conn, nbytes)
        return await self.daemon.frame_memory.take(nbytes, conn.peer)

    async def _read_in_time(self, reader: Any, *sizes: int) -> list[bytes]:
        """The next parts of a started frame, of ``sizes`` bytes, within the frame timeout.
        Bytes already buffered are taken without arming a timer (most requests arrive in
        one segment; a timer costs as much as the rest of a small request's reading)."""
        if isinstance(reader, asyncio.StreamReader) and len(reader._buffer) >= sum(sizes):
            return [await reader.readexactly(n) if n else b"" for n in sizes]  # no waiting
        async with asyncio.timeout(self.daemon.config.frame_timeout_s):
            return [await reader.readexactly(n) if n else b"" for n in sizes]

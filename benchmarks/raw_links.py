"""Raw network limits for the daemon benchmarks: another process that takes each piece
whole and answers it with one byte, over loopback TCP (`TcpSink`) or UCX (`UcxSink`).

    benchmark process                          sink process
    send_all(pieces): for each piece  ───────> read it whole into a buffer
                      wait for the ack <─────── b"k"
    ping_us(calls):   the same with 1-byte pieces

That is one synchronous request per value with nothing of kvstore in the way: what a network
put (`send_all` of the values) or a round trip (`ping_us`) can cost at least over that link.
Both sides are plain Python, as the daemon and its clients are.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import subprocess
import sys
import textwrap
from collections.abc import Coroutine
from typing import Any

import numpy as np
from store_bench import timed

SINK_TIMEOUT_S = 120.0  # one send_all of a section's values over UCX, with room to spare

_TCP_SINK = textwrap.dedent("""
    import socket, struct, sys
    srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
    print(srv.getsockname()[1], flush=True)
    conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = memoryview(bytearray(int(sys.argv[1])))
    while True:
        head = conn.recv(8, socket.MSG_WAITALL)
        if len(head) < 8:
            break
        n = struct.unpack("<Q", head)[0]
        got = 0
        while got < n:
            got += conn.recv_into(buf[got:n], n - got, socket.MSG_WAITALL)
        conn.sendall(b"k")
""")


class TcpSink:
    """The sink over loopback TCP: length-prefixed pieces, read into a reused buffer (one
    MSG_WAITALL receive each, as the clients read a value)."""

    def __init__(self, max_piece: int) -> None:
        self.process = subprocess.Popen([sys.executable, "-c", _TCP_SINK, str(max_piece)],
                                        stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        port = int(self.process.stdout.readline())
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.ack = bytearray(1)

    def send_all(self, pieces: list[np.ndarray]) -> None:
        for piece in pieces:
            self.sock.sendall(struct.pack("<Q", piece.nbytes))
            self.sock.sendall(piece)
            self.sock.recv_into(self.ack, 1)

    def ping_us(self, calls: int) -> float:
        """Microseconds per 1-byte request answered by 1 byte (plus the 8-byte length)."""
        one = np.zeros(1, np.uint8)
        seconds, _ = timed(lambda: self.send_all([one] * calls))
        return seconds / calls * 1e6

    def close(self) -> None:
        self.sock.close()
        self.process.wait(10)

    def __enter__(self) -> TcpSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_UCX_SINK = textwrap.dedent("""
    import asyncio, ucxx

    async def main():
        ucxx.init(enable_python_future=True, progress_mode="thread")  # as kvstored does
        gone = asyncio.Event()

        async def serve(endpoint):
            try:
                while True:
                    await endpoint.recv_multi()
                    await endpoint.send_multi([b"k"])
            except Exception:  # the benchmark closed its endpoint
                gone.set()

        listener = ucxx.create_listener(serve, port=0)
        print("port", listener.port, flush=True)
        await gone.wait()
        while listener.active_clients:  # closing under a live handler makes ucxx warn
            await asyncio.sleep(0.01)
        listener.close()

    asyncio.run(main())
    ucxx.stop_notifier_thread()
""")


class UcxSink:
    """The sink over UCX: each piece one multi-buffer tag message (as kvstore's UCX transport
    sends a value), received into a buffer ucxx allocates, answered by a 1-byte message. UCX
    is set up as kvstored and the client set it up (thread progress, Python futures), and
    driven from the client's own UCX loop, all pieces in one coroutine: ucxx's cost without
    the sync client's hop from the calling thread to that loop."""

    def __init__(self) -> None:
        from kvstore.client.ucx import ucx_loop  # ucxx is importable: the caller checked
        from kvstore.wire import ucx as wire_ucx

        self.process = subprocess.Popen([sys.executable, "-c", _UCX_SINK],
                                        stdout=subprocess.PIPE, text=True)
        try:
            port = self._read_port()
            self._loop = ucx_loop()
            self._endpoint = self._run(wire_ucx.ucxx.create_endpoint("127.0.0.1", port))
        except BaseException:
            self.process.kill()
            self.process.wait()
            raise

    def _read_port(self) -> int:
        """The port line of the sink (UCX prints its warnings on stdout too)."""
        assert self.process.stdout is not None
        seen = []
        for line in self.process.stdout:
            if line.startswith("port "):
                return int(line.split()[1])
            seen.append(line)
        raise RuntimeError(f"the UCX sink exited with {self.process.wait()}: "
                           f"{''.join(seen)[-1000:]}")

    def _run(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(SINK_TIMEOUT_S)

    async def _send_all(self, pieces: list[np.ndarray]) -> None:
        for piece in pieces:
            await self._endpoint.send_multi([piece])
            await self._endpoint.recv_multi()

    def send_all(self, pieces: list[np.ndarray]) -> None:
        self._run(self._send_all(pieces))

    def ping_us(self, calls: int) -> float:
        """Microseconds per 1-byte message answered by a 1-byte message."""
        one = np.zeros(1, np.uint8)
        seconds, _ = timed(lambda: self.send_all([one] * calls))
        return seconds / calls * 1e6

    def close(self) -> None:
        try:
            self._run(self._endpoint.close())
            self.process.wait(10)
        except Exception:  # a sink that does not notice: nothing of it is needed any more
            self.process.kill()
            self.process.wait()


Sink = TcpSink | UcxSink

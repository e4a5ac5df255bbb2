"""Raw TCP between hosts, the limits a remote get is measured against: plain Python sockets
with nothing of kvstore in the way, run on the hosts (network namespaces) of the
benchmark by its agents (`tests.cluster.netns.Agent`).

    reader host                                   source host
    timed_reads(address, sizes, piece) ──n, piece──> StreamSource: n bytes, a sendall of
         recv_into one piece-sized buffer <── n ───  `piece` bytes of one buffer at a time

    reader ──n──> StreamSource(upstream=...) ──n──> source     a relay: it receives the n
          <──n──  (store and forward)        <──n──             bytes whole, then sends them

One request of the whole count of bytes in pieces of a value's size is a stream of
values; one request per value has the shape of a get. Both sides reuse their buffers (hot
in the cache: the limit, not what a store that copies each value can reach). Sockets keep
the kernel's default buffer sizes, as kvstore's do.
"""

from __future__ import annotations

import socket
import struct
import threading
import time

_REQUEST = struct.Struct("<QQ")  # bytes to send, in sendalls of how many
SOURCE_BYTES = 16 << 20  # the most one sendall of a source moves


def _receive_into(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if not n:
            raise ConnectionError("the other side closed the connection")
        got += n


def _receive(sock: socket.socket, buffer: memoryview, nbytes: int) -> None:
    """Receive ``nbytes`` into ``buffer`` (reused: a stream longer than it wraps around)."""
    while nbytes:
        step = min(nbytes, len(buffer))
        _receive_into(sock, buffer[:step])
        nbytes -= step


class StreamSource:
    """Answers each request (a length, 8 bytes) with that many bytes, one thread per
    connection; with ``upstream``, a relay that first reads those bytes from there."""

    def __init__(self, host: str, port: int = 0, *,
                 upstream: tuple[str, int] | None = None) -> None:
        self.upstream = upstream
        self._data = memoryview(bytearray(SOURCE_BYTES))
        self._listener = socket.create_server((host, port))
        self.address = self._listener.getsockname()[:2]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        upstream = None
        if self.upstream is not None:
            upstream = socket.create_connection(self.upstream)
            upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        relayed = memoryview(bytearray(0))
        head = memoryview(bytearray(_REQUEST.size))
        try:
            while True:
                _receive_into(conn, head)
                nbytes, piece_bytes = _REQUEST.unpack(head)
                if upstream is not None:  # store and forward: the value whole, then on
                    if len(relayed) < nbytes:
                        relayed = memoryview(bytearray(nbytes))
                    upstream.sendall(head)
                    _receive_into(upstream, relayed[:nbytes])
                    conn.sendall(relayed[:nbytes])
                    continue
                while nbytes:
                    step = min(nbytes, piece_bytes, len(self._data))
                    conn.sendall(self._data[:step])
                    nbytes -= step
        except (ConnectionError, OSError):
            pass
        finally:
            conn.close()
            if upstream is not None:
                upstream.close()

    def close(self) -> None:
        self._listener.close()


def timed_reads(address: tuple[str, int], sizes: list[int], piece_bytes: int) -> list[float]:
    """Ask ``address`` for each of ``sizes`` bytes in turn, on one connection, sent and
    received in pieces of ``piece_bytes`` (each side reusing one buffer: a stream of
    values of that size); the seconds each took, from sending the request to its last
    byte (one warm-up request first)."""
    with socket.create_connection(address) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buffer = memoryview(bytearray(piece_bytes))
        seconds = []
        for i, nbytes in enumerate([min(sizes), *sizes]):
            started = time.perf_counter()
            sock.sendall(_REQUEST.pack(nbytes, piece_bytes))
            _receive(sock, buffer, nbytes)
            if i:
                seconds.append(time.perf_counter() - started)
        return seconds

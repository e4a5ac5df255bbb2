"""The daemon's UCX listener (``kvstored --ucx HOST:PORT``): clients on other hosts reach
the store through ucxx, over whatever UCX picks (TCP, RDMA, shared memory).

    ucxx listener ──endpoint──> UcxStream (reader and writer) ──> daemon.streams

Each endpoint is served by the daemon's own connection loop, exactly as a TCP socket is:
framing, validation, auth, tenants, leases, deadlines and metrics are shared, and the
connection is one of the daemon's connections (drained on SIGTERM like the others).
kvstore/wire/ucx.py says how the byte stream travels over UCX.

ucxx is initialised on the daemon's loop, which then owns every endpoint. ucxx listens on
all interfaces (its listener takes a port only): HOST is the address advertised (logs,
Redis), and tokens, not the bind address, keep other hosts out.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
from typing import Any

from daemon.streams import StreamServer
from kvstore.wire import ucx as wire_ucx
from kvstore.wire.ucx import UcxStream

log = logging.getLogger(__name__)


class UcxListener:
    """Serve a `Daemon` over UCX; `start`, then `stop` (idempotent)."""

    def __init__(self, daemon: Any, host: str, port: int) -> None:
        self.daemon = daemon
        self.host = host
        self.port = port
        self.address: tuple[str, int] | None = None
        self._listener: Any | None = None
        self._numbers = itertools.count(1)
        self._streams = StreamServer(daemon)

    async def start(self) -> None:
        wire_ucx.init_ucx()  # KVStoreError naming the extra if ucxx is missing
        try:
            self._listener = wire_ucx.ucxx.create_listener(self._serve_endpoint,
                                                           port=self.port)
        except Exception as e:
            if type(e).__name__ != "UCXXBusyError":
                raise
            # ucxx's own error for a port in use: the OSError the caller names the flag in
            raise OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE)) from e
        self.address = (self.host, self._listener.port)
        log.info("kvstored serving UCX on %s:%d (ucx %s)", *self.address,
                 ".".join(map(str, wire_ucx.ucxx.get_ucx_version())))

    async def _serve_endpoint(self, endpoint: Any) -> None:
        stream = UcxStream(endpoint, ("ucx", next(self._numbers)))
        if self.daemon.is_stopping:  # draining: its store and workers are going away
            await stream.wait_closed()
            return
        await self._streams.serve(stream, stream)

    async def stop(self) -> None:
        """Stop listening. Called after the daemon drained: the listener is kept until then
        (closing it under live endpoints makes ucxx warn) and refuses new endpoints."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self.address is not None:  # started: ucxx's notifier thread would outlive us
            wire_ucx.ucxx.stop_notifier_thread()

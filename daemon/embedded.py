"""A kvstored served from a thread of this process: a program that embeds its store but
shares it with other processes of its own (the vLLM connector's embedded mode: the
worker holds the store, the scheduler, in another process, reaches it over the socket).

    EmbeddedDaemon(dram_bytes=..., ...) ──thread "kvstored-embedded"──> Daemon on 127.0.0.1:0
         .url  kvstore://127.0.0.1:PORT   (same-host clients: shared memory, as any kvstored)
         .close()  drains and stops it, flushing NVMe

The library reaches this class through the ``kvstore.embedded_daemon`` entry point
(pyproject.toml), never by importing the daemon: data flows one way, daemon -> kvstore.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future

from daemon.config import DaemonConfig
from daemon.server import Daemon

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0


class EmbeddedDaemon:
    """A `Daemon` on a free loopback port, on its own thread and event loop; `close` it."""

    def __init__(self, *, dram_bytes: int, nvme_path: str | None, nvme_bytes: int,
                 max_value_bytes: int) -> None:
        config = DaemonConfig(listen="127.0.0.1:0", dram_bytes=dram_bytes,
                              nvme_path=nvme_path, nvme_bytes=nvme_bytes,
                              max_value_bytes=max_value_bytes)
        self.daemon = Daemon(config)
        self._loop = asyncio.new_event_loop()
        started: Future[None] = Future()
        self._thread = threading.Thread(target=self._serve, args=(started,),
                                        name="kvstored-embedded", daemon=True)
        self._thread.start()
        started.result(timeout=START_TIMEOUT_S)
        assert self.daemon.address is not None, "a started daemon has an address"
        host, port = self.daemon.address
        self.url = f"kvstore://{host}:{port}"

    def _serve(self, started: Future[None]) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            try:
                self._loop.run_until_complete(self.daemon.start())
            except BaseException as e:
                self._loop.run_until_complete(self.daemon.stop())  # frees the store
                started.set_exception(e)
                return
            started.set_result(None)
            self._loop.run_until_complete(self.daemon.serve_until_stopped())
        finally:
            self._loop.close()

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self.daemon.request_stop)
        self._thread.join(timeout=STOP_TIMEOUT_S)

"""The client of `kvstored`: `connect` and `aconnect` give the Store API over the wire.

- `sync`: `Client`, a pool of TCP connections (`connect`); `aio`: `AsyncClient` (`aconnect`).
- `ucx`: the same clients' connections over UCX (``kvstore+ucx://``).
- `api`: the Store methods both clients share; `operations`: each one, written once as a
  generator of requests, independent of the transport.
- `session`: what a connection learned at hello, and the daemon's shared memory it maps.
- `settings`: the URL, timeouts and retries; `answers`: where errors meet the transports.
"""

from __future__ import annotations

from kvstore.client.aio import AsyncClient, aconnect
from kvstore.client.settings import Retry
from kvstore.client.sync import Client, connect

__all__ = ["AsyncClient", "Client", "Retry", "aconnect", "connect"]

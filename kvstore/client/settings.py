"""How a client reaches its daemon: the URL, the token and namespace, the timeouts, the
pool size and how a broken connection is retried (`ClientSettings`, `Retry`).

URLs: ``kvstore://HOST:PORT`` (TCP; a bare ``HOST:PORT`` too) or ``kvstore+ucx://HOST:PORT``
(UCX, the optional ucxx extra); the port defaults to `DEFAULT_PORT`.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any

from kvstore.errors import KVStoreError, StoreConnectionError
from kvstore.wire import frames

DEFAULT_PORT = 7400


@dataclass(frozen=True)
class Retry:
    """How often, and how patiently, a call is retried after its connection broke."""

    attempts: int = 4
    base_s: float = 0.05
    cap_s: float = 1.0

    def delay_s(self, attempt: int) -> float:
        return random.uniform(0, min(self.cap_s, self.base_s * 2 ** attempt))


DEFAULT_RETRY = Retry()


def parse_url(url: str) -> tuple[str, tuple[str, int]]:
    """``kvstore://HOST:PORT`` -> ("tcp", (host, port)); ``kvstore+ucx://HOST:PORT`` ->
    ("ucx", ...); a bare ``HOST:PORT`` is TCP."""
    transport, rest = "tcp", url
    if url.startswith("kvstore+ucx://"):
        transport, rest = "ucx", url.removeprefix("kvstore+ucx://")
    else:
        rest = url.removeprefix("kvstore://")
    if "://" in rest or not rest:
        raise ValueError(f"not a kvstore URL: {url!r} (expected kvstore://HOST:PORT or "
                         "kvstore+ucx://HOST:PORT)")
    host, sep, port = rest.rstrip("/").rpartition(":")
    if not sep:
        host, port = rest.rstrip("/"), str(DEFAULT_PORT)
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"not a kvstore URL: {url!r} (expected kvstore://HOST:PORT)")
    return transport, (host, int(port))


@dataclass(frozen=True)
class ClientSettings:
    """One client's settings, shared by its connections; `KVStoreError` if unusable."""

    url: str
    token: str | None = None
    namespace: str | None = None
    timeout_s: float = 30.0
    connect_timeout_s: float = 5.0
    shared_memory: bool = True
    max_connections: int = 8
    retry: Retry = DEFAULT_RETRY
    transport: str = field(init=False)  # "tcp" or "ucx", from the URL
    address: tuple[str, int] = field(init=False)

    def __post_init__(self) -> None:
        try:
            transport, address = parse_url(self.url)
        except ValueError as e:
            raise KVStoreError(str(e)) from None
        if (not self.timeout_s > 0 or not self.connect_timeout_s > 0
                or self.max_connections < 1):
            raise KVStoreError("timeouts must be positive and max_connections at least 1")
        object.__setattr__(self, "transport", transport)
        object.__setattr__(self, "address", address)

    def retry_delay_s(self, attempt: int, deadline: float,
                      error: StoreConnectionError) -> float:
        """How long to wait before retrying on a fresh connection after ``error`` broke
        one (or found none); `StoreConnectionError` when no attempt or time is left."""
        if attempt + 1 >= self.retry.attempts or time.monotonic() >= deadline:
            raise StoreConnectionError(
                f"lost the connection to kvstored at {self.url}: {error}") from error
        return min(self.retry.delay_s(attempt), max(0.0, deadline - time.monotonic()))

    def hello_request(self) -> tuple[dict[str, Any], list[Any]]:
        return {"op": "hello", "version": frames.PROTOCOL_VERSION, "token": self.token,
                "namespace": self.namespace, "shm": self.shared_memory}, []

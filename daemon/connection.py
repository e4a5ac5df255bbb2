"""One client connection as the daemon sees it: who it is (tenant, namespace), what it
holds (reservations and pins under handles, each with a lease), and how whoever serves it
(`daemon.tcp`, `daemon.streams`) stops it.

A connection's keys are scoped to its namespace (`scope`) before they reach the Store, so
tenants never meet each other's blocks. Its handles are given out by
`daemon.shm_plane.SharedMemoryPlane` and go back when the connection ends.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from daemon.tenants import Tenant
from kvstore.keys import scoped_key, scoped_keys
from kvstore.wire.error_codes import ErrorCode, RequestError


@dataclass
class Reservation:
    """A DRAM slot reserved for a client's copy, until it commits or aborts."""

    key: bytes | None  # scoped; None for a spare slot, bound to a key at commit
    offset: int
    nbytes: int
    deadline: float


@dataclass
class Pin:
    """A block pinned in DRAM while a client copies out of its slot."""

    key: bytes  # scoped
    pin: int
    deadline: float


def _nothing() -> None:
    return None


@dataclass(eq=False)
class Connection:
    peer: str
    tenant: Tenant | None = None
    namespace: str | None = None
    secret: bytes = b""
    shared_memory: bool = False
    is_peer: bool = False  # another node of the cluster (daemon.cluster): peer ops only
    reservations: dict[int, Reservation] = field(default_factory=dict)
    quarantined: dict[int, Reservation] = field(default_factory=dict)  # expired, slot kept
    pins: dict[int, Pin] = field(default_factory=dict)
    busy: bool = False  # a request is being answered
    # Set by whoever serves it (daemon.tcp, or daemon.streams for a stream):
    stop: Callable[[], None] = _nothing  # hang up when idle: now, or after the request
    kill: Callable[[], None] = _nothing  # hang up now
    closed: Any = None  # awaitable: done once it ended and gave back what it held
    doorbell: Any = None  # the transport of its commit doorbell (daemon.doorbell), if rung
    doorbell_secret: bytes | None = None  # issued, not yet bound

    @property
    def owner(self) -> int:
        """Whose blocks this connection writes (its tenant's number; quotas charge it)."""
        return 0 if self.tenant is None else self.tenant.owner

    def scope(self, key: bytes) -> bytes:
        """``key`` as it is stored for this connection's namespace."""
        self._check_scoped()
        return scoped_key(self.secret, key)

    def scope_many(self, keys: list[bytes]) -> list[bytes]:
        """`scope` of each of ``keys`` (none: nothing to refuse)."""
        if not keys:
            return []
        self._check_scoped()
        return scoped_keys(self.secret, keys)

    def _check_scoped(self) -> None:
        """`RequestError(FORBIDDEN)` unless this connection's keys have a namespace."""
        if self.is_peer:
            raise RequestError(ErrorCode.FORBIDDEN, "a peer connection sends peer "
                               "operations only")
        if not self.secret:
            raise RequestError(ErrorCode.FORBIDDEN, "this connection named no namespace and "
                               "its token grants several: connect with namespace=... (one of "
                               f"{sorted(self.tenant.namespaces) if self.tenant else []})")

    def check_shared_memory(self) -> None:
        """`RequestError(FORBIDDEN)` unless hello gave this connection the shared pool."""
        if not self.shared_memory:
            raise RequestError(ErrorCode.FORBIDDEN, "this connection has no shared memory; "
                                                    "use put/get")

"""What a client connection learns at hello, and the daemon's shared memory it maps.

A connection's `Session` holds the daemon's limits, its lease, and (same host) the DRAM
pool and its directory, each mapped once per process and shared by every connection to
that daemon: a pool is registered with CUDA once (a second registration of the same pages
is refused), and a daemon that restarted has a new pool, so the old mapping is let go.
The session also keeps the connection's one spare slot (`take_spare`, `keep_spare`).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np

from kvstore.client.settings import ClientSettings
from kvstore.shm.mapping import boot_id


def hello(conn: Any, settings: ClientSettings) -> None:
    """The hello exchange on a fresh connection (any transport): sets ``conn.session``;
    closes the connection if the exchange fails (a refused token, a version mismatch)."""
    try:
        meta, _ = conn.request(*settings.hello_request(), settings.connect_timeout_s)
    except BaseException:
        conn.close()
        raise
    conn.session = Session(meta, settings.address)


async def ahello(conn: Any, settings: ClientSettings) -> None:
    """`hello` for the asyncio transports."""
    try:
        meta, _ = await conn.request(*settings.hello_request(), settings.connect_timeout_s)
    except BaseException:
        conn.close()
        raise
    conn.session = Session(meta, settings.address)


class Session:
    """What one connection learned at hello, and the shared pool it mapped (if any)."""

    def __init__(self, hello: dict[str, Any], address: tuple[str, int]) -> None:
        self.namespace: str | None = hello["namespace"]  # None: a token of several, none named
        self.max_value_bytes: int = hello["max_value_bytes"]
        self.max_frame_data_bytes: int = hello["max_frame_data_bytes"]
        self.node_id: str = hello["node_id"]
        self.lease_s: float = hello["lease_s"]
        self.tiers: list[str] = list(hello.get("tiers") or [])  # the daemon's, fastest first
        self.pool: np.ndarray | None = None
        self.pool_name: str | None = None
        self.is_pool_registered = False  # page-locked for CUDA: GPUs DMA straight into it
        self.directory: Any = None  # the daemon's shm_directory.Directory, if mapped
        self.secret: bytes | None = None  # scopes keys as the daemon does (shared memory)
        # The same, told by a node of a pool to any client (kvstore.cluster.client).
        self.scope: bytes | None = hello.get("scope")
        self.touched: list[bytes] = []  # read through the directory, not yet reported
        self.num_directory_reads = 0
        # handle, offset, nbytes, and when the commit that reserved it was sent
        self._spare: tuple[int, int, int, float] | None = None
        shm = hello.get("shm")
        if shm and shm.get("boot_id") == boot_id():
            mapped = _shared_pool(address, shm["name"], shm["nbytes"])
            if mapped is not None:
                self.pool, self.is_pool_registered = mapped
                self.pool_name = shm["name"]
                self.secret = shm.get("scope")
                if shm.get("directory") and self.secret:
                    self.directory = _shared_directory(shm["directory"])


    def take_spare(self, nbytes: int) -> tuple[int, int] | None:
        """(handle, offset) of this connection's spare slot if it fits ``nbytes`` exactly
        and is young enough that its lease cannot run out before the commit."""
        spare = self._spare
        if (spare is None or spare[2] != nbytes
                or time.monotonic() - spare[3] > self.lease_s / 2):
            return None
        self._spare = None
        return spare[0], spare[1]

    def drop_spare(self) -> int | None:
        """Forget the spare slot; returns its handle (to give back), if there was one."""
        spare, self._spare = self._spare, None
        return None if spare is None else spare[0]

    def keep_spare(self, handle: int, offset: int, nbytes: int, asked_at: float
                   ) -> int | None:
        """Keep a new spare slot, asked for at ``asked_at`` (its lease started later);
        returns the handle of the one it replaces, if any."""
        old, self._spare = self._spare, (handle, offset, nbytes, asked_at)
        return None if old is None else old[0]


# Pools mapped by this process, by shared-memory name: a pool is mapped (and registered
# with CUDA, which refuses a second registration of the same pages) once per process.
_pools: dict[str, tuple[np.ndarray, bool]] = {}
_pool_of_address: dict[tuple[str, int], str] = {}
_pools_lock = threading.Lock()
# Registered pools lent from (`Client.lend`: a GPU may be reading them in place): live
# loans by pool name. A lent pool that a restarted daemon's new pool replaces stays
# registered (in `_retiring`) until its last loan ends.
_loans: dict[str, int] = {}
_retiring: dict[str, np.ndarray] = {}


def hold_pool(name: str) -> bool:
    """Keep the registered pool ``name`` registered for a loan; False if it has been
    replaced already (nothing to lend from)."""
    with _pools_lock:
        if name not in _pools:
            return False
        _loans[name] = _loans.get(name, 0) + 1
        return True


def release_pool(name: str) -> None:
    """A loan of ``hold_pool`` ended; a replaced pool is let go with its last loan."""
    from kvstore.shm.page_lock import unregister_with_cuda

    with _pools_lock:
        left = _loans[name] - 1
        if left:
            _loans[name] = left
            return
        del _loans[name]
        retired = _retiring.pop(name, None)
    if retired is not None:
        unregister_with_cuda(retired)


def _shared_pool(address: tuple[str, int], name: str,
                 nbytes: int) -> tuple[np.ndarray, bool] | None:
    """The daemon's DRAM pool mapped here; None if it is not reachable from here (another
    host or container, or no permission): values then travel in the frames. A daemon
    that restarted has a new pool: the old one's mapping is let go."""
    from kvstore.shm.mapping import map_shared
    from kvstore.shm.page_lock import register_with_cuda, unregister_with_cuda

    with _pools_lock:
        old = _pool_of_address.get(address)
        if old is not None and old != name and old in _pools:
            array, registered = _pools.pop(old)
            if registered and old in _loans:  # a GPU may be reading it: later
                _retiring[old] = array
            elif registered:
                unregister_with_cuda(array)
        _pool_of_address[address] = name
        if name not in _pools:
            try:
                mapping = map_shared(name, nbytes, create=False)
            except (OSError, ValueError):
                return None
            array = np.frombuffer(mapping, dtype=np.uint8)[:nbytes]
            _pools[name] = (array, register_with_cuda(array))
        return _pools[name]


_directories: dict[str, Any] = {}


def _shared_directory(name: str) -> Any:
    """The daemon's directory mapped (read-only) here, once per process; None if it cannot
    be (then every read asks the daemon)."""
    from kvstore.shm.directory import Directory

    if not Directory.supported:
        return None
    with _pools_lock:
        if name not in _directories:
            try:
                _directories[name] = Directory(name, create=False)
            except (OSError, ValueError):
                return None
        return _directories[name]


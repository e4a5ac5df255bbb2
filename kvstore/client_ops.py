"""The client's operations, written once as generators independent of the transport.

An operation yields requests ``(meta, data parts)`` and receives answers ``(meta, data)``;
`kvstore.client` drives it over a TCP socket, asyncio streams or UCX. The shared-memory
data plane lives here: a connection's `_Session` knows the daemon's DRAM pool and its
directory (each mapped once per process) and its spare slot.

Reads on the same host first look the keys up in the daemon's directory
(`kvstore.shm.directory`) and copy what it lists straight from the pool, with no
request at all; the rest are pinned (one round trip), copied and unpinned. Blocks read
through the directory are reported to the daemon in batches (``touch``, not waited for),
so its hit counts and eviction order see them.

Errors meet the transports at one boundary, `transport_failed`: a socket error, an EOF or
an answer that is not a frame means the connection broke (`StoreConnectionError`, which
the clients retry on a fresh connection); an error the daemon answered is raised as its
own class by `_checked` (never retried: it would be answered again, and a refused commit
did not take effect).

Leases (see `daemon.shm_plane`): a copy out of a pinned slot is kept only if it ended
within half a lease of sending the pin request (the daemon pins after that, so the pin
still held when the copy ended); a spare slot is used only while it is that young.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Generator
from typing import Any, NoReturn

import numpy as np

from kvstore import protocol
from kvstore.buffers import copy_bytes, output_view
from kvstore.errors import (
    DeadlineExceededError,
    InvalidValueError,
    KVStoreError,
    ProtocolError,
    StoreConnectionError,
)
from kvstore.keys import scoped_key
from kvstore.shm.mapping import boot_id

SHM_MIN_BYTES = 64 * 1024  # smaller puts go in the frame: one round trip instead of two
TOUCH_BATCH = 32  # directory reads reported to the daemon per `touch`

Request = tuple[dict[str, Any], list[Any]]  # meta (op and fields), data parts
Response = tuple[dict[str, Any], memoryview]  # meta, data
Operation = Generator[Request, Response, Any]


def hello(conn: Any, client: Any) -> None:
    """The hello exchange on a fresh connection (any transport): sets ``conn.session``;
    closes the connection if the exchange fails (a refused token, a version mismatch)."""
    try:
        meta, _ = conn.request(*client.hello_request(), client.connect_timeout_s)
    except BaseException:
        conn.close()
        raise
    conn.session = _Session(meta, client.address)


async def ahello(conn: Any, client: Any) -> None:
    """`hello` for the asyncio transports."""
    try:
        meta, _ = await conn.request(*client.hello_request(), client.connect_timeout_s)
    except BaseException:
        conn.close()
        raise
    conn.session = _Session(meta, client.address)


class _Session:
    """What one connection learned at hello, and the shared pool it mapped (if any)."""

    def __init__(self, hello: dict[str, Any], address: tuple[str, int]) -> None:
        self.namespace: str | None = hello["namespace"]  # None: a token of several, none named
        self.max_value_bytes: int = hello["max_value_bytes"]
        self.max_frame_data_bytes: int = hello["max_frame_data_bytes"]
        self.node_id: str = hello["node_id"]
        self.lease_s: float = hello["lease_s"]
        self.pool: np.ndarray | None = None
        self.is_pool_registered = False  # page-locked for CUDA: GPUs DMA straight into it
        self.directory: Any = None  # the daemon's kvstore.shm.directory.Directory, if mapped
        self.secret: bytes | None = None  # scopes keys as the daemon does (shared memory)
        self.touched: list[bytes] = []  # read through the directory, not yet reported
        self.num_directory_reads = 0
        # handle, offset, nbytes, and when the commit that reserved it was sent
        self._spare: tuple[int, int, int, float] | None = None
        shm = hello.get("shm")
        if shm and shm.get("boot_id") == boot_id():
            mapped = _shared_pool(address, shm["name"], shm["nbytes"])
            if mapped is not None:
                self.pool, self.is_pool_registered = mapped
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
            if registered:
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


def _read_listed(session: _Session, keys: list[bytes], outs: list[Any] | None,
                 results: list[Any]) -> list[int]:
    """Copy the values the directory lists straight from the pool into ``results`` (bytes,
    or True once copied into ``outs``); returns the indices of the keys left to ask for."""
    directory, pool, secret = session.directory, session.pool, session.secret
    assert pool is not None
    rest = []
    for i, key in enumerate(keys):
        found = directory.lookup(scoped_key(secret, key))
        if found is not None:
            row, seq, offset, nbytes = found
            view = pool[offset:offset + nbytes]
            if outs is None:
                value: Any = view.tobytes()
            else:
                copy_bytes(output_view(outs[i], nbytes), view)
                value = True
            if directory.unchanged(row, seq):  # the slot held this value the whole time
                results[i] = value
                session.touched.append(key)
                continue
        rest.append(i)
    session.num_directory_reads += len(keys) - len(rest)
    return rest


# -- the operations, once, independent of the transport ---------------------------------------


def _host(src: Any) -> Any:
    """A host byte view of a value view (device tensors are copied to the host)."""
    return src if isinstance(src, np.ndarray) else src.cpu().numpy()


class _Operations:
    """Generators: yield (meta, data parts), receive (meta, data), return the result."""

    @staticmethod
    def put_many(session: _Session, keys: list[bytes], srcs: list[Any],
                 use_spare: bool = False) -> Operation:
        """``use_spare`` (single puts): keep a spare slot for the next put of this size."""
        if not keys:
            return 0
        sizes = [int(s.shape[0]) for s in srcs]
        for size in sizes:
            if size > session.max_value_bytes:
                raise InvalidValueError(f"value of {size} bytes exceeds the daemon's "
                                        f"max_value_bytes ({session.max_value_bytes})")
        pool = session.pool
        if pool is not None and sum(sizes) >= SHM_MIN_BYTES:
            # A single put reuses the spare slot its last commit reserved: copy + commit,
            # one round trip; the commit reserves the next spare.
            single = use_spare and len(keys) == 1
            spare = session.take_spare(sizes[0]) if single else None
            if spare is not None:
                handles, offsets = [spare[0]], [spare[1]]
            else:
                # A spare that does not fit goes back first: in a full pool its room may be
                # the only room this reserve can get.
                unfit = session.drop_spare()
                if unfit is not None:
                    yield {"op": "abort", "handles": [unfit], "noreply": True}, []
                meta, _ = yield {"op": "reserve", "keys": keys, "sizes": sizes}, []
                handles, offsets = meta["handles"], meta["offsets"]
            if len(handles) == len(keys):
                try:
                    for src, offset, size in zip(srcs, offsets, sizes, strict=True):
                        copy_bytes(pool[offset:offset + size], src)
                except BaseException:
                    yield {"op": "abort", "handles": handles}, []
                    raise
                commit = {"op": "commit", "handles": handles, "keys": keys}
                if single:
                    commit["reserve_sizes"] = sizes
                asked_at = time.monotonic()
                meta, _ = yield commit, []
                if single and meta.get("handles"):
                    old = session.keep_spare(meta["handles"][0], meta["offsets"][0], sizes[0],
                                             asked_at)
                    if old is not None:  # one spare per connection: the other goes back
                        yield {"op": "abort", "handles": [old], "noreply": True}, []
                return meta["stored"]
            if handles:  # no room for all in DRAM: let the daemon place them (and demote)
                yield {"op": "abort", "handles": handles}, []
        stored = 0
        for start, stop in _batches(sizes, session.max_frame_data_bytes):
            parts = [_host(s) for s in srcs[start:stop]]
            meta, _ = yield ({"op": "put_many", "keys": keys[start:stop],
                              "sizes": sizes[start:stop]}, parts)
            stored += meta["stored"]
            if meta["stored"] < stop - start:
                break
        return stored

    @staticmethod
    def put(session: _Session, key: bytes, src: Any) -> Operation:
        if session.pool is not None and src.shape[0] >= SHM_MIN_BYTES:
            return (yield from _Operations.put_many(session, [key], [src], True)) == 1
        if src.shape[0] > session.max_value_bytes:
            raise InvalidValueError(f"value of {src.shape[0]} bytes exceeds the daemon's "
                                    f"max_value_bytes ({session.max_value_bytes})")
        meta, _ = yield {"op": "put", "key": key}, [_host(src)]
        return meta["stored"]

    @staticmethod
    def get_many(session: _Session, keys: list[bytes],
                 outs: list[Any] | None = None) -> Operation:
        """Values as bytes, or (with ``outs``) copied into them: True/False per key."""
        results: list[Any] = [None if outs is None else False] * len(keys)
        rest = list(range(len(keys)))
        pool = session.pool
        if pool is not None and session.directory is not None and keys:
            rest = _read_listed(session, keys, outs, results)
            if len(session.touched) >= TOUCH_BATCH or (rest and session.touched):
                touched, session.touched = session.touched, []
                yield {"op": "touch", "keys": touched, "noreply": True}, []
        if pool is not None and rest:
            asked = [keys[i] for i in rest]
            # Before the request: the daemon pins after this, so its lease ends after
            # asked_at + lease_s whenever the answer reaches this process.
            asked_at = time.monotonic()
            meta, _ = yield {"op": "pin", "keys": asked}, []
            pinned = [(rest[j], b) for j, b in enumerate(meta["blocks"]) if b is not None]
            copied: list[Any] = []
            try:
                for i, (offset, nbytes, _handle) in pinned:
                    view = pool[offset:offset + nbytes]
                    if outs is None:
                        copied.append(view.tobytes())
                    else:
                        copy_bytes(output_view(outs[i], nbytes), view)
                        copied.append(True)
            finally:
                if pinned:
                    # Not waited for: the daemon keeps a pinned slot whole until its pins
                    # go, even if the block is deleted or overwritten meanwhile.
                    # (a key asked for twice shares its pin: each handle once)
                    yield {"op": "unpin", "handles": list({b[2]: None for _, b in pinned}),
                           "noreply": True}, []
            # A copy that outlasted the lease may have raced a reuse of its slot: redo it.
            if time.monotonic() - asked_at < session.lease_s / 2:
                for (i, _), value in zip(pinned, copied, strict=True):
                    results[i] = value
                found = {i for i, _ in pinned}
                rest = [i for i in rest if i not in found]
        while rest:  # an answer carries a bounded number of bytes: ask again for the rest
            meta, data = yield {"op": "get_many", "keys": [keys[i] for i in rest]}, []
            answered = _answered(meta, len(rest))
            offset = 0
            for i, size in zip(rest[:answered], meta["sizes"][:answered], strict=True):
                if size is None:
                    continue
                value = data[offset:offset + size]
                offset += size
                if outs is None:
                    results[i] = bytes(value)
                else:
                    copy_bytes(output_view(outs[i], size), np.frombuffer(value, np.uint8))
                    results[i] = True
            rest = rest[answered:]
        return results

    @staticmethod
    def simple(op: str, field: str, value: Any, result: str) -> Operation:
        meta, _ = yield {"op": op, field: value} if field else {"op": op}, []
        return meta.get(result)

    @staticmethod
    def match_prefix(keys: list[bytes], probe: bool) -> Operation:
        request: dict[str, Any] = {"op": "match_prefix", "keys": keys}
        if probe:
            request["probe"] = True
        meta, _ = yield request, []
        return meta.get("count")


def _answered(meta: dict[str, Any], asked: int) -> int:
    """How many leading keys of ``asked`` a get_many answer covers: all of them, or
    ``answered`` when the daemon cut the answer at its limit (at least one key)."""
    answered = meta.get("answered", asked)
    if type(answered) is not int or not 0 < answered <= asked:
        raise ProtocolError(f"a get_many answer covering {answered!r} of {asked} keys")
    return answered


def _batches(sizes: list[int], limit: int) -> list[tuple[int, int]]:
    """Cut a put_many into frames of at most ``limit`` data bytes."""
    batches, start, total = [], 0, 0
    for i, size in enumerate(sizes):
        if i > start and total + size > limit:
            batches.append((start, i))
            start, total = i, 0
        total += size
    batches.append((start, len(sizes)))
    return batches


def transport_failed(error: Exception, url: str, op: str, timeout_s: float) -> NoReturn:
    """Raise what ``error``, raised while a transport sent a request or received its
    answer, means to the operations: a timeout is `DeadlineExceededError`; a socket error,
    an EOF or a frame that cannot be read is `StoreConnectionError` (the connection broke:
    retried on a fresh one), except a frame of another protocol version (`ProtocolError`:
    no retry can help). Anything else (a `KVStoreError` already) is raised as it is.

    Each transport calls it from ``except Exception`` around its I/O: a handler costs
    nothing until something is raised, unlike a context manager per request."""
    if isinstance(error, protocol.RequestError):
        if error.code is protocol.ErrorCode.UNSUPPORTED_VERSION:
            raise ProtocolError(f"bad answer from {url}: {error}") from None
        raise StoreConnectionError(f"{op} to {url}: bad answer ({error}): the connection "
                                   "cannot be trusted") from error
    if isinstance(error, KVStoreError):
        raise error
    if isinstance(error, TimeoutError):
        raise DeadlineExceededError(f"{op} to {url} did not finish within {timeout_s:g} s"
                                    ) from None
    if isinstance(error, EOFError):
        raise StoreConnectionError(f"{op} to {url}: the daemon closed the connection"
                                   ) from error
    if isinstance(error, OSError):
        raise StoreConnectionError(f"{op} to {url}: the connection broke: "
                                   f"{error or type(error).__name__}") from error
    raise error


def _checked(answer: dict[str, Any], request_id: int, data: memoryview, url: str) -> Response:
    """The answer's fields and data; the error the daemon answered, as its own class."""
    if answer.get("id") not in (request_id, None):
        raise StoreConnectionError(f"answer to request {answer.get('id')} from {url}, "
                                   f"expected {request_id}: the connection is out of step")
    if not answer.get("ok"):
        code = str(answer.get("code"))
        raise protocol.error_class(code)(f"{url}: {answer.get('message')} [{code}]")
    return answer, data

"""The client's operations, written once as generators independent of the transport.

An operation yields requests ``(meta, data parts)`` and receives answers ``(meta, data)``;
`kvstore.client.sync`, `kvstore.client.aio` and `kvstore.client.ucx` drive it over a TCP
socket, asyncio streams or UCX. The shared-memory data plane lives here: values are copied
straight into and out of the daemon's DRAM pool that the connection's `Session` mapped.

Reads on the same host first look the keys up in the daemon's directory
(`kvstore.shm.directory`) and copy what it lists straight from the pool, with no
request at all; the rest are pinned (one round trip), copied and unpinned. Blocks read
through the directory are reported to the daemon in batches (``touch``, not waited for),
so its hit counts and eviction order see them.

Leases (see `daemon.shm_plane`): a copy out of a pinned slot is kept only if it ended
within half a lease of sending the pin request (the daemon pins after that, so the pin
still held when the copy ended); a spare slot is used only while it is that young.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvstore.buffers import copy_bytes, output_view, synchronize_devices
from kvstore.client.answers import Response
from kvstore.client.session import Session
from kvstore.errors import DeadlineExceededError, InvalidValueError, ProtocolError
from kvstore.keys import scoped_key

SHM_MIN_BYTES = 64 * 1024  # smaller puts go in the frame: one round trip instead of two
TOUCH_BATCH = 32  # directory reads reported to the daemon per `touch`

Request = tuple[dict[str, Any], list[Any]]  # meta (op and fields), data parts
Operation = Generator[Request, Response, Any]


def _read_listed(session: Session, keys: list[bytes], outs: list[Any] | None,
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



@dataclass
class PoolLoan:
    """Blocks pinned in the daemon's shared DRAM pool for reading in place (`Client.lend`).

    ``addresses[i]``: where key i's value starts in this process (the pool's mapping), or
    None (not in the pool: absent, in another tier, or no pool mapped here); ``nbytes[i]``
    its size. A read of those bytes counts only if it **ended** before ``valid_until``
    (`time.monotonic`): the daemon pinned the blocks after the loan was asked for, and
    keeps a pinned slot whole for half a lease at least from then (see the module
    docstring). ``page_locked``: the pool is registered with CUDA, so a GPU kernel may
    read the addresses through unified virtual addressing."""

    addresses: list[int | None]
    nbytes: list[int | None]
    valid_until: float
    page_locked: bool
    handles: list[int]
    pool: Any = None  # the mapped pool (np.ndarray), when there is one

    def view(self, i: int) -> np.ndarray | None:
        """Key i's lent bytes as a numpy view of the pool (None where nothing is lent)."""
        address, nbytes = self.addresses[i], self.nbytes[i]
        if address is None or nbytes is None:
            return None
        start = address - self.pool.ctypes.data
        return self.pool[start:start + nbytes]


def _host(src: Any) -> Any:
    """A host byte view of a value view (device tensors are copied to the host)."""
    return src if isinstance(src, np.ndarray) else src.cpu().numpy()


class Operations:
    """Generators: yield (meta, data parts), receive (meta, data), return the result."""

    @staticmethod
    def put_many(session: Session, keys: list[bytes], srcs: list[Any],
                 use_spare: bool = False) -> Operation:
        """``use_spare`` (single puts): keep a spare slot for the next put of this size."""
        if not keys:
            return 0
        sizes = _sizes(session, srcs)
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
                    try:
                        # Values on a GPU go by DMA straight into the slots (a pool that
                        # is page-locked here), all queued before one wait.
                        for src, offset, size in zip(srcs, offsets, sizes, strict=True):
                            copy_bytes(pool[offset:offset + size], src, non_blocking=True)
                    finally:  # every copy landed before its slot is committed or given back
                        synchronize_devices(srcs)
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
        return (yield from _put_in_frames(session, {"op": "put_many"}, keys, srcs, sizes))

    @staticmethod
    def put_in_tier(session: Session, tier: str, keys: list[bytes], srcs: list[Any]
                    ) -> Operation:
        if not keys:
            return 0
        return (yield from _put_in_frames(session, {"op": "put_in_tier", "tier": tier}, keys,
                                          srcs, _sizes(session, srcs)))

    @staticmethod
    def put(session: Session, key: bytes, src: Any) -> Operation:
        if session.pool is not None and src.shape[0] >= SHM_MIN_BYTES:
            return (yield from Operations.put_many(session, [key], [src], True)) == 1
        if src.shape[0] > session.max_value_bytes:
            raise InvalidValueError(f"value of {src.shape[0]} bytes exceeds the daemon's "
                                    f"max_value_bytes ({session.max_value_bytes})")
        meta, _ = yield {"op": "put", "key": key}, [_host(src)]
        return meta["stored"]

    @staticmethod
    def get_many(session: Session, keys: list[bytes],
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
    def pin_in_pool(session: Session, keys: list[bytes], lend: bool = True) -> Operation:
        """Pin the blocks of ``keys`` the daemon holds in its shared pool: a `PoolLoan`
        (nothing pinned where no pool is mapped here, or not ``lend``)."""
        pool = session.pool
        if pool is None or not keys or not lend:
            return PoolLoan([None] * len(keys), [None] * len(keys), time.monotonic(),
                            False, [], pool)
        asked_at = time.monotonic()  # before the request: see `PoolLoan`
        meta, _ = yield {"op": "pin", "keys": keys}, []
        base = pool.ctypes.data
        blocks = meta["blocks"]
        return PoolLoan([None if b is None else base + b[0] for b in blocks],
                        [None if b is None else b[1] for b in blocks],
                        asked_at + session.lease_s / 2, session.is_pool_registered,
                        list({b[2]: None for b in blocks if b is not None}), pool)

    @staticmethod
    def unpin(handles: list[int]) -> Operation:
        """Give pins back (not waited for: see `get_many`)."""
        if handles:
            yield {"op": "unpin", "handles": handles, "noreply": True}, []

    @staticmethod
    def simple(op: str, field: str, value: Any, result: str) -> Operation:
        meta, _ = yield {"op": op, field: value} if field else {"op": op}, []
        return meta.get(result)

    @staticmethod
    def tier_bits(keys: list[bytes]) -> Operation:
        if not keys:
            return []
        meta, _ = yield {"op": "tier_bits", "keys": keys}, []
        bits = meta.get("bits")
        if not isinstance(bits, list) or len(bits) != len(keys):
            raise ProtocolError(f"a tier_bits answer of {bits!r:.80} for {len(keys)} keys")
        return bits

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


def _sizes(session: Session, srcs: list[Any]) -> list[int]:
    """The values' sizes, each checked against the daemon's largest value."""
    sizes = [int(s.shape[0]) for s in srcs]
    for size in sizes:
        if size > session.max_value_bytes:
            raise InvalidValueError(f"value of {size} bytes exceeds the daemon's "
                                    f"max_value_bytes ({session.max_value_bytes})")
    return sizes


def _put_in_frames(session: Session, request: dict[str, Any], keys: list[bytes],
                   srcs: list[Any], sizes: list[int]) -> Operation:
    """``request`` (a put_many or put_in_tier) with the values in its frames, cut into
    frames the daemon takes; how many leading blocks were stored."""
    stored = 0
    for start, stop in _batches(sizes, session.max_frame_data_bytes):
        parts = [_host(s) for s in srcs[start:stop]]
        meta, _ = yield ({**request, "keys": keys[start:stop], "sizes": sizes[start:stop]},
                         parts)
        stored += meta["stored"]
        if meta["stored"] < stop - start:
            break
    return stored


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


def call_args(request: Request, deadline: float, url: str) -> tuple[Any, ...]:
    """The arguments of ``conn.request`` for an operation's next request: meta, parts,
    the time left, and whether to wait for the answer (not for a ``noreply`` request)."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlineExceededError(f"call to {url} ran out of time")
    meta, parts = request
    wait = not meta.pop("noreply", False)
    return meta, parts, left, wait

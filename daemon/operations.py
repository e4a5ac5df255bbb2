"""The Store's own operations as the daemon serves them: put, get and their batches,
prefix lookups, contains, delete, tier_of, tier_bits, put_in_tier, flush. Each handler
takes (connection, request meta, data) and returns (response fields, data parts); keys are
scoped to the connection's namespace first.

A get_many answer carries at most ``max_answer_data_bytes`` of values (the leading keys
whose values fit, at least one): ``answered`` says how many, and the client asks again for
the rest. Prefix lookups are counted (`daemon.read_stats`), exported as metrics and, with
``--access-log``, logged (`daemon.access_log`).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from daemon.access_log import AccessLog
from daemon.connection import Connection
from daemon.frame_memory import LogThrottle
from daemon.read_stats import ReadStats
from daemon.store_calls import StoreCalls
from kvstore.tiers.base import REMOTE_TIER_BIT
from kvstore.wire.error_codes import ErrorCode, RequestError

log = logging.getLogger(__name__)


class StoreOperations:
    """put, put_many, get, get_many, match_prefix, contains, delete, tier_of, tier_bits,
    put_in_tier, flush."""

    def __init__(self, calls: StoreCalls, read_stats: ReadStats, *, metrics: Any | None,
                 access_log: AccessLog | None, max_answer_data_bytes: int) -> None:
        self.calls = calls
        self.store = calls.store
        self.read_stats = read_stats
        self.metrics = metrics
        self.access_log = access_log
        self.max_answer_data_bytes = max_answer_data_bytes
        self._cut_log = LogThrottle()
        self.cluster: Any | None = None  # the pool (daemon.cluster.ClusterMember), if any

    def _record_in(self, nbytes: int) -> None:
        if self.metrics is not None and nbytes:
            self.metrics.record_transfer("in", nbytes)

    async def put(self, conn: Connection, meta: dict[str, Any], data: bytes) -> Any:
        self._record_in(len(data))
        key = conn.scope(meta["key"])
        stored = await self.calls.for_put(len(data))(
            functools.partial(self.store.put, owner=conn.owner), key, data)
        if self.cluster is not None:
            stored = await self.calls.run(self.cluster.after_put, [key], [data], int(stored)) == 1
        return {"stored": stored}, []

    async def put_many(self, conn: Connection, meta: dict[str, Any], data: bytes) -> Any:
        self._record_in(len(data))
        keys, values = conn.scope_many(meta["keys"]), _values(meta, data)
        stored = await self.calls.for_put(len(data))(
            functools.partial(self.store.put_many, owner=conn.owner), keys, values)
        if self.cluster is not None:
            stored = await self.calls.run(self.cluster.after_put, keys, values, stored)
        return {"stored": stored}, []

    async def put_in_tier(self, conn: Connection, meta: dict[str, Any], data: bytes) -> Any:
        """put_many into the named tier only (`Store.put_in_tier`); in a pool, as after a
        put, other nodes' older copies go, but what found no room here stays unstored (it
        was asked for in this tier)."""
        self._record_in(len(data))
        tier = meta["tier"]
        if tier not in self.store.config.tier_names:
            raise RequestError(ErrorCode.BAD_REQUEST, f"this daemon has no {tier} tier (its "
                               f"tiers: {', '.join(self.store.config.tier_names)})")
        keys, values = conn.scope_many(meta["keys"]), _values(meta, data)
        stored = await self.calls.run(
            functools.partial(self.store.put_in_tier, owner=conn.owner), tier, keys, values)
        if self.cluster is not None and stored:
            await self.calls.run(self.cluster.after_put, keys[:stored], values[:stored],
                                 stored)
        return {"stored": stored}, []

    async def get(self, conn: Connection, meta: dict[str, Any], data: bytes) -> Any:
        key = conn.scope(meta["key"])
        value = await self.calls.for_get()(self.store.get, key)
        if value is None and self.cluster is not None:
            value = (await self.calls.run(self.cluster.fetch, [key]))[0]
        self.read_stats.record_reads(conn.owner, 1, value is not None)
        return {"found": value is not None}, [value] if value is not None else []

    async def get_many(self, conn: Connection, meta: dict[str, Any], data: bytes) -> Any:
        """The values of the leading keys whose values fit in ``max_answer_data_bytes``
        (at least one key): ``answered`` says how many when that is not all of them, and
        the others' sizes are nil (the client asks again for those)."""
        keys = conn.scope_many(meta["keys"])
        values = await self.calls.for_get()(self._get_leading, keys)
        if self.cluster is not None and None in values:
            values = await self.calls.run(self._with_pool, keys, values)
        sizes = [None if v is None else len(v) for v in values]
        self.read_stats.record_reads(conn.owner, len(sizes), len(sizes) - sizes.count(None))
        fields: dict[str, Any] = {"sizes": sizes + [None] * (len(keys) - len(values))}
        if len(values) < len(keys):
            fields["answered"] = len(values)
            count = self._cut_log.count()
            if count:
                log.info("get_many answer cut at %d of %d keys (%d bytes of values; limit "
                         "%d) peer=%s; %d answers cut since the last such line", len(values),
                         len(keys), sum(s or 0 for s in sizes), self.max_answer_data_bytes,
                         conn.peer, count)
        return fields, [v for v in values if v]

    def _get_leading(self, keys: list[bytes]) -> list[bytes | None]:
        return self.store.get_many(keys, max_bytes=self.max_answer_data_bytes)

    def _with_pool(self, keys: list[bytes], values: list[bytes | None]
                   ) -> list[bytes | None]:
        """``values`` (the leading ones answered here) with the misses fetched from the
        pool, cut again to ``max_answer_data_bytes`` (at least one)."""
        missing = [i for i, v in enumerate(values) if v is None]
        for i, value in zip(missing, self.cluster.fetch([keys[i] for i in missing]),
                            strict=True):
            values[i] = value
        total = 0
        for n, value in enumerate(values):
            total += 0 if value is None else len(value)
            if n and total > self.max_answer_data_bytes:
                return values[:n]
        return values

    async def match_prefix(self, conn: Connection, meta: dict[str, Any], data: bytes) -> Any:
        keys = conn.scope_many(meta["keys"])
        count = await self.calls.run_short(self.store.match_prefix, keys)
        if self.cluster is not None and count < len(keys):
            count += await self.calls.run(self.cluster.leading, keys[count:])
        if keys and not meta.get("probe"):  # empty lookups and routing probes: no requests
            self.read_stats.record_lookup(conn.owner, len(keys), count)
            if self.metrics is not None:
                tokens = self.read_stats.block_tokens
                self.metrics.record_prefix("local", len(keys) * tokens, count * tokens)
            if self.access_log is not None:
                self.access_log.record(meta["keys"], hit_blocks=count,
                                       namespace=conn.namespace)
        return {"count": count}, []

    async def contains(self, conn: Connection, meta: dict[str, Any], data: bytes) -> Any:
        key = conn.scope(meta["key"])
        present = await self.calls.run_short(self.store.contains, key)
        if not present and self.cluster is not None:
            present = await self.calls.run(self.cluster.contains, key)
        return {"present": present}, []

    async def delete(self, conn: Connection, meta: dict[str, Any], data: bytes) -> Any:
        key = conn.scope(meta["key"])
        deleted = await self.calls.run(self.store.delete, key)
        if self.cluster is not None:  # from the index at once, and from every node
            await self.calls.run(self.cluster.deleted, [key])
        return {"deleted": deleted}, []

    async def tier_of(self, conn: Connection, meta: dict[str, Any], data: bytes) -> Any:
        return {"tier": await self.calls.run_short(self.store.tier_of,
                                                   conn.scope(meta["key"]))}, []

    async def tier_bits(self, conn: Connection, meta: dict[str, Any], data: bytes) -> Any:
        """Each key's tier bits (`Store.tier_bits`: 1 HBM, 2 DRAM, 4 NVMe; 0 not held); in
        a pool, `REMOTE_TIER_BIT` for one no tier here holds and the pool holds elsewhere
        (match_prefix and contains count those as held too). Not a request: no counts."""
        keys = conn.scope_many(meta["keys"])
        bits = await self.calls.run_short(self.store.tier_bits, keys)
        if self.cluster is not None and not all(bits):
            missing = [i for i, b in enumerate(bits) if not b]
            held = await self.calls.run(self.cluster.held_by_peers, [keys[i] for i in missing])
            for i, is_held in zip(missing, held, strict=True):
                bits[i] = REMOTE_TIER_BIT if is_held else 0
        return {"bits": bits}, []

    async def flush(self, conn: Connection, meta: dict[str, Any], data: bytes) -> Any:
        await self.calls.run(self.store.flush)
        return {}, []


def _values(meta: dict[str, Any], data: bytes) -> list[memoryview]:
    """The values a request's data carries, cut by its ``sizes``."""
    view, values, offset = memoryview(data), [], 0
    for size in meta["sizes"]:
        values.append(view[offset:offset + size])
        offset += size
    return values

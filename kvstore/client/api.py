"""The Store API of both clients, written once over the operations (`StoreApi`).

Each method checks its arguments here, in the caller's thread, and hands `_run` a factory
that makes the operation for the session of whatever connection runs it (a retry on a
fresh connection makes it again).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kvstore.buffers import value_view
from kvstore.client.operations import Operations
from kvstore.client.settings import DEFAULT_RETRY, ClientSettings, Retry
from kvstore.errors import InvalidValueError
from kvstore.tiers.base import check_key
from kvstore.wire.ops import TIER_NAMES


def check_keys(keys: Sequence[bytes]) -> list[bytes]:
    return [check_key(k) for k in keys]


class StoreApi:
    """The Store methods, on top of ``_run(operation factory)``: `Client` runs each
    operation and returns its result, `AsyncClient` returns a coroutine of it. Each client
    keeps its pool of connections (`_open_pool`) and runs operations on it (`_run`)."""

    def __init__(self, url: str, *, token: str | None = None, namespace: str | None = None,
                 timeout_s: float = 30.0, connect_timeout_s: float = 5.0,
                 shared_memory: bool = True, max_connections: int = 8,
                 retry: Retry = DEFAULT_RETRY) -> None:
        self.settings = ClientSettings(
            url, token=token, namespace=namespace, timeout_s=timeout_s,
            connect_timeout_s=connect_timeout_s, shared_memory=shared_memory,
            max_connections=max_connections, retry=retry)
        self._open_pool()

    def _open_pool(self) -> None:
        raise NotImplementedError

    def _run(self, make: Any) -> Any:
        raise NotImplementedError

    def put(self, key: bytes, value: Any) -> Any:
        key, src = check_key(key), value_view(value)
        return self._run(lambda s: Operations.put(s, key, src))

    def put_many(self, keys: Sequence[bytes], values: Sequence[Any]) -> Any:
        if len(keys) != len(values):
            raise InvalidValueError(f"put_many got {len(keys)} keys but {len(values)} values")
        checked, srcs = check_keys(keys), [value_view(v) for v in values]
        return self._run(lambda s: Operations.put_many(s, checked, srcs))

    def get(self, key: bytes) -> Any:
        key = check_key(key)
        return self._map(self._run(lambda s: Operations.get_many(s, [key])), lambda r: r[0])

    def get_into(self, key: bytes, out: Any) -> Any:
        key = check_key(key)
        return self._map(self._run(lambda s: Operations.get_many(s, [key], [out])),
                         lambda r: r[0])

    def get_many(self, keys: Sequence[bytes]) -> Any:
        checked = check_keys(keys)
        return self._run(lambda s: Operations.get_many(s, checked))

    def match_prefix(self, keys: Sequence[bytes], *, probe: bool = False) -> Any:
        checked = check_keys(keys)
        return self._run(lambda s: Operations.match_prefix(checked, probe))

    def contains(self, key: bytes) -> Any:
        key = check_key(key)
        return self._run(lambda s: Operations.simple("contains", "key", key, "present"))

    def delete(self, key: bytes) -> Any:
        key = check_key(key)
        return self._run(lambda s: Operations.simple("delete", "key", key, "deleted"))

    def tier_of(self, key: bytes) -> Any:
        key = check_key(key)
        return self._run(lambda s: Operations.simple("tier_of", "key", key, "tier"))

    def tier_bits(self, keys: Sequence[bytes]) -> Any:
        """Each key's tier bits in the daemon (1 HBM, 2 DRAM, 4 NVMe; 8: only elsewhere in
        its pool; 0: not held), as `Store.tier_bits`: a fetch planner's question."""
        checked = check_keys(keys)
        return self._run(lambda s: Operations.tier_bits(checked))

    def put_in_tier(self, tier: str, keys: Sequence[bytes], values: Sequence[Any]) -> Any:
        """`Store.put_in_tier`: blocks into the daemon's ``tier`` only (values in the
        frames, never through the shared pool); how many leading ones were stored."""
        if len(keys) != len(values):
            raise InvalidValueError(f"put_in_tier got {len(keys)} keys but {len(values)} "
                                    "values")
        if tier not in TIER_NAMES:
            raise InvalidValueError(f"put_in_tier: {tier!r} is not a tier's name "
                                    f"({', '.join(TIER_NAMES)})")
        checked, srcs = check_keys(keys), [value_view(v) for v in values]
        return self._run(lambda s: Operations.put_in_tier(s, tier, checked, srcs))

    def flush(self) -> Any:
        return self._run(lambda s: Operations.simple("flush", "", None, "none"))

    def stats(self) -> Any:
        return self._run(lambda s: Operations.simple("stats", "", None, "stats"))

    @staticmethod
    def _map(result: Any, fn: Any) -> Any:
        return fn(result)


"""The operations a request may name, and the fields each needs (docs/PROTOCOL.md).

`check_request` validates a request's meta in place before any handler sees it: the id,
the operation, the timeout, then each field with the checker `_FIELDS` names for it (the
types and bounds the handler relies on), and that the frame's data matches the sizes.
`OPERATIONS` is the set the daemon's dispatch table must serve, no more and no fewer.
"""

from __future__ import annotations

from typing import Any

from kvstore.keys import KEY_BYTES
from kvstore.wire.error_codes import ErrorCode, RequestError

MAX_BATCH_KEYS = 65536
MAX_TIMEOUT_MS = 3_600_000


# Field checkers: (value, field name, the whole request) -> the checked value.


def _key(value: object, field: str, request: dict[str, Any]) -> bytes:
    if not isinstance(value, bytes) or len(value) != KEY_BYTES:
        raise RequestError(ErrorCode.INVALID_KEY, f"{field} must be {KEY_BYTES} bytes")
    return value


def _keys(value: object, field: str, request: dict[str, Any]) -> list[bytes]:
    if not isinstance(value, list) or len(value) > MAX_BATCH_KEYS:
        raise RequestError(ErrorCode.BAD_REQUEST,
                           f"{field} must be a list of at most {MAX_BATCH_KEYS} keys")
    return [_key(k, field, request) for k in value]


def _uints(value: object, field: str) -> list[int]:
    if (not isinstance(value, list) or len(value) > MAX_BATCH_KEYS
            or not all(type(v) is int and v >= 0 for v in value)):
        raise RequestError(ErrorCode.BAD_REQUEST,
                           f"{field} must be a list of non-negative integers")
    return value


def _sizes(value: object, field: str, request: dict[str, Any]) -> list[int]:
    sizes = _uints(value, field)
    if len(sizes) != len(request["keys"]):
        raise RequestError(ErrorCode.BAD_REQUEST, f"{field} must have one entry per key")
    return sizes


def _handles(value: object, field: str, request: dict[str, Any]) -> list[int]:
    return _uints(value, field)


def _uint(value: object, field: str, request: dict[str, Any]) -> int:
    if type(value) is not int or value < 0:
        raise RequestError(ErrorCode.BAD_REQUEST, f"{field} must be a non-negative integer")
    return value


def _bool(value: object, field: str, request: dict[str, Any]) -> bool:
    if not isinstance(value, bool):
        raise RequestError(ErrorCode.BAD_REQUEST, f"{field} must be a boolean")
    return value


def _opt_str(value: object, field: str, request: dict[str, Any]) -> str | None:
    if value is not None and (not isinstance(value, str) or len(value) > 256):
        raise RequestError(ErrorCode.BAD_REQUEST, f"{field} must be nil or a short string")
    return value


TIER_NAMES = ("hbm", "dram", "nvme")


def _tier(value: object, field: str, request: dict[str, Any]) -> str:
    if not isinstance(value, str) or value not in TIER_NAMES:
        raise RequestError(ErrorCode.BAD_REQUEST,
                           f"{field} must be a tier's name: {', '.join(TIER_NAMES)}")
    return value


# op -> the fields it needs, in checking order (``sizes`` after ``keys``).
_FIELDS: dict[str, dict[str, Any]] = {
    "hello": {"version": _uint, "token": _opt_str, "namespace": _opt_str, "shm": _bool},
    "put": {"key": _key},
    "put_many": {"keys": _keys, "sizes": _sizes},
    "get": {"key": _key},
    "get_many": {"keys": _keys},
    "match_prefix": {"keys": _keys},
    "contains": {"key": _key},
    "delete": {"key": _key},
    "tier_of": {"key": _key},
    "tier_bits": {"keys": _keys},
    # put_many into one named tier only, for measuring that tier's fetch cost
    "put_in_tier": {"tier": _tier, "keys": _keys, "sizes": _sizes},
    "flush": {},
    "stats": {},
    # the shared-memory data plane (same host): reserve -> copy -> commit, pin -> copy -> unpin
    "reserve": {"keys": _keys, "sizes": _sizes},
    "commit": {"handles": _handles},
    "abort": {"handles": _handles},
    "pin": {"keys": _keys},
    "unpin": {"handles": _handles},
    # blocks a client read through the shared directory, with no pin: count and keep them
    "touch": {"keys": _keys},
    # where to commit single puts over a Unix socket (daemon/doorbell.py)
    "doorbell": {},
    # between the nodes of a cluster, on keys as stored (docs/CLUSTER.md): only a
    # connection that said hello with the cluster's peer token may send these
    "peer_get": {"keys": _keys},
    "peer_held": {"keys": _keys},
    "peer_drop": {"keys": _keys},
    "peer_put": {"keys": _keys, "sizes": _sizes},  # blocks a node has no room for
}

OPERATIONS = frozenset(_FIELDS)
_WITH_VALUES = frozenset({"put_many", "peer_put", "put_in_tier"})  # data: values by sizes

MAX_SPARES = 4


def _bound_keys(value: object, field: str, request: dict[str, Any]) -> list[bytes]:
    keys = _keys(value, field, request)
    if len(keys) != len(request["handles"]):
        raise RequestError(ErrorCode.BAD_REQUEST, f"{field} must have one key per handle")
    return keys


def _sums(value: object, field: str, request: dict[str, Any]) -> list[int]:
    sums = _uints(value, field)
    if len(sums) != len(request["keys"]):
        raise RequestError(ErrorCode.BAD_REQUEST, f"{field} must have one entry per key")
    return sums


def _spare_sizes(value: object, field: str, request: dict[str, Any]) -> list[int]:
    sizes = _uints(value, field)
    if len(sizes) > MAX_SPARES:
        raise RequestError(ErrorCode.BAD_REQUEST, f"{field} holds at most {MAX_SPARES} sizes")
    return sizes


# Fields an operation may carry, checked when present.
_OPTIONAL_FIELDS: dict[str, dict[str, Any]] = {
    # commit: keys to bind the slots to (needed for spare slots, reserved with no key), and
    # sizes of spare slots to reserve afterwards for the next puts (one round trip each).
    "commit": {"keys": _bound_keys, "reserve_sizes": _spare_sizes},
    # match_prefix: a routing probe, not a request (kept out of the access log and stats).
    "match_prefix": {"probe": _bool},
    # peer_drop: drop only the keys whose value's checksum is not this one (an overwrite
    # elsewhere with other bytes); without it, drop them all (a delete).
    "peer_drop": {"sums": _sums},
}


def check_request(meta: dict[str, Any], data_bytes: int) -> tuple[int, str, float]:
    """Validate a request's meta in place; returns (id, op, timeout in seconds).

    Raises `RequestError`; its ``request_id`` attribute is set when the id was readable,
    so the answer can name the request.
    """
    request_id = meta.get("id")
    if type(request_id) is not int or request_id < 0:
        raise RequestError(ErrorCode.BAD_REQUEST, "id must be a non-negative integer")
    try:
        op = meta.get("op")
        if not isinstance(op, str) or op not in _FIELDS:  # a list or map is unhashable
            raise RequestError(ErrorCode.UNKNOWN_OP, f"unknown operation {op!r}")
        timeout_ms = meta.get("timeout_ms")
        if type(timeout_ms) is not int or not 0 < timeout_ms <= MAX_TIMEOUT_MS:
            raise RequestError(ErrorCode.BAD_REQUEST,
                               f"timeout_ms must be an integer in 1..{MAX_TIMEOUT_MS}")
        for field, check in _FIELDS[op].items():
            if field not in meta:
                raise RequestError(ErrorCode.BAD_REQUEST, f"{op} needs the field {field!r}")
            meta[field] = check(meta[field], field, meta)
        for field, check in _OPTIONAL_FIELDS.get(op, {}).items():
            if meta.get(field) is not None:
                meta[field] = check(meta[field], field, meta)
        expected = sum(meta["sizes"]) if op in _WITH_VALUES else None
        if op == "put":
            expected = data_bytes  # one value: whatever the frame carries
        if expected is not None and expected != data_bytes:
            raise RequestError(ErrorCode.INVALID_VALUE,
                               f"sizes add up to {expected} bytes but the frame carries "
                               f"{data_bytes}")
        if op != "put" and op not in _WITH_VALUES and data_bytes:
            raise RequestError(ErrorCode.BAD_REQUEST, f"{op} carries no data")
    except RequestError as e:
        e.request_id = request_id  # type: ignore[attr-defined]
        raise
    return request_id, op, timeout_ms / 1000

"""The wire protocol between `kvstored` and its clients (docs/PROTOCOL.md describes it).

Every message is one frame, little-endian:

    offset  size  field
         0     2  magic       b"KV"
         2     1  version     PROTOCOL_VERSION
         3     1  kind        1 = request, 2 = response
         4     4  meta_bytes  length of the msgpack map that follows (<= MAX_META_BYTES)
         8     8  data_bytes  length of the raw bytes after the map (values, concatenated)
        16        meta        msgpack map: "id", "op" (requests) or "ok" (responses), fields
                  data        raw value bytes, never msgpack-encoded (no copy, no size blowup)

A frame is validated before anything is touched: magic, version, kind, both lengths
within limits, the meta a map whose fields have the types the operation needs
(`check_request`). A frame whose header is bad cannot be skipped safely, so the peer
closes the connection after answering it.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Any

import msgpack

from kvstore.errors import (
    AuthError,
    BufferSizeError,
    DeadlineExceededError,
    InvalidKeyError,
    InvalidValueError,
    KVStoreError,
    LeaseExpiredError,
    ProtocolError,
    StorageError,
    StoreClosedError,
)
from kvstore.keys import KEY_BYTES

MAGIC = b"KV"
PROTOCOL_VERSION = 1
HEADER = struct.Struct("<2sBBIQ")
HEADER_BYTES = HEADER.size  # 16
MAX_META_BYTES = 4 * 1024 * 1024  # room for a batch of ~100k keys
MAX_BATCH_KEYS = 65536
MAX_TIMEOUT_MS = 3_600_000
DEFAULT_PORT = 7400


class FrameKind(enum.IntEnum):
    REQUEST = 1
    RESPONSE = 2


class ErrorCode(enum.Enum):
    """Error codes of a failed response (``"ok": false``); see docs/PROTOCOL.md."""

    BAD_FRAME = "bad_frame"  # framing broken: the connection is closed after this answer
    BAD_REQUEST = "bad_request"  # a field missing or of the wrong type
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_OP = "unknown_op"
    AUTH_REQUIRED = "auth_required"  # first request was not a hello
    AUTH_FAILED = "auth_failed"  # unknown token
    FORBIDDEN = "forbidden"  # the token does not grant that namespace (or shared memory)
    INVALID_KEY = "invalid_key"
    INVALID_VALUE = "invalid_value"  # over max_value_bytes, sizes not matching data
    BUFFER_SIZE = "buffer_size"
    UNKNOWN_HANDLE = "unknown_handle"  # a reservation or pin this connection does not hold
    DEADLINE_EXCEEDED = "deadline_exceeded"
    STORAGE_ERROR = "storage_error"
    SHUTTING_DOWN = "shutting_down"
    INTERNAL = "internal"
    # Last, so that the doorbell's status numbers of the codes above stay as they were.
    LEASE_EXPIRED = "lease_expired"  # a reservation committed after its lease ran out


_ERROR_CLASSES: dict[ErrorCode, type[KVStoreError]] = {
    ErrorCode.BAD_FRAME: ProtocolError,
    ErrorCode.BAD_REQUEST: ProtocolError,
    ErrorCode.UNSUPPORTED_VERSION: ProtocolError,
    ErrorCode.UNKNOWN_OP: ProtocolError,
    ErrorCode.AUTH_REQUIRED: AuthError,
    ErrorCode.AUTH_FAILED: AuthError,
    ErrorCode.FORBIDDEN: AuthError,
    ErrorCode.INVALID_KEY: InvalidKeyError,
    ErrorCode.INVALID_VALUE: InvalidValueError,
    ErrorCode.BUFFER_SIZE: BufferSizeError,
    ErrorCode.UNKNOWN_HANDLE: ProtocolError,
    ErrorCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    ErrorCode.STORAGE_ERROR: StorageError,
    ErrorCode.SHUTTING_DOWN: StoreClosedError,
    ErrorCode.INTERNAL: KVStoreError,
    ErrorCode.LEASE_EXPIRED: LeaseExpiredError,
}


def error_class(code: str) -> type[KVStoreError]:
    try:
        return _ERROR_CLASSES[ErrorCode(code)]
    except ValueError:
        return KVStoreError


def code_of(error: BaseException) -> ErrorCode:
    """The wire code of an exception raised while serving a request."""
    if isinstance(error, RequestError):
        return error.code
    for cls, code in ((InvalidKeyError, ErrorCode.INVALID_KEY),
                      (InvalidValueError, ErrorCode.INVALID_VALUE),
                      (BufferSizeError, ErrorCode.BUFFER_SIZE),
                      (StorageError, ErrorCode.STORAGE_ERROR),
                      (StoreClosedError, ErrorCode.SHUTTING_DOWN)):
        if isinstance(error, cls):
            return code
    return ErrorCode.INTERNAL


class RequestError(KVStoreError):
    """Raised on the daemon side to answer a request with an error code."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


# -- frames -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Header:
    kind: FrameKind
    meta_bytes: int
    data_bytes: int


def encode(kind: FrameKind, meta: dict[str, Any], data_bytes: int = 0) -> bytes:
    """Header and meta of a frame; ``data_bytes`` of raw data must follow it."""
    packed = msgpack.packb(meta, use_bin_type=True)
    return HEADER.pack(MAGIC, PROTOCOL_VERSION, kind, len(packed), data_bytes) + packed


def decode_header(raw: bytes, *, max_data_bytes: int, expect: FrameKind) -> Header:
    """Validate a 16-byte header; `RequestError(BAD_FRAME or UNSUPPORTED_VERSION)` if bad."""
    magic, version, kind, meta_bytes, data_bytes = HEADER.unpack(raw)
    if magic != MAGIC:
        raise RequestError(ErrorCode.BAD_FRAME, f"not a kvstore frame (magic {magic!r})")
    if version != PROTOCOL_VERSION:
        raise RequestError(ErrorCode.UNSUPPORTED_VERSION,
                           f"protocol version {version} is not supported; this side speaks "
                           f"version {PROTOCOL_VERSION}: upgrade the older of client and daemon")
    if kind != expect:
        raise RequestError(ErrorCode.BAD_FRAME, f"frame kind {kind}, expected {int(expect)}")
    if not 0 < meta_bytes <= MAX_META_BYTES:
        raise RequestError(ErrorCode.BAD_FRAME,
                           f"meta of {meta_bytes} bytes (limit {MAX_META_BYTES})")
    if data_bytes > max_data_bytes:
        raise RequestError(ErrorCode.BAD_FRAME,
                           f"data of {data_bytes} bytes exceeds the limit ({max_data_bytes})")
    return Header(FrameKind(kind), meta_bytes, data_bytes)


MAX_REQUEST_CONTAINERS = 16  # a request's meta: one map, a few lists (keys, sizes, handles)


def decode_meta(raw: bytes, max_containers: int | None = None) -> dict[str, Any]:
    """The meta map of a frame. With ``max_containers`` (the daemon's, for requests), a meta
    of more arrays and maps than that is refused as it is decoded: 4 MiB of nested empty
    lists would otherwise become some 300 MB of Python objects."""
    hooks: dict[str, Any] = {}
    if max_containers is not None:
        left = [max_containers]

        def count(container: Any) -> Any:
            left[0] -= 1
            if left[0] < 0:
                raise ValueError(f"more than {max_containers} arrays and maps")
            return container

        hooks = {"list_hook": count, "object_hook": count}
    try:
        meta = msgpack.unpackb(raw, raw=False, strict_map_key=True, use_list=True, **hooks)
    except Exception as e:  # msgpack raises several unrelated types
        raise RequestError(ErrorCode.BAD_FRAME, f"meta is not valid msgpack: {e}") from None
    if not isinstance(meta, dict):
        raise RequestError(ErrorCode.BAD_FRAME, "meta must be a msgpack map")
    return meta


# -- request validation ---------------------------------------------------------------------------


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
}

OPERATIONS = frozenset(_FIELDS)

MAX_SPARES = 4


def _bound_keys(value: object, field: str, request: dict[str, Any]) -> list[bytes]:
    keys = _keys(value, field, request)
    if len(keys) != len(request["handles"]):
        raise RequestError(ErrorCode.BAD_REQUEST, f"{field} must have one key per handle")
    return keys


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
        expected = sum(meta["sizes"]) if op == "put_many" else None
        if op == "put":
            expected = data_bytes  # one value: whatever the frame carries
        if expected is not None and expected != data_bytes:
            raise RequestError(ErrorCode.INVALID_VALUE,
                               f"sizes add up to {expected} bytes but the frame carries "
                               f"{data_bytes}")
        if op not in ("put", "put_many") and data_bytes:
            raise RequestError(ErrorCode.BAD_REQUEST, f"{op} carries no data")
    except RequestError as e:
        e.request_id = request_id  # type: ignore[attr-defined]
        raise
    return request_id, op, timeout_ms / 1000


# -- the commit doorbell (same host: a Unix socket beside the TCP connection) -------------------

DOORBELL_REQUEST = struct.Struct("<Q16sQ")  # handle, key, spare size (0: none)
DOORBELL_RESPONSE = struct.Struct("<QQQQ")  # status, stored, spare handle (0: none), offset
DOORBELL_MESSAGE_BYTES = 32  # the secret, each request and each response
_CODES = list(ErrorCode)


def doorbell_status(code: ErrorCode) -> int:
    """A doorbell response's status for an error code (0 means done)."""
    return 1 + _CODES.index(code)


def doorbell_code(status: int) -> ErrorCode:
    return _CODES[status - 1] if 0 < status <= len(_CODES) else ErrorCode.INTERNAL


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

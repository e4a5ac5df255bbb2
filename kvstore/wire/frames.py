"""The frames of the wire protocol between `kvstored` and its clients (docs/PROTOCOL.md).

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
(`kvstore.wire.ops.check_request`). A frame whose header is bad cannot be skipped safely,
so the peer closes the connection after answering it.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Any

import msgpack

from kvstore.wire.error_codes import ErrorCode, RequestError

MAGIC = b"KV"
PROTOCOL_VERSION = 1
HEADER = struct.Struct("<2sBBIQ")
HEADER_BYTES = HEADER.size  # 16
MAX_META_BYTES = 4 * 1024 * 1024  # room for a batch of ~100k keys


class FrameKind(enum.IntEnum):
    REQUEST = 1
    RESPONSE = 2


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

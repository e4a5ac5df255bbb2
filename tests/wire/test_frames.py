"""Frames, request checks and error codes (`kvstore.wire`), without a daemon; the daemon's
answers to broken frames are tests/daemon/test_robustness.py."""

from __future__ import annotations

import msgpack
import pytest

from kvstore.errors import InvalidKeyError, KVStoreError, LeaseExpiredError, StorageError
from kvstore.keys import KEY_BYTES
from kvstore.wire import frames
from kvstore.wire.error_codes import ErrorCode, RequestError, code_of, error_class
from kvstore.wire.frames import HEADER, MAGIC, FrameKind, decode_header, decode_meta, encode
from kvstore.wire.ops import OPERATIONS, check_request

KEY = bytes(KEY_BYTES)


def test_a_frame_round_trips():
    raw = encode(FrameKind.REQUEST, {"id": 7, "op": "put", "key": KEY}, data_bytes=5)
    header = decode_header(raw[:frames.HEADER_BYTES], max_data_bytes=5,
                           expect=FrameKind.REQUEST)
    assert (header.kind, header.data_bytes) == (FrameKind.REQUEST, 5)
    assert decode_meta(raw[frames.HEADER_BYTES:]) == {"id": 7, "op": "put", "key": KEY}


@pytest.mark.parametrize(("fields", "code"), [
    ({"magic": b"XX"}, ErrorCode.BAD_FRAME),
    ({"version": frames.PROTOCOL_VERSION + 1}, ErrorCode.UNSUPPORTED_VERSION),
    ({"kind": int(FrameKind.RESPONSE)}, ErrorCode.BAD_FRAME),
    ({"meta_bytes": 0}, ErrorCode.BAD_FRAME),
    ({"meta_bytes": frames.MAX_META_BYTES + 1}, ErrorCode.BAD_FRAME),
    ({"data_bytes": 101}, ErrorCode.BAD_FRAME),
])
def test_a_bad_header_is_refused_with_its_code(fields, code):
    values = {"magic": MAGIC, "version": frames.PROTOCOL_VERSION,
              "kind": int(FrameKind.REQUEST), "meta_bytes": 10, "data_bytes": 0, **fields}
    raw = HEADER.pack(*values.values())
    with pytest.raises(RequestError) as refused:
        decode_header(raw, max_data_bytes=100, expect=FrameKind.REQUEST)
    assert refused.value.code is code


def test_a_meta_of_too_many_containers_is_refused_as_it_is_decoded():
    nested = msgpack.packb({"keys": [[]] * 20}, use_bin_type=True)
    assert decode_meta(nested)["keys"] == [[]] * 20  # a response: no limit
    with pytest.raises(RequestError, match="more than 16"):
        decode_meta(nested, frames.MAX_REQUEST_CONTAINERS)


def test_check_request_checks_each_operations_fields():
    assert check_request({"id": 1, "op": "get", "key": KEY, "timeout_ms": 500}, 0) == (
        1, "get", 0.5)
    with pytest.raises(RequestError) as refused:
        check_request({"id": 2, "op": "get", "key": b"short", "timeout_ms": 500}, 0)
    assert refused.value.code is ErrorCode.INVALID_KEY
    assert refused.value.request_id == 2  # the answer can name the request
    with pytest.raises(RequestError) as refused:
        check_request({"id": 3, "op": "put_many", "keys": [KEY], "sizes": [4],
                       "timeout_ms": 500}, data_bytes=5)
    assert refused.value.code is ErrorCode.INVALID_VALUE
    with pytest.raises(RequestError) as refused:
        check_request({"id": 4, "op": "drop_all", "timeout_ms": 500}, 0)
    assert refused.value.code is ErrorCode.UNKNOWN_OP
    assert "drop_all" not in OPERATIONS and {"hello", "commit", "touch"} <= OPERATIONS


def test_error_codes_become_their_classes_and_back():
    assert error_class("invalid_key") is InvalidKeyError
    assert error_class("lease_expired") is LeaseExpiredError
    assert error_class("from_a_newer_daemon") is KVStoreError
    assert code_of(StorageError("disk")) is ErrorCode.STORAGE_ERROR
    assert code_of(ValueError("a bug")) is ErrorCode.INTERNAL
    assert code_of(RequestError(ErrorCode.FORBIDDEN, "no")) is ErrorCode.FORBIDDEN

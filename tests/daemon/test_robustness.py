"""The daemon under abuse, over real sockets to real `python -m daemon` subprocesses.

- bad input (malformed frames, wrong types, slow senders and readers): the daemon answers
  with the exact error code or drops that connection, stays up, keeps serving a normal
  client, and nothing stored changes (blocks, DRAM bytes in use, values byte for byte);
- several client processes (with and without shared memory) putting and getting the same
  keys at once, each checking every value it reads byte for byte.

Crashes, leases and killed clients are the standing reliability suite's (tests/reliability).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import pytest

import kvstore
from kvstore.wire import frames
from kvstore.wire.frames import HEADER, MAGIC, MAX_META_BYTES
from kvstore.wire.ops import MAX_BATCH_KEYS, MAX_TIMEOUT_MS
from tests.conftest import make_key, make_value
from tests.daemon.conftest import REPO, DaemonProcess

KiB, MiB = 1024, 1024 * 1024
FRAME_TIMEOUT_S = 1.0
MAX_VALUE_BYTES = 1 * MiB
MAX_FRAME_DATA_BYTES = 64 * MiB  # max(max_value_bytes, 64 MiB): what hello reports


# -- raw frames -----------------------------------------------------------------------------------


def frame(meta: Any, data: bytes = b"", *, magic: bytes = MAGIC,
          version: int = frames.PROTOCOL_VERSION, kind: int = 1,
          meta_bytes: int | None = None, data_bytes: int | None = None,
          packed: bytes | None = None) -> bytes:
    """A request frame built by hand; every header field can be forged."""
    if packed is None:
        packed = msgpack.packb(meta, use_bin_type=True)
    return HEADER.pack(magic, version, kind,
                       len(packed) if meta_bytes is None else meta_bytes,
                       len(data) if data_bytes is None else data_bytes) + packed + data


def request(op: str, id: int = 7, timeout_ms: int = 5000, **fields: Any) -> dict[str, Any]:
    return {"id": id, "op": op, "timeout_ms": timeout_ms, **fields}


def hello(shm: bool = False, **changes: Any) -> dict[str, Any]:
    return {**request("hello", id=1, version=frames.PROTOCOL_VERSION, token=None,
                      namespace=None, shm=shm), **changes}


class RawConnection:
    """A bare socket speaking (or abusing) the protocol."""

    def __init__(self, port: int, timeout_s: float = 10.0, rcvbuf_bytes: int = 0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf_bytes:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf_bytes)
        self.sock.settimeout(timeout_s)
        self.sock.connect(("127.0.0.1", port))
        self._ids = itertools.count(100)

    def send(self, raw: bytes) -> None:
        self.sock.sendall(raw)

    def _read(self, nbytes: int) -> bytes | None:
        chunks, got = [], 0
        while got < nbytes:
            try:
                chunk = self.sock.recv(min(nbytes - got, 1 << 20))
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                if got:
                    raise AssertionError(f"connection closed mid-frame ({got}/{nbytes} bytes)")
                return None
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def read_frame(self) -> tuple[dict[str, Any], bytes] | None:
        """The next response, or None if the daemon closed the connection instead."""
        raw = self._read(frames.HEADER_BYTES)
        if raw is None:
            return None
        magic, version, kind, meta_bytes, data_bytes = HEADER.unpack(raw)
        assert (magic, version, kind) == (MAGIC, frames.PROTOCOL_VERSION, 2), raw
        meta = msgpack.unpackb(self._read(meta_bytes) or b"", raw=False)
        data = self._read(data_bytes) if data_bytes else b""
        return meta, data or b""

    def answer(self) -> dict[str, Any]:
        response = self.read_frame()
        assert response is not None, "the daemon closed the connection instead of answering"
        return response[0]

    def call(self, op: str, data: bytes = b"", **fields: Any) -> dict[str, Any]:
        request_id = next(self._ids)
        self.send(frame(request(op, id=request_id, **fields), data))
        meta = self.answer()
        assert meta["id"] == request_id, meta
        return meta

    def hello(self, shm: bool = False) -> dict[str, Any]:
        self.send(frame(hello(shm)))
        meta = self.answer()
        assert meta["ok"], meta
        return meta

    def is_closed(self, within_s: float = 5.0) -> bool:
        """True once the daemon closes the connection (EOF or reset) within ``within_s``."""
        self.sock.settimeout(within_s)
        try:
            return self.read_frame() is None
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()


def assert_error(meta: dict[str, Any], code: str, request_id: int | None) -> None:
    assert meta["ok"] is False, meta
    assert meta["code"] == code, meta
    assert meta["id"] == request_id, meta
    assert isinstance(meta["message"], str) and meta["message"], meta


# -- a daemon with a witness: a normal client and values that must not change ------------------


class Witness:
    """A normal client of the daemon and what it stored; `check` verifies nothing changed."""

    SIZES = (4 * KiB, 20 * KiB, 64 * KiB, 100 * KiB, 300 * KiB, MAX_VALUE_BYTES)

    def __init__(self, daemon: DaemonProcess) -> None:
        self.daemon = daemon
        self.client = kvstore.connect(daemon.url, timeout_s=10)
        self.values = {make_key(("witness", i)): make_value(("witness", i), size)
                       for i, size in enumerate(self.SIZES)}
        for key, value in self.values.items():
            assert self.client.put(key, value)
        stats = self.client.stats()
        self.blocks = stats["blocks"]
        self.dram_used_bytes = stats["tiers"]["dram"]["used_bytes"]

    def check(self) -> None:
        assert self.daemon.proc is not None and self.daemon.proc.poll() is None, \
            f"the daemon died: {self.daemon.output()[-3000:]}"
        for key, value in self.values.items():
            assert self.client.get(key) == value
        assert self.client.get_many(list(self.values)) == list(self.values.values())
        stats = self.client.stats()
        assert stats["blocks"] == self.blocks
        assert stats["tiers"]["dram"]["used_bytes"] == self.dram_used_bytes


@pytest.fixture(scope="module")
def robust_daemon(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kvstored-robust")
    daemon = DaemonProcess(tmp, "--dram", "32MiB", "--max-value", "1MiB",
                           "--frame-timeout", str(FRAME_TIMEOUT_S)).start()
    yield daemon
    daemon.stop()


@pytest.fixture(scope="module")
def witness(robust_daemon):
    w = Witness(robust_daemon)
    yield w
    w.client.close()


# -- bad input: one frame each --------------------------------------------------------------------


KEY = make_key("raw")


@dataclass(frozen=True)
class BadInput:
    payload: Callable[[], bytes]
    code: str | None  # the error answered, or None: dropped without an answer
    closes: bool  # the daemon hangs up after it
    request_id: int | None = 7  # the id the answer names
    after_hello: bool = True
    shm: bool = False


def _header(meta_bytes: int, data_bytes: int = 0, **kw: Any) -> bytes:
    return frame(None, packed=b"", meta_bytes=meta_bytes, data_bytes=data_bytes, **kw)


BAD_INPUTS = {
    # framing: answered with bad_frame (or unsupported_version), then the connection closes
    "bad_magic": BadInput(lambda: frame(request("stats"), magic=b"HT"), "bad_frame", True, None),
    "wrong_version": BadInput(lambda: frame(request("stats"), version=2),
                              "unsupported_version", True, None),
    "version_zero": BadInput(lambda: frame(request("stats"), version=0),
                             "unsupported_version", True, None),
    "response_kind": BadInput(lambda: frame(request("stats"), kind=2), "bad_frame", True, None),
    "unknown_kind": BadInput(lambda: frame(request("stats"), kind=9), "bad_frame", True, None),
    "meta_bytes_zero": BadInput(lambda: _header(0), "bad_frame", True, None),
    "meta_bytes_over_limit": BadInput(lambda: _header(MAX_META_BYTES + 1), "bad_frame", True,
                                      None),
    "meta_bytes_max_u32": BadInput(lambda: _header(2**32 - 1), "bad_frame", True, None),
    "data_bytes_over_limit": BadInput(
        lambda: frame(request("put", key=KEY), data_bytes=MAX_FRAME_DATA_BYTES + 1),
        "bad_frame", True, None),
    "data_bytes_max_u64": BadInput(
        lambda: frame(request("put", key=KEY), data_bytes=2**64 - 1), "bad_frame", True, None),
    "meta_not_msgpack": BadInput(lambda: frame(None, packed=b"\xc1" * 12), "bad_frame", True,
                                 None),
    "meta_truncated_msgpack": BadInput(
        lambda: frame(None, packed=msgpack.packb(request("stats"))[:-3]), "bad_frame", True, None),
    "meta_trailing_bytes": BadInput(
        lambda: frame(None, packed=msgpack.packb(request("stats")) + b"\x00"), "bad_frame", True,
        None),
    "meta_not_a_map": BadInput(lambda: frame([7, "stats", 5000]), "bad_frame", True, None),
    "meta_a_string": BadInput(lambda: frame("stats"), "bad_frame", True, None),
    "meta_int_map_keys": BadInput(lambda: frame({1: 7, 2: "stats"}), "bad_frame", True, None),
    # a 5-byte array header claiming 4 billion entries must not allocate them
    "meta_claims_huge_array": BadInput(lambda: frame(None, packed=b"\xdd\xff\xff\xff\xff"),
                                       "bad_frame", True, None),
    "meta_deeply_nested": BadInput(
        lambda: frame(None, packed=b"\x81\xa1x" + b"\x91" * 100_000 + b"\xc0"), "bad_frame", True,
        None),
    # requests: answered with an error code, the connection stays usable
    "missing_id": BadInput(lambda: frame({"op": "stats", "timeout_ms": 5000}), "bad_request",
                           False, None),
    "id_negative": BadInput(lambda: frame(request("stats", id=-1)), "bad_request", False, None),
    "id_a_string": BadInput(lambda: frame(request("stats", id="7")), "bad_request", False, None),
    "id_a_float": BadInput(lambda: frame(request("stats", id=7.0)), "bad_request", False, None),
    "unknown_op": BadInput(lambda: frame(request("drop_everything")), "unknown_op", False),
    "private_op": BadInput(lambda: frame(request("_release_connection")), "unknown_op", False),
    "missing_op": BadInput(lambda: frame({"id": 7, "timeout_ms": 5000}), "unknown_op", False),
    "op_an_int": BadInput(lambda: frame(request(5)), "unknown_op", False),  # type: ignore[arg-type]
    "op_a_list": BadInput(lambda: frame(request(["get"])), "unknown_op", False),  # type: ignore[arg-type]
    "op_a_map": BadInput(lambda: frame(request({"op": "get"})), "unknown_op", False),  # type: ignore[arg-type]
    "op_bytes": BadInput(lambda: frame(request(b"stats")), "unknown_op", False),  # type: ignore[arg-type]
    "timeout_ms_zero": BadInput(lambda: frame(request("stats", timeout_ms=0)), "bad_request",
                                False),
    "timeout_ms_negative": BadInput(lambda: frame(request("stats", timeout_ms=-5)),
                                    "bad_request", False),
    "timeout_ms_too_long": BadInput(lambda: frame(request("stats", timeout_ms=MAX_TIMEOUT_MS + 1)),
                                    "bad_request", False),
    "timeout_ms_a_float": BadInput(lambda: frame(request("stats", timeout_ms=5000.0)),
                                   "bad_request", False),
    "timeout_ms_missing": BadInput(lambda: frame({"id": 7, "op": "stats"}), "bad_request", False),
    "key_of_15_bytes": BadInput(lambda: frame(request("get", key=KEY[:15])), "invalid_key",
                                False),
    "key_of_17_bytes_put": BadInput(lambda: frame(request("put", key=KEY + b"!"), b"x" * 4096),
                                    "invalid_key", False),
    "key_a_string": BadInput(lambda: frame(request("get", key=KEY.hex()[:16])), "invalid_key",
                             False),
    "key_missing": BadInput(lambda: frame(request("put"), b"x" * 100), "bad_request", False),
    "keys_not_a_list": BadInput(lambda: frame(request("get_many", keys=KEY)), "bad_request",
                                False),
    "keys_with_a_short_key": BadInput(lambda: frame(request("get_many", keys=[KEY, KEY[:15]])),
                                      "invalid_key", False),
    "keys_over_batch_limit": BadInput(
        lambda: frame(request("match_prefix", keys=[KEY] * (MAX_BATCH_KEYS + 1))), "bad_request",
        False),
    "sizes_not_matching_data": BadInput(
        lambda: frame(request("put_many", keys=[KEY, make_key("raw2")], sizes=[100, 100]),
                      b"x" * 150), "invalid_value", False),
    "sizes_count_not_keys": BadInput(
        lambda: frame(request("put_many", keys=[KEY, make_key("raw2")], sizes=[200]), b"x" * 200),
        "bad_request", False),
    "sizes_negative": BadInput(
        lambda: frame(request("put_many", keys=[KEY, make_key("raw2")], sizes=[300, -100]),
                      b"x" * 200), "bad_request", False),
    "sizes_booleans": BadInput(
        lambda: frame(request("put_many", keys=[KEY], sizes=[True]), b"x"), "bad_request", False),
    "value_over_max_value": BadInput(
        lambda: frame(request("put", key=KEY), b"x" * (MAX_VALUE_BYTES + 1)), "invalid_value",
        False),
    "get_carrying_data": BadInput(lambda: frame(request("get", key=KEY), b"x" * 64),
                                  "bad_request", False),
    "hello_twice_wrong_version": BadInput(lambda: frame(hello(version=2, id=7)),
                                          "unsupported_version", True),
    "hello_shm_not_bool": BadInput(lambda: frame(hello(shm="yes", id=7)), "bad_request", False),
    "hello_missing_field": BadInput(
        lambda: frame({k: v for k, v in hello(id=7).items() if k != "token"}), "bad_request",
        False),
    "before_hello": BadInput(lambda: frame(request("get", key=KEY)), "auth_required", False,
                             after_hello=False),
    "put_before_hello": BadInput(lambda: frame(request("put", key=KEY), b"v" * 1000),
                                 "auth_required", False, after_hello=False),
    "commit_unknown_handles": BadInput(lambda: frame(request("commit", handles=[1, 2**40])),
                                       "unknown_handle", False, shm=True),
    "unpin_unknown_handles": BadInput(lambda: frame(request("unpin", handles=[3])),
                                      "unknown_handle", False, shm=True),
    "abort_unknown_handles": BadInput(lambda: frame(request("abort", handles=[2**64 - 1])),
                                      "unknown_handle", False, shm=True),
    "handles_not_a_list": BadInput(lambda: frame(request("commit", handles=5)), "bad_request",
                                   False, shm=True),
    "handles_negative": BadInput(lambda: frame(request("unpin", handles=[-1])), "bad_request",
                                 False, shm=True),
    "reserve_without_shm": BadInput(
        lambda: frame(request("reserve", keys=[KEY], sizes=[4096])), "forbidden", False),
    "pin_without_shm": BadInput(lambda: frame(request("pin", keys=[KEY])), "forbidden", False),
    "touch_without_shm": BadInput(lambda: frame(request("touch", keys=[KEY])), "forbidden",
                                  False),
    "touch_short_key": BadInput(lambda: frame(request("touch", keys=[b"short"])),
                                "invalid_key", False, shm=True),
    # the first slot is reserved before the second size is refused: it must not leak
    "reserve_over_max_value": BadInput(
        lambda: frame(request("reserve", keys=[KEY, make_key("raw2")],
                              sizes=[64 * KiB, MAX_VALUE_BYTES + 1])),
        "invalid_value", False, shm=True),
    # garbage: the first 16 bytes are taken as a header whose magic is wrong
    "garbage_bytes": BadInput(lambda: b"\x00\xff" + random.Random(1).randbytes(4094),
                              "bad_frame", True, None),
    "http_request": BadInput(lambda: b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", "bad_frame",
                             True, None),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_is_refused_and_changes_nothing(name, robust_daemon, witness):
    case = BAD_INPUTS[name]
    conn = RawConnection(robust_daemon.port)
    try:
        if case.after_hello:
            conn.hello(shm=case.shm)
        conn.send(case.payload())
        witness.check()  # another client is served while the bad frame is pending
        assert_error(conn.answer(), case.code, case.request_id)
        if case.closes:
            assert conn.is_closed(), "the daemon must hang up after a frame it cannot skip"
        else:  # the frame was consumed whole: the next request on it is served
            if not case.after_hello:
                conn.hello()
            meta = conn.call("contains", key=KEY)
            assert meta["ok"] and meta["present"] is False, meta
        witness.check()
    finally:
        conn.close()


def test_wrong_version_is_answered_before_anything_else(robust_daemon, witness):
    """Even a first frame: a client of another protocol version learns why, then is dropped."""
    conn = RawConnection(robust_daemon.port)
    try:
        conn.send(frame(hello(), version=frames.PROTOCOL_VERSION + 1))
        meta = conn.answer()
        assert_error(meta, "unsupported_version", None)
        assert str(frames.PROTOCOL_VERSION) in meta["message"]
        assert conn.is_closed()
    finally:
        conn.close()
    witness.check()


def test_duplicate_and_foreign_handles_change_nothing(robust_daemon, witness):
    """Handles are per connection and used once: a second commit, another connection's
    handles, or a reservation handle given to unpin are all unknown_handle."""
    owner, other = RawConnection(robust_daemon.port), RawConnection(robust_daemon.port)
    try:
        owner.hello(shm=True)
        other.hello(shm=True)
        reserved = owner.call("reserve", keys=[KEY], sizes=[64 * KiB])
        assert reserved["ok"] and len(reserved["handles"]) == 1, reserved
        handle = reserved["handles"][0]
        for conn, op, handles in ((other, "commit", [handle]), (owner, "unpin", [handle]),
                                  (owner, "commit", [handle, handle]), (other, "abort", [handle])):
            meta = conn.call(op, handles=handles)
            assert meta["ok"] is False and meta["code"] == "unknown_handle", (op, meta)
        assert owner.call("abort", handles=[handle])["ok"]
        meta = owner.call("abort", handles=[handle])
        assert meta["code"] == "unknown_handle", meta
        pinned = owner.call("pin", keys=[next(iter(witness.values))])
        [[_offset, _nbytes, pin]] = pinned["blocks"]
        assert other.call("unpin", handles=[pin])["code"] == "unknown_handle"
        assert owner.call("unpin", handles=[pin])["intact"] == [True]
        assert owner.call("unpin", handles=[pin])["code"] == "unknown_handle"
    finally:
        owner.close()
        other.close()
    witness.check()


def test_reserve_cut_short_by_its_deadline_leaks_no_slot(robust_daemon, witness):
    """reserve with timeout_ms=1: whether it finishes or answers deadline_exceeded, every
    slot it reserved comes back once the connection closes, even one a store call was
    still reserving when the deadline struck (20,000 slots never fit in 1 ms)."""
    num_deadlines = 0
    for num_keys in (20_000, 2000, 200, 200, 50, 50, 20, 20, 20, 5, 5, 5):
        conn = RawConnection(robust_daemon.port)
        try:
            conn.hello(shm=True)
            meta = conn.call("reserve", keys=[make_key(("many", i)) for i in range(num_keys)],
                             sizes=[64] * num_keys, timeout_ms=1)
            assert meta["ok"] or meta["code"] == "deadline_exceeded", meta
            num_deadlines += not meta["ok"]
            assert conn.call("contains", key=KEY)["ok"]  # the connection is still usable
        finally:
            conn.close()
    assert num_deadlines >= 1
    _wait_for(lambda: _dram(witness.client)["used_bytes"] == witness.dram_used_bytes, 5,
              "slots reserved by a request that ran out of time leaked")
    witness.check()


@pytest.mark.parametrize("op", ["commit", "abort"])
def test_commit_or_abort_past_its_deadline_leaks_no_slot(op, start_daemon, tmp_path):
    """With the one worker thread busy, a commit (or abort) with timeout_ms=1 runs out of
    time before it starts: it must still take effect (the answer says it may), never leave
    its slots neither committed nor free. (The flush holds the store lock, so the commit
    cannot run on the event loop either.)"""
    daemon = start_daemon("--dram", "64MiB", "--max-value", "1MiB", "--workers", "1",
                          "--nvme-path", str(tmp_path / "nvme"), "--nvme", "128MiB")
    keys = [make_key(("late", i)) for i in range(4)]
    owner, busy = RawConnection(daemon.port), RawConnection(daemon.port)
    try:
        owner.hello(shm=True)
        busy.hello()
        reserved = owner.call("reserve", keys=keys, sizes=[64 * KiB] * 4)
        assert len(reserved["handles"]) == 4, reserved
        with kvstore.connect(daemon.url) as client:  # blocks only in DRAM, for the flush
            client.put_many([make_key(("busy", j)) for j in range(48)], [bytes(1 << 20)] * 48)
        # One long store call that holds the store lock in the only worker thread.
        busy.send(frame(request("flush", timeout_ms=MAX_TIMEOUT_MS)))
        time.sleep(0.01)
        meta = owner.call(op, handles=reserved["handles"], timeout_ms=1)
        assert_error(meta, "deadline_exceeded", meta["id"])
        assert busy.answer()["ok"]
    finally:
        busy.close()
        owner.close()
    committed = op == "commit"
    with kvstore.connect(daemon.url) as client:
        _wait_for(lambda: _dram(client)["used_bytes"]
                  == 48 * (1 << 20) + (4 * 64 * KiB if committed else 0),
                  5, f"{op} past its deadline left slots neither committed nor free")
        values = client.get_many(keys)  # (the bytes are whatever the slots held)
        assert [v is not None and len(v) == 64 * KiB for v in values] == [committed] * 4


# -- bad input: cut short, and slow senders -------------------------------------------------------


def _put_frame() -> bytes:
    return frame(request("put", key=KEY), b"v" * (64 * KiB))


TRUNCATIONS = {
    "half_header": lambda: _put_frame()[:8],
    "header_only": lambda: _put_frame()[:frames.HEADER_BYTES],
    "header_and_half_meta": lambda: _put_frame()[:frames.HEADER_BYTES + 10],
    "half_the_data": lambda: _put_frame()[:-32 * KiB],
    "all_but_one_byte": lambda: _put_frame()[:-1],
}


@pytest.mark.parametrize("name", list(TRUNCATIONS))
def test_truncated_frame_is_dropped_and_stores_nothing(name, robust_daemon, witness):
    """The client sends part of a frame and closes its side: no answer, no partial put."""
    conn = RawConnection(robust_daemon.port)
    try:
        conn.hello()
        conn.send(TRUNCATIONS[name]())
        conn.sock.shutdown(socket.SHUT_WR)
        assert conn.is_closed(), "a frame cut short must end the connection"
    finally:
        conn.close()
    assert witness.client.contains(KEY) is False
    witness.check()


def _stall_payload(name: str) -> bytes:
    return TRUNCATIONS[name]()


@pytest.mark.parametrize("name", ["half_header", "header_and_half_meta", "half_the_data"])
def test_slow_loris_is_dropped_after_frame_timeout(name, robust_daemon, witness):
    """A sender that starts a frame and stalls is dropped after --frame-timeout (1 s);
    the normal client is served all along, each call well within that time."""
    conn = RawConnection(robust_daemon.port)
    try:
        conn.hello()
        conn.send(_stall_payload(name))
        started = time.monotonic()
        conn.sock.settimeout(0.02)
        served, slowest_s = 0, 0.0
        while True:
            try:
                answer = conn.read_frame()
            except TimeoutError:
                pass
            else:  # half a frame cannot be skipped: no answer, the connection just ends
                assert answer is None, f"answered a stalled frame instead of hanging up: {answer}"
                break
            assert time.monotonic() - started < FRAME_TIMEOUT_S + 3, "stalled sender not dropped"
            call_started = time.monotonic()
            witness.check()
            slowest_s = max(slowest_s, time.monotonic() - call_started)
            served += 1
        dropped_after_s = time.monotonic() - started
    finally:
        conn.close()
    assert dropped_after_s >= FRAME_TIMEOUT_S * 0.8, dropped_after_s
    assert served >= 2 and slowest_s < FRAME_TIMEOUT_S / 2, (served, slowest_s)
    assert witness.client.contains(KEY) is False
    witness.check()


@pytest.mark.parametrize("skip_bytes", [0, frames.HEADER_BYTES], ids=["header", "meta"])
def test_trickling_sender_is_dropped(skip_bytes, robust_daemon, witness):
    """One byte every 0.2 s (in the header, or in the meta after a whole header): never
    silent for long, yet the frame is late as a whole, so the connection is dropped."""
    conn = RawConnection(robust_daemon.port)
    try:
        conn.hello()
        payload = _put_frame()
        conn.send(payload[:skip_bytes])
        started = time.monotonic()
        dropped = False
        for byte in payload[skip_bytes:skip_bytes + 40]:
            try:
                conn.send(bytes([byte]))
                conn.sock.settimeout(0.2)
                answer = conn.read_frame()
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                answer = None
            assert answer is None, f"answered a trickled frame instead of hanging up: {answer}"
            dropped = True
            break
        elapsed_s = time.monotonic() - started
    finally:
        conn.close()
    assert dropped, "a trickling sender must be dropped"
    assert FRAME_TIMEOUT_S * 0.8 <= elapsed_s <= FRAME_TIMEOUT_S + 1.5, elapsed_s
    witness.check()


def test_many_stalled_connections_do_not_block_others(robust_daemon, witness):
    stalled = [RawConnection(robust_daemon.port) for _ in range(50)]
    try:
        for conn in stalled:
            conn.send(_put_frame()[:5])  # no hello even: half a header
        witness.check()
        deadline = time.monotonic() + FRAME_TIMEOUT_S + 4
        for conn in stalled:
            assert conn.is_closed(within_s=max(0.1, deadline - time.monotonic()))
    finally:
        for conn in stalled:
            conn.close()
    witness.check()


def test_client_that_never_reads_is_dropped(robust_daemon, witness):
    """Pipelined gets of 1 MiB whose answers are never read: the daemon cannot drain its
    writes, gives up after --frame-timeout and drops the connection (no unbounded buffer)."""
    big_key = next(k for k, v in witness.values.items() if len(v) == MAX_VALUE_BYTES)
    conn = RawConnection(robust_daemon.port, rcvbuf_bytes=64 * KiB)
    try:
        conn.hello()
        conn.send(b"".join(frame(request("get", id=i, key=big_key)) for i in range(40)))
        time.sleep(0.2)
        witness.check()
        time.sleep(FRAME_TIMEOUT_S + 1.5)
        witness.check()
        # whatever was queued before the drop can be read, then the connection ends
        answers = 0
        while conn.read_frame() is not None:
            answers += 1
            assert answers < 40, "the daemon kept answering a reader that did not read"
    finally:
        conn.close()
    witness.check()


def _dram(client: kvstore.Client) -> dict[str, Any]:
    return client.stats()["tiers"]["dram"]


def _wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> float:
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout_s, what
        time.sleep(0.05)
    return time.monotonic() - started


# -- several client processes at once --------------------------------------------------------------


CONCURRENT_SIZES = (4 * KiB, 12 * KiB, 64 * KiB, 200 * KiB, 500 * KiB, MiB)
NUM_SHARED_KEYS = 96


def _shared_value(i: int) -> bytes:
    return make_value(("shared", i), CONCURRENT_SIZES[i % len(CONCURRENT_SIZES)])


def _worker(url: str, seed: int, shared_memory: bool, num_ops: int) -> dict[str, Any]:
    """Random puts and gets over a key space shared with the other workers; every value
    read must be exactly right (a miss is fine: it was evicted)."""
    rng = random.Random(seed)
    counts = {"puts": 0, "reads": 0, "hits": 0, "wrong": []}

    def verify(i: int, value: bytes | None) -> None:
        counts["reads"] += 1
        if value is not None:
            counts["hits"] += 1
            if value != _shared_value(i):
                counts["wrong"].append(i)

    with kvstore.connect(url, timeout_s=30, shared_memory=shared_memory) as client:
        for _ in range(num_ops):
            i, op = rng.randrange(NUM_SHARED_KEYS), rng.random()
            batch = [(i + j) % NUM_SHARED_KEYS for j in range(3)]
            if op < 0.35:
                client.put(make_key(("shared", i)), _shared_value(i))
                counts["puts"] += 1
            elif op < 0.45:
                client.put_many([make_key(("shared", j)) for j in batch],
                                [_shared_value(j) for j in batch])
                counts["puts"] += len(batch)
            elif op < 0.8:
                verify(i, client.get(make_key(("shared", i))))
            else:
                values = client.get_many([make_key(("shared", j)) for j in batch])
                for j, value in zip(batch, values, strict=True):
                    verify(j, value)
    return counts


def _worker_main(argv: list[str]) -> None:
    url, seed, shared_memory, num_ops = argv
    counts = _worker(url, int(seed), shared_memory == "1", int(num_ops))
    print(json.dumps(counts), flush=True)
    sys.exit(1 if counts["wrong"] else 0)


def test_concurrent_client_processes_read_exact_values(start_daemon, tmp_path):
    daemon = start_daemon("--dram", "24MiB", "--nvme-path", str(tmp_path / "nvme"),
                          "--nvme", "64MiB", "--max-value", "1MiB")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    workers = [subprocess.Popen(
        [sys.executable, "-c", "import sys; from tests.daemon.test_robustness import "
         "_worker_main; _worker_main(sys.argv[1:])",
         daemon.url, str(seed), "1" if seed % 2 else "0", "150"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for seed in range(4)]
    results = []
    for worker in workers:
        out, err = worker.communicate(timeout=120)
        assert worker.returncode == 0, (out.decode(), err.decode()[-3000:])
        results.append(json.loads(out))
    assert all(r["wrong"] == [] for r in results), results
    assert all(r["reads"] > 0 and r["puts"] > 0 for r in results), results
    assert sum(r["hits"] for r in results) > 0, results
    with kvstore.connect(daemon.url) as client:
        stats = client.stats()
        assert stats["checksum_failures"] == 0
        assert stats["evictions"] > 0, "the test should exercise eviction"
        for i in range(NUM_SHARED_KEYS):
            value = client.get(make_key(("shared", i)))
            assert value is None or value == _shared_value(i), i

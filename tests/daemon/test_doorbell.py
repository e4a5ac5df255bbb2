"""The commit doorbell (`daemon.doorbell`), over real sockets to a real `python -m daemon`:
a same-host client's single puts are committed through it and read back byte for byte; a
doorbell with an unknown secret, a commit of a slot the connection does not hold, and a
doorbell whose connection ended change nothing; a daemon without shared memory offers
none and puts go over TCP.
"""

from __future__ import annotations

import os
import socket

import pytest

import kvstore
from kvstore.client import sync as sync_client
from kvstore.wire import doorbell, error_codes
from tests.conftest import make_key, make_value
from tests.daemon.conftest import DaemonProcess
from tests.daemon.test_robustness import RawConnection, frame, request

KiB, MiB = 1024, 1024 * 1024


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    process = DaemonProcess(tmp_path_factory.mktemp("kvstored-doorbell"), "--dram", "32MiB",
                            "--max-value", "4MiB").start()
    yield process
    process.stop()


def _doorbell(port: int) -> tuple[RawConnection, socket.socket]:
    """A raw shared-memory connection and the doorbell bound to it."""
    conn = RawConnection(port)
    conn.hello(shm=True)
    meta = conn.call("doorbell")
    assert meta["ok"] and os.path.exists(meta["path"]), meta
    bell = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bell.settimeout(10)
    bell.connect(meta["path"])
    bell.sendall(meta["secret"])
    assert bell.recv(1) == b"\x01"
    return conn, bell


def _ring(bell: socket.socket, handle: int, key: bytes, spare: int = 0) -> tuple[int, ...]:
    bell.sendall(doorbell.DOORBELL_REQUEST.pack(handle, key, spare))
    answer = b""
    while len(answer) < doorbell.DOORBELL_MESSAGE_BYTES:
        chunk = bell.recv(doorbell.DOORBELL_MESSAGE_BYTES - len(answer))
        assert chunk, "the doorbell closed instead of answering"
        answer += chunk
    return doorbell.DOORBELL_RESPONSE.unpack(answer)


def test_single_puts_are_committed_through_the_doorbell(daemon, monkeypatch):
    rung = []
    ring = sync_client._Connection._ring

    def counting_ring(self, meta, timeout_s):
        rung.append(meta["keys"][0])
        return ring(self, meta, timeout_s)

    monkeypatch.setattr(sync_client._Connection, "_ring", counting_ring)
    values = {make_key(("bell", i)): make_value(("bell", i), size)
              for i, size in enumerate([64 * KiB, 300 * KiB, MiB, 4 * MiB, MiB])}
    with kvstore.connect(daemon.url) as client:
        for key, value in values.items():
            assert client.put(key, value) is True
        for key, value in values.items():
            assert client.get(key) == value
    # every single put commits through the doorbell (into a spare slot of its size, or
    # one it reserved over TCP first)
    assert rung == list(values)
    with kvstore.connect(daemon.url, shared_memory=False) as tcp:
        assert all(tcp.get(key) == value for key, value in values.items())


def test_a_commit_of_a_slot_not_held_is_refused_and_stores_nothing(daemon):
    conn, bell = _doorbell(daemon.port)
    key = make_key("not-held")
    try:
        status, stored, spare, _ = _ring(bell, 987654321, key, spare=64 * KiB)
        assert doorbell.doorbell_code(status) is error_codes.ErrorCode.UNKNOWN_HANDLE
        assert (stored, spare) == (0, 0)
        # a real reservation of this connection commits, and its spare comes back
        meta = conn.call("reserve", keys=[key], sizes=[64 * KiB])
        status, stored, spare, _ = _ring(bell, meta["handles"][0], key, spare=64 * KiB)
        assert (status, stored) == (0, 1) and spare > 0
    finally:
        bell.close()
        conn.close()
    with kvstore.connect(daemon.url, shared_memory=False) as tcp:
        assert tcp.contains(key) is True
        assert tcp.contains(make_key("never")) is False


def test_a_doorbell_with_an_unknown_secret_is_closed(daemon):
    conn, bell = _doorbell(daemon.port)  # for the socket's path
    path = bell.getpeername()
    bell.close()
    stranger = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stranger.settimeout(10)
    try:
        stranger.connect(path)
        stranger.sendall(os.urandom(doorbell.DOORBELL_MESSAGE_BYTES))
        assert stranger.recv(1) == b""
    finally:
        stranger.close()
        conn.close()
    with kvstore.connect(daemon.url) as client:  # still served
        assert client.put(make_key("after-stranger"), b"v" * (64 * KiB))


def test_a_doorbell_ends_with_its_connection(daemon):
    conn, bell = _doorbell(daemon.port)
    conn.close()
    try:
        assert bell.recv(1) == b""  # closed by the daemon when the connection went
    finally:
        bell.close()


def test_no_doorbell_without_shared_memory(tmp_path):
    process = DaemonProcess(tmp_path, "--dram", "16MiB", "--no-shared-memory").start()
    try:
        conn = RawConnection(process.port)
        try:
            conn.hello(shm=True)
            conn.send(frame(request("doorbell", id=5)))
            answer = conn.answer()
            assert answer["ok"] is False and answer["code"] == "forbidden", answer
        finally:
            conn.close()
        with kvstore.connect(process.url) as client:
            assert client.put(make_key("tcp-put"), b"w" * MiB)
            assert client.get(make_key("tcp-put")) == b"w" * MiB
    finally:
        process.stop()

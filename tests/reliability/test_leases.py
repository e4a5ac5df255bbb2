"""Leases of the shared-memory data plane against a real daemon with a short ``--lease``:
a client paused past its lease, then carrying on as if nothing happened, never makes a
reader get bytes other than what was committed for its key.

- a writer stalled between reserve and its copy: its slot is quarantined, not given to
  another put; the late copy lands in that quarantined slot, the other client's value
  reads back byte for byte (shared-memory directory, pin, TCP, after demotion to NVMe),
  and the stalled put raises `LeaseExpiredError` once, with no retry;
- the same for a spare slot committed late through the doorbell;
- a quarantined slot is counted (stats, /metrics) and comes back after its commit, its
  abort, or its connection's end; a commit mixing an expired handle with a live one fails
  whole, one naming a foreign handle beside it changes nothing;
- a reader whose pin ran out before it copied drops that copy and asks again.

The stalls are real: the test pauses a real client (raw frames, or the client's own
operation driven by hand) until the daemon logs that the lease expired.
"""

from __future__ import annotations

import re
import socket
import time
import urllib.request
from collections.abc import Callable, Generator
from typing import Any

import numpy as np
import pytest

import kvstore
from kvstore import LeaseExpiredError
from kvstore.buffers import value_view
from kvstore.client import sync as sync_client
from kvstore.client.operations import Operations
from kvstore.shm.mapping import map_shared
from kvstore.wire import doorbell
from kvstore.wire.error_codes import ErrorCode
from tests.conftest import make_key, make_value
from tests.daemon.conftest import DaemonProcess, free_port
from tests.daemon.test_doorbell import _ring
from tests.daemon.test_robustness import RawConnection

KiB = 1024
SLOT_BYTES = 256 * KiB  # = --max-value: one value per slot, 16 slots in 4 MiB of DRAM
NUM_SLOTS = 16
LEASE_FLAGS = ("--dram", "4MiB", "--max-value", "256KiB", "--lease", "1")


def _expiries(daemon: DaemonProcess) -> list[tuple[int, int]]:
    """(reservations, pins) of each lease expiry the daemon logged so far."""
    return [(int(r), int(p)) for r, p in re.findall(
        r"lease expired peer=\S+: (\d+) reservations and (\d+) pins", daemon.output())]


def _wait_for_expiry(daemon: DaemonProcess, seen: int, timeout_s: float = 10.0
                     ) -> tuple[int, int]:
    """Wait until the daemon logs its expiry number ``seen + 1``; what expired then."""
    deadline = time.monotonic() + timeout_s
    while len(_expiries(daemon)) <= seen:
        assert time.monotonic() < deadline, "no lease expired"
        time.sleep(0.05)
    return _expiries(daemon)[seen]


def _until_expired(daemon: DaemonProcess, expired: tuple[int, int]) -> Callable[[], None]:
    """A stall: until the daemon's first lease expiry, which must take ``expired``."""
    def stall() -> None:
        assert _wait_for_expiry(daemon, 0) == expired
    return stall


def _map_pool(hello: dict[str, Any]) -> np.ndarray:
    shm = hello["shm"]
    return np.frombuffer(map_shared(shm["name"], shm["nbytes"], create=False), np.uint8)


def _dram_used_bytes(client: kvstore.Client) -> int:
    return client.stats()["tiers"]["dram"]["used_bytes"]


def _fill(client: kvstore.Client, tag: str, num: int) -> None:
    for i in range(num):  # put_many: a single put would also hold a spare slot
        assert client.put_many([make_key((tag, i))], [make_value((tag, i), SLOT_BYTES)])


def _scrape(port: int) -> set[str]:
    """The sample lines of the daemon's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return {line for line in response.read().decode().splitlines()
                if not line.startswith("#")}


def _stalled(operation: Generator, stall: Callable[[], Any], *, after: str | None = None,
             before: str | None = None) -> Generator:
    """A client operation that pauses (``stall()``) after the answer to its request of op
    ``after`` arrives, or before it sends its request of op ``before``."""
    request = next(operation)
    while True:
        if request[0]["op"] == before:
            stall()
        response = yield request
        if request[0]["op"] == after:
            stall()
        try:
            request = operation.send(response)
        except StopIteration as done:
            return done.value


def _read_every_way(daemon: DaemonProcess, client: kvstore.Client, key: bytes,
                    value: bytes) -> None:
    """``key`` reads back as ``value`` through the directory, a pin and over TCP."""
    conn = client._idle[0]
    reads = conn.session.num_directory_reads
    assert client.get(key) == value, "the directory read returned other bytes"
    assert conn.session.num_directory_reads == reads + 1, "not read through the directory"
    raw = RawConnection(daemon.port)
    try:
        pool = _map_pool(raw.hello(shm=True))
        [[offset, nbytes, pin]] = raw.call("pin", keys=[key])["blocks"]
        copy = pool[offset:offset + nbytes].tobytes()
        assert raw.call("unpin", handles=[pin])["intact"] == [True]
        assert copy == value, "the pinned read returned other bytes"
    finally:
        raw.close()
    with kvstore.connect(daemon.url, shared_memory=False) as tcp:
        assert tcp.get(key) == value, "the TCP read returned other bytes"


def test_late_copy_of_a_stalled_writer_cannot_touch_another_value(start_daemon, tmp_path):
    daemon = start_daemon(*LEASE_FLAGS, "--nvme-path", str(tmp_path / "nvme"),
                          "--nvme", "32MiB")
    with kvstore.connect(daemon.url) as client:
        _fill(client, "old", NUM_SLOTS - 1)  # one slot left: the writer's
        writer = RawConnection(daemon.port)
        try:
            pool = _map_pool(writer.hello(shm=True))
            reserved = writer.call("reserve", keys=[make_key("stalled")], sizes=[SLOT_BYTES])
            [handle], [offset] = reserved["handles"], reserved["offsets"]
            assert _wait_for_expiry(daemon, 0) == (1, 0)  # the writer is paused meanwhile
            other, value = make_key("other"), make_value("other", SLOT_BYTES)
            assert client.put_many([other], [value]) == 1  # acknowledged
            pool[offset:offset + SLOT_BYTES] = 0xEE  # the writer resumes: its late copy
            _read_every_way(daemon, client, other, value)
            _fill(client, "new", NUM_SLOTS)  # everything else goes down to NVMe
            assert client.tier_of(other) == "nvme"
            with kvstore.connect(daemon.url, shared_memory=False) as tcp:
                assert tcp.get(other) == value, "the value demoted to NVMe changed"
            assert client.get(other) == value
            meta = writer.call("commit", handles=[handle])
            assert meta["ok"] is False and meta["code"] == "lease_expired", meta
            assert writer.call("contains", key=make_key("stalled"))["present"] is False
        finally:
            writer.close()


def test_late_spare_commit_through_the_doorbell_is_refused(start_daemon):
    daemon = start_daemon(*LEASE_FLAGS)
    with kvstore.connect(daemon.url) as client:
        _fill(client, "old", NUM_SLOTS - 2)  # two slots left: a put's and its spare
        writer = RawConnection(daemon.port)
        bell = None
        try:
            pool = _map_pool(writer.hello(shm=True))
            first = make_key("first")
            reserved = writer.call("reserve", keys=[first], sizes=[SLOT_BYTES])
            committed = writer.call("commit", handles=reserved["handles"],
                                    reserve_sizes=[SLOT_BYTES])
            [spare], [offset] = committed["handles"], committed["offsets"]
            assert _wait_for_expiry(daemon, 0) == (1, 0)  # the spare, held past its lease
            other, value = make_key("other"), make_value("other", SLOT_BYTES)
            assert client.put_many([other], [value]) == 1
            pool[offset:offset + SLOT_BYTES] = 0xEE  # the late copy into the spare
            _read_every_way(daemon, client, other, value)
            meta = writer.call("doorbell")
            bell = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            bell.settimeout(10)
            bell.connect(meta["path"])
            bell.sendall(meta["secret"])
            assert bell.recv(1) == b"\x01"
            status, stored, spare_handle, _ = _ring(bell, spare, make_key("late"), SLOT_BYTES)
            assert (status, stored, spare_handle) == (
                doorbell.doorbell_status(ErrorCode.LEASE_EXPIRED), 0, 0)
            assert not client.contains(make_key("late"))
        finally:
            if bell is not None:
                bell.close()
            writer.close()


@pytest.mark.parametrize("path", ["reserve", "spare"])
def test_stalled_put_raises_lease_expired_once(path, start_daemon, monkeypatch):
    """The client's own put, paused past its lease: a put_many after its reserve answer
    (then copying late, and committing over TCP), or a single put before it commits its
    spare slot through the doorbell. It raises `LeaseExpiredError` and is not retried (one
    attempt), and stores nothing."""
    daemon = start_daemon(*LEASE_FLAGS)
    rung: list[int] = []
    ring = sync_client._Connection._ring
    monkeypatch.setattr(sync_client._Connection, "_ring",
                        lambda self, *a: rung.append(1) or ring(self, *a))
    keys = [make_key(("stalled", i)) for i in range(2)]
    values = [make_value(("stalled", i), SLOT_BYTES) for i in range(2)]
    attempts = []

    def put(session: Any) -> Generator:
        attempts.append(session)
        if path == "reserve":
            return _stalled(Operations.put_many(session, keys, [value_view(v) for v in values]),
                            _until_expired(daemon, (2, 0)), after="reserve")
        return _stalled(Operations.put(session, keys[0], value_view(values[0])),
                        _until_expired(daemon, (1, 0)), before="commit")

    with kvstore.connect(daemon.url) as client:
        if path == "spare":
            assert client.put(make_key("first"), make_value("first", SLOT_BYTES))  # a spare
        with pytest.raises(LeaseExpiredError, match="lease"):
            client._run(put)
        assert len(attempts) == 1, "a put whose lease expired was retried"
        assert len(rung) == (2 if path == "spare" else 0)  # the first put's commit, and this
        assert not any(client.contains(k) for k in keys)
        assert client.put_many(keys, values) == 2  # the connection is fine
        assert client.get_many(keys) == values


@pytest.mark.parametrize("end", ["commit", "abort", "close"])
def test_quarantined_slot_comes_back(end, start_daemon):
    """Counted while quarantined (stats and /metrics), in DRAM's used bytes, and back in
    the pool once its commit (refused), its abort or its connection's end comes."""
    metrics_port = free_port()
    daemon = start_daemon(*LEASE_FLAGS, "--metrics", f"127.0.0.1:{metrics_port}")
    with kvstore.connect(daemon.url) as client:
        baseline = _dram_used_bytes(client)
        writer = RawConnection(daemon.port)
        try:
            writer.hello(shm=True)
            reserved = writer.call("reserve", keys=[make_key("stalled")], sizes=[SLOT_BYTES])
            _wait_for_expiry(daemon, 0)
            leases = client.stats()["leases"]
            assert (leases["quarantined_slots"], leases["quarantined_bytes"]) == (1, SLOT_BYTES)
            assert _scrape(metrics_port) >= {'kvstore_quarantined_slots 1.0',
                                             f'kvstore_quarantined_bytes {SLOT_BYTES:.1f}',
                                             'kvstore_lease_expiries_total{kind="reservation"} 1.0'}
            assert _dram_used_bytes(client) == baseline + SLOT_BYTES
            if end == "commit":
                meta = writer.call("commit", handles=reserved["handles"])
                assert meta["ok"] is False and meta["code"] == "lease_expired", meta
            elif end == "abort":
                assert writer.call("abort", handles=reserved["handles"])["ok"]
        finally:
            if end == "close":
                writer.close()
        deadline = time.monotonic() + 10
        while _dram_used_bytes(client) != baseline:
            assert time.monotonic() < deadline, "the quarantined slot did not come back"
            time.sleep(0.05)
        leases = client.stats()["leases"]
        assert (leases["quarantined_slots"], leases["quarantined_bytes"]) == (0, 0)
        assert leases["expired_reservations"] == 1
        assert _scrape(metrics_port) >= {'kvstore_quarantined_slots 0.0',
                                         'kvstore_quarantined_bytes 0.0'}
        writer.close()
        _fill(client, "fill", NUM_SLOTS)  # every slot is usable again


def test_commit_mixing_expired_and_live_handles(start_daemon):
    """A foreign handle beside an expired one changes nothing (unknown_handle); an expired
    one beside a live one fails the whole commit, and both slots go back."""
    daemon = start_daemon(*LEASE_FLAGS)
    with kvstore.connect(daemon.url) as client:
        baseline = _dram_used_bytes(client)
        writer = RawConnection(daemon.port)
        try:
            writer.hello(shm=True)
            [old] = writer.call("reserve", keys=[make_key("old")], sizes=[SLOT_BYTES])["handles"]
            _wait_for_expiry(daemon, 0)
            [new] = writer.call("reserve", keys=[make_key("new")], sizes=[SLOT_BYTES])["handles"]
            for handles in ([old, 10**9], [old, old]):
                meta = writer.call("commit", handles=handles)
                assert meta["ok"] is False and meta["code"] == "unknown_handle", meta
            assert client.stats()["leases"]["quarantined_slots"] == 1
            assert _dram_used_bytes(client) == baseline + 2 * SLOT_BYTES
            meta = writer.call("commit", handles=[new, old])
            assert meta["ok"] is False and meta["code"] == "lease_expired", meta
            assert _dram_used_bytes(client) == baseline
            assert client.stats()["leases"]["quarantined_slots"] == 0
            assert writer.call("abort", handles=[new])["code"] == "unknown_handle"
            assert not any(client.contains(make_key(k)) for k in ("old", "new"))
        finally:
            writer.close()


def test_reader_whose_pin_expired_drops_its_copy(start_daemon):
    """A reader paused between its pin answer and its copy, past the lease, while the key
    is deleted and its slot reused by another value: the copy is dropped, and the read
    asks again (a miss now), never returning the other value's bytes."""
    daemon = start_daemon(*LEASE_FLAGS)
    key = make_key("read")
    with kvstore.connect(daemon.url) as writer, kvstore.connect(daemon.url) as reader:
        _fill(writer, "old", NUM_SLOTS - 1)
        assert writer.put_many([key], [make_value("read", SLOT_BYTES)]) == 1
        reader._idle[0].session.directory = None  # read through a pin

        def reuse_the_slot() -> None:
            assert _wait_for_expiry(daemon, 0) == (0, 1)
            assert writer.delete(key)
            assert writer.put_many([make_key("reuse")], [make_value("reuse", SLOT_BYTES)])

        got = reader._run(lambda session: _stalled(Operations.get_many(session, [key]),
                                                   reuse_the_slot, after="pin"))
        assert got == [None]

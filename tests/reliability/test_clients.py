"""Clients that die or stall holding shared-memory reservations and pins: a SIGKILLed
client's slots and pins come back at once, a live client that outlives its lease has its
pins dropped and its reservations quarantined until it commits, aborts or hangs up.
(The SIGKILL of the daemon itself is test_crash.py's.)"""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import kvstore
from tests.conftest import make_key, make_value
from tests.daemon.conftest import REPO
from tests.daemon.test_robustness import RawConnection, _dram, _wait_for

KiB = 1024


SLOT_BYTES = 256 * KiB  # = --max-value: 16 such values fill a 4 MiB DRAM tier
NUM_SLOTS = 16

_HOLDER = """
import json, socket, sys, time
sys.path.insert(0, {repo!r})
from tests.daemon.test_robustness import RawConnection, _dram, _wait_for
conn = RawConnection({port})
conn.hello(shm=True)
reserved = conn.call("reserve", keys={new_keys!r}, sizes={sizes!r})
pinned = conn.call("pin", keys={pin_keys!r})
print(json.dumps({{"reserved": len(reserved["handles"]),
                   "pinned": sum(b is not None for b in pinned["blocks"])}}), flush=True)
time.sleep(600)
"""


def _fill_dram(client: kvstore.Client, tag: str) -> None:
    """Put a DRAM tier's worth of new values; each must be stored (so every older block,
    pinned ones included, must be evictable)."""
    for i in range(NUM_SLOTS):  # put_many: a single put would also hold a spare slot
        assert client.put_many([make_key((tag, i))], [make_value((tag, i), SLOT_BYTES)]), \
            f"no room for fill value {i}: a slot or pin leaked"


def test_sigkill_of_client_releases_its_reservations_and_pins(start_daemon):
    daemon = start_daemon("--dram", "4MiB", "--max-value", "256KiB")
    with kvstore.connect(daemon.url) as client:
        held = [make_key(("held", i)) for i in range(4)]
        for i, key in enumerate(held):
            # put_many: a single put would also keep a spare slot reserved for the next one
            assert client.put_many([key], [make_value(("held", i), SLOT_BYTES)])
        baseline = _dram(client)
        assert baseline["used_bytes"] == 4 * SLOT_BYTES
        script = _HOLDER.format(repo=str(REPO), port=daemon.port,
                                new_keys=[make_key(("reserved", i)) for i in range(6)],
                                sizes=[SLOT_BYTES] * 6, pin_keys=held)
        holder = subprocess.Popen([sys.executable, "-c", script], cwd=REPO,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            line = holder.stdout.readline()
            assert line, holder.stderr.read().decode()
            assert json.loads(line) == {"reserved": 6, "pinned": 4}
            assert _dram(client)["used_bytes"] == 10 * SLOT_BYTES
        finally:
            holder.send_signal(signal.SIGKILL)
            holder.wait(10)
            holder.stdout.close()
            holder.stderr.close()
        _wait_for(lambda: _dram(client)["used_bytes"] == baseline["used_bytes"], 5,
                  "the killed client's reservations were not released")
        stats = client.stats()
        assert stats["blocks"] == 4 and stats["torn_reads"] == 0
        for i, key in enumerate(held):
            assert client.get(key) == make_value(("held", i), SLOT_BYTES)
        _fill_dram(client, "fill")
        assert not any(client.contains(k) for k in held), "formerly pinned blocks not evicted"
        assert not any(client.contains(make_key(("reserved", i))) for i in range(6))
        assert client.stats()["blocks"] == NUM_SLOTS


def test_lease_expiry_quarantines_a_live_clients_reservation_and_drops_its_pin(start_daemon):
    """(tests/daemon/test_leases.py has the late copies into such a slot.)"""
    daemon = start_daemon("--dram", "4MiB", "--max-value", "256KiB", "--lease", "1")
    with kvstore.connect(daemon.url) as client:
        held = make_key("leased")
        assert client.put_many([held], [make_value("leased", SLOT_BYTES)])  # (no spare)
        baseline = _dram(client)["used_bytes"]
        conn = RawConnection(daemon.port)
        try:
            conn.hello(shm=True)
            reserved = conn.call("reserve", keys=[make_key("late")], sizes=[SLOT_BYTES])
            [[_offset, _nbytes, pin]] = conn.call("pin", keys=[held])["blocks"]
            assert _dram(client)["used_bytes"] == baseline + SLOT_BYTES
            waited_s = _wait_for(
                lambda: client.stats()["leases"]["quarantined_slots"] == 1, 5,
                "an expired reservation was not quarantined")
            assert waited_s >= 0.5, "quarantined before the lease ran out"
            # Kept out of use until the client is done with it: its commit, refused.
            assert _dram(client)["used_bytes"] == baseline + SLOT_BYTES
            meta = conn.call("commit", handles=reserved["handles"])
            assert meta["ok"] is False and meta["code"] == "lease_expired", meta
            assert _dram(client)["used_bytes"] == baseline
            meta = conn.call("unpin", handles=[pin])
            assert meta["ok"] is False and meta["code"] == "unknown_handle", meta
            assert conn.call("contains", key=make_key("late"))["present"] is False
            # the connection itself is fine: a fresh reservation commits
            again = conn.call("reserve", keys=[make_key("late")], sizes=[SLOT_BYTES])
            assert conn.call("commit", handles=again["handles"])["stored"] == 1
        finally:
            conn.close()
        stats = client.stats()
        assert stats["torn_reads"] == 0, "a pin taken back by the sweeper is not a torn read"
        assert stats["tiers"]["dram"]["used_bytes"] == baseline + SLOT_BYTES
        _fill_dram(client, "fill")
        assert not client.contains(held)



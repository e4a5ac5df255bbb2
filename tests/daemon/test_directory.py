"""One-sided reads: same-host clients find blocks through the daemon's shared directory and
copy them from the pool with no request; every change the daemon makes is seen at once,
and a stopped or killed daemon's directory stops being read. Real daemon subprocesses."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import kvstore
from kvstore import StoreConnectionError
from kvstore.shm import directory as shm_directory
from tests.conftest import make_key, make_value

pytestmark = pytest.mark.skipif(not shm_directory.Directory.supported,
                                reason="x86-64 only (see kvstore.shm.directory)")
KiB = 1024
REPO = Path(__file__).resolve().parents[2]


def session_of(client: kvstore.Client):
    return client._idle[0].session


def test_reads_go_through_the_directory_and_see_every_change(start_daemon):
    daemon = start_daemon("--dram", "16MiB", "--max-value", "1MiB")
    writer, reader = kvstore.connect(daemon.url), kvstore.connect(daemon.url)
    key = make_key("k")
    writer.put(key, make_value(1, 256 * KiB))
    out = np.zeros(256 * KiB, dtype=np.uint8)
    assert reader.get_into(key, out) and out.tobytes() == make_value(1, 256 * KiB)
    assert reader.get(key) == make_value(1, 256 * KiB)
    assert session_of(reader).num_directory_reads == 2  # no pin asked for either
    writer.put(key, make_value(2, 100 * KiB))  # overwritten, another size and slot
    assert reader.get(key) == make_value(2, 100 * KiB)
    writer.put(make_key("small"), b"in the frame")  # small puts land in DRAM too
    assert reader.get(make_key("small")) == b"in the frame"
    assert writer.delete(key)
    assert reader.get(key) is None
    assert session_of(reader).num_directory_reads == 4
    writer.close()
    reader.close()


def test_evicted_blocks_are_read_from_where_they_went(start_daemon, tmp_path):
    daemon = start_daemon("--dram", "4MiB", "--nvme-path", str(tmp_path / "nvme"),
                          "--nvme", "64MiB", "--max-value", "1MiB")
    client = kvstore.connect(daemon.url)
    keys = [make_key(i) for i in range(24)]
    for i, key in enumerate(keys):
        assert client.put(key, make_value(i, 512 * KiB))
    # DRAM holds the last few; the rest were demoted to NVMe, no longer listed: read via
    # the daemon (newest first, before those reads promote older blocks over them).
    assert all(client.get(keys[i]) == make_value(i, 512 * KiB) for i in reversed(range(24)))
    assert 0 < session_of(client).num_directory_reads < len(keys)
    client.close()


def test_reads_through_the_directory_count_as_hits(start_daemon):
    daemon = start_daemon("--dram", "16MiB", "--max-value", "1MiB")
    client = kvstore.connect(daemon.url)
    client.put(make_key("h"), make_value("h", 128 * KiB))
    before = client.stats()["hits"]
    for _ in range(40):
        assert client.get(make_key("h")) is not None
    # Reported in batches of TOUCH_BATCH, not waited for: the next request sees them.
    assert client.stats()["hits"] - before >= 32
    client.close()


def test_tenants_do_not_find_each_others_blocks(tmp_path, start_daemon):
    tokens = tmp_path / "tokens.toml"
    token = {name: f"token-{name * 16}" for name in "ab"}
    tokens.write_text("".join(
        f'[[tenant]]\nname = "{n}"\ntoken = "{t}"\nnamespaces = ["ns-{n}"]\n'
        "shared_memory = true\n" for n, t in token.items()))
    daemon = start_daemon("--dram", "16MiB", "--max-value", "1MiB", "--token-file", str(tokens))
    a, b = kvstore.connect(daemon.url, token["a"]), kvstore.connect(daemon.url, token["b"])
    a.put(make_key("secret"), make_value("a", 128 * KiB))
    assert b.get(make_key("secret")) is None  # the same key bytes, another namespace
    assert a.get(make_key("secret")) == make_value("a", 128 * KiB)
    assert session_of(a).num_directory_reads == 1
    a.close()
    b.close()


def test_a_killed_daemon_is_not_read_past_the_staleness_bound(start_daemon):
    daemon = start_daemon("--dram", "16MiB", "--max-value", "1MiB")
    client = kvstore.connect(daemon.url, timeout_s=2)
    client.put(make_key("k"), make_value("k", 128 * KiB))
    assert client.get(make_key("k")) is not None
    daemon.signal(signal.SIGKILL)
    time.sleep(shm_directory.STALE_S + 0.5)
    with pytest.raises(StoreConnectionError):
        client.get(make_key("k"))


_WRITER = """
import sys, time
import kvstore
from tests.conftest import make_key
client = kvstore.connect(sys.argv[1])
end = time.monotonic() + float(sys.argv[2])
version = 0
while time.monotonic() < end:
    version += 1
    i = version % 48
    client.put(make_key(i), bytes([i]) + bytes([version % 251]) * (64 * 1024 - 1))
print(version)
"""


def test_a_read_racing_overwrites_and_slot_reuse_is_whole_or_a_miss(start_daemon):
    # 48 keys rotating through a pool of about 16 slots: every put evicts, slots are
    # reused all the time. A value is its key's number, then one byte repeated: a copy
    # from a slot reused meanwhile shows another key's number, or two bytes if it raced
    # the writer's copy. Every read must be a whole value of its own key, or a miss.
    daemon = start_daemon("--dram", "1MiB", "--max-value", "64KiB")
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, daemon.url, "4"], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    reader = kvstore.connect(daemon.url)
    reads = 0
    out = np.empty(64 * KiB, dtype=np.uint8)
    deadline = time.monotonic() + 3.5
    while time.monotonic() < deadline:
        for i in range(48):
            value = reader.get(make_key(i))
            if value is not None:
                assert value[0] == i and len(set(value[1:])) == 1, "a wrong value was a hit"
                reads += 1
            if reader.get_into(make_key(i), out):
                assert out[0] == i and out[1:].min() == out[1:].max(), "a wrong value copied"
    writer.wait(timeout=30)
    assert int(writer.stdout.read()) > 100  # the writer really raced the reader
    assert reads > 0 and session_of(reader).num_directory_reads > 0
    reader.close()

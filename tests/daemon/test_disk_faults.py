"""`kvstored` on a disk that fills up (issue 15, finding 4), a real tmpfs under a real
daemon: puts keep being served from DRAM, nothing acknowledged is lost without being
counted as evicted, no wrong bytes are served, the metrics say the tier is read only, and
SIGTERM still exits 0."""

from __future__ import annotations

import signal
import urllib.request

import kvstore
from tests.conftest import fill_disk, make_key, make_value
from tests.daemon.conftest import free_port

KiB, MiB = 1024, 1024 * 1024


def test_a_full_disk_leaves_the_daemon_serving_and_sigterm_exits_0(start_daemon, tmpfs):
    disk = tmpfs("48m")
    metrics = f"127.0.0.1:{free_port()}"
    daemon = start_daemon("--dram", "16MiB", "--nvme-path", str(disk / "kv"), "--nvme",
                          "256MiB", "--max-value", "1MiB", "--metrics", metrics)
    values = {}
    with kvstore.connect(daemon.url, shared_memory=False) as client:
        for i in range(40):
            values[make_key(i)] = make_value(i, 512 * KiB)
            assert client.put(make_key(i), values[make_key(i)])
        client.flush()
        fill_disk(disk / "filler")
        for i in range(40, 160):
            values[make_key(i)] = make_value(i, 512 * KiB)
            assert client.put(make_key(i), values[make_key(i)]), f"put #{i} refused"
        stats = client.stats()
        assert stats["tiers"]["nvme"]["read_only"]
        got = client.get_many(list(values))
        assert all(g in (None, v) for g, v in zip(got, values.values(), strict=True))
        missing = sum(g is None for g in got)
        assert missing <= stats["evictions"] - stats["demotions"]
        for i in range(160, 180):  # new puts keep working, into DRAM
            assert client.put(make_key(i), make_value(i, 512 * KiB))
            assert client.get(make_key(i)) == make_value(i, 512 * KiB)
    with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=10) as response:
        text = response.read().decode()
    assert 'kvstore_tier_read_only{tier="nvme"} 1.0' in text
    assert daemon.signal(signal.SIGTERM) == 0
    assert "not everything it held was written to NVMe" in daemon.output()
    (disk / "filler").unlink()
    daemon = start_daemon("--dram", "16MiB", "--nvme-path", str(disk / "kv"), "--nvme",
                          "256MiB", "--max-value", "1MiB")
    with kvstore.connect(daemon.url, shared_memory=False) as client:
        for key, value in values.items():
            assert client.get(key) in (None, value)

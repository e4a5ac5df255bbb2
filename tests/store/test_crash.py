"""SIGKILL mid-stream: reopening serves every block covered by the last completed flush()
and nothing corrupt."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from kvstore import Store, StoreConfig
from tests.conftest import make_key, make_value

REPO = Path(__file__).resolve().parents[2]
KiB = 1024
MiB = 1024 * KiB

WRITER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {repo!r})
    from kvstore import Store, StoreConfig
    from tests.conftest import make_key, make_value
    config = StoreConfig(**{config!r})
    store = Store(config)
    i = 0
    while True:
        keys = [make_key(j) for j in range(i, i + 8)]
        values = [make_value(j, 3000 + 7919 * j % 60000) for j in range(i, i + 8)]
        store.put_many(keys, values)
        i += 8
        if i % 64 == 0:
            store.flush()
            print(i, flush=True)
""")


def test_sigkill_during_puts_loses_nothing_flushed(tmp_path):
    config = dict(dram_bytes=1 * MiB, max_value_bytes=64 * KiB,
                  nvme_path=str(tmp_path / "nvme"), nvme_bytes=256 * MiB,
                  nvme_segment_bytes=4 * MiB)
    proc = subprocess.Popen([sys.executable, "-c", WRITER.format(repo=str(REPO), config=config)],
                            stdout=subprocess.PIPE, text=True, cwd=REPO)
    flushed = 0
    deadline = time.monotonic() + 60
    try:
        while flushed < 1600 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, f"writer died early (exit {proc.poll()})"
            flushed = int(line)
        os.kill(proc.pid, signal.SIGKILL)
        # Drain lines printed after our last read: they are flushes that completed too.
        for line in proc.stdout.read().split():
            flushed = max(flushed, int(line))
    finally:
        proc.kill()
        proc.wait()
    assert flushed >= 1600, "the writer was too slow to reach the kill point"
    with Store(StoreConfig(**config)) as store:
        for j in range(flushed):
            got = store.get(make_key(j))
            assert got == make_value(j, 3000 + 7919 * j % 60000), f"block {j} lost or wrong"
        # Blocks written after the last flush may or may not be there, but never corrupt.
        for j in range(flushed, flushed + 2000):
            got = store.get(make_key(j))
            assert got is None or got == make_value(j, 3000 + 7919 * j % 60000)
        assert store.stats()["checksum_failures"] == 0

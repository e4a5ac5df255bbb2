"""What a kvstored leaves in /dev/shm: nothing after any exit it controls, and what a
SIGKILL left is removed by the next daemon that starts, never what a live one holds.

Other daemons (other tests, other people's) come and go in /dev/shm meanwhile: these tests
look only at the names of processes they started (``kvstored-<pid>-...``) or made up.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

import kvstore
from tests.conftest import make_key, make_value
from tests.daemon.conftest import DaemonProcess, shm_entries_of

SHM = "/dev/shm"
KiB, MiB = 1024, 1024 * 1024


def kinds(names: list[str]) -> list[str]:
    return sorted("directory" if n.endswith("-dir") else
                  "doorbell" if n.endswith("-doorbell") else "pool" for n in names)


def test_what_a_sigkill_leaves_is_reclaimed_by_the_next_start_and_live_daemons_keep_theirs(
        start_daemon):
    live = start_daemon("--dram", "16MiB")
    client = kvstore.connect(live.url)
    client.put(make_key("live"), make_value("live", 300 * KiB))
    killed = start_daemon("--dram", "16MiB")
    kvstore.connect(killed.url).put(make_key("killed"), b"x" * 1000)
    assert killed.signal(signal.SIGKILL) == -signal.SIGKILL
    left = shm_entries_of(killed.proc.pid)
    assert kinds(left) == ["directory", "doorbell", "pool"], left
    held = shm_entries_of(live.proc.pid)
    assert kinds(held) == ["directory", "doorbell", "pool"], held

    fresh = start_daemon("--dram", "16MiB")
    assert shm_entries_of(killed.proc.pid) == []
    reclaimed = [line for line in fresh.output().splitlines() if "reclaimed" in line]
    assert len(reclaimed) == 1 and str(killed.proc.pid) in reclaimed[0], fresh.output()
    # The live daemon's segments are all there, and its clients still use them.
    assert shm_entries_of(live.proc.pid) == held
    assert client.get(make_key("live")) == make_value("live", 300 * KiB)
    client.put(make_key("live-2"), make_value("live", 200 * KiB))  # through the doorbell
    assert client.get(make_key("live-2")) == make_value("live", 200 * KiB)
    client.close()
    fresh.stop()
    assert shm_entries_of(fresh.proc.pid) == []  # and a clean stop leaves nothing


def test_only_segments_whose_owner_is_gone_are_reclaimed(tmp_path, start_daemon):
    """Made-up leftovers: an owner is this very process only if pid, start time, boot and
    pid namespace all match; one of another pid namespace cannot be judged from here."""
    from daemon.segments import Owner

    me = Owner.this_process()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(gone.stdout)

    def owner(**changes: object) -> Owner:
        return dataclasses.replace(me, **changes)

    made = {
        "dead pid": (owner(pid=dead_pid), True),
        "pid reused by this test": (owner(start_ticks=me.start_ticks + 1), True),
        "another boot": (owner(boot="00000000" if me.boot != "00000000" else "11111111"),
                         True),
        "this test (alive)": (me, False),
        "another pid namespace": (owner(pid=dead_pid, pidns=me.pidns + 1), False),
    }
    names = {}
    try:
        for what, (who, _) in made.items():
            name = f"{who.prefix}{os.urandom(4).hex()}"
            with open(os.path.join(SHM, name), "wb") as f:
                f.write(b"\xab" * 4096)
            names[what] = name
        odd = os.path.join(SHM, f"kvstored-{dead_pid}-not-a-daemon-{os.urandom(4).hex()}")
        with open(odd, "wb") as f:
            f.write(b"?")
        start_daemon("--dram", "16MiB")
        for what, (_, reclaimed) in made.items():
            exists = os.path.exists(os.path.join(SHM, names[what]))
            assert exists is not reclaimed, f"{what}: {'kept' if exists else 'removed'}"
        assert os.path.exists(odd), "a name of another form was removed"
    finally:
        for name in [*names.values(), os.path.basename(odd)]:
            try:
                os.unlink(os.path.join(SHM, name))
            except FileNotFoundError:
                pass


@pytest.mark.parametrize("flags", [(), ("--no-shared-memory",)], ids=["shared", "private"])
def test_sigterm_while_a_large_pool_is_allocated_exits_0_and_leaves_nothing(tmp_path, flags):
    daemon = DaemonProcess(tmp_path, "--dram", "1GiB", *flags).launch()
    assert daemon.sigterm_at("allocating the DRAM pool") == 0, daemon.output()
    output = daemon.output()
    assert "DRAM pool allocated" not in output, "the allocation ended before the signal"
    assert "stopped by SIGTERM during start-up" in output, output
    assert "Traceback" not in output
    assert shm_entries_of(daemon.proc.pid) == []


@pytest.mark.parametrize("after_s", [0.0, 0.15, 0.4])
def test_sigterm_at_any_moment_of_start_up_exits_0_and_leaves_nothing(tmp_path, after_s):
    """From the moment the daemon catches SIGTERM (its first moments), a SIGTERM stops it
    cleanly wherever start-up is: imports, reclaiming, the pool, binding, serving."""
    daemon = DaemonProcess(tmp_path, "--dram", "64MiB").launch()
    try:
        deadline = time.monotonic() + 20
        while not catches(daemon.proc.pid, signal.SIGTERM):
            assert daemon.proc.poll() is None and time.monotonic() < deadline, daemon.output()
            time.sleep(0.001)
        time.sleep(after_s)
        assert daemon.signal(signal.SIGTERM) == 0, daemon.output()
    finally:
        daemon.stop()
    assert "Traceback" not in daemon.output()
    if after_s == 0.0:  # long before the pool is there
        assert "stopped by SIGTERM during start-up" in daemon.output(), daemon.output()
    assert shm_entries_of(daemon.proc.pid) == []


def catches(pid: int, sig: int) -> bool:
    """Whether process ``pid`` has a handler for ``sig`` (SigCgt in /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as f:
        mask = next(line.split()[1] for line in f if line.startswith("SigCgt:"))
    return bool(int(mask, 16) >> (sig - 1) & 1)


def test_an_error_at_start_leaves_nothing(tmp_path):
    """The metrics port is taken: the daemon fails once its pool and doorbell exist."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        daemon = DaemonProcess(tmp_path, "--dram", "16MiB", "--metrics", f"127.0.0.1:{port}")
        with pytest.raises(RuntimeError, match="exited 1"):
            daemon.start()
        daemon.stop()
    assert shm_entries_of(daemon.proc.pid) == []

"""What a kvstored leaves in /dev/shm: nothing after any exit it controls, and what a
SIGKILL left is removed by the next daemon that starts, never what a live one holds.

Other daemons (other tests, other people's) come and go in /dev/shm meanwhile: these tests
look only at the names of processes they started (``kvstored-<pid>-...``) or made up.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
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
        # (waited for, not polled: its --listen port accepts for a moment before the
        # metrics port fails)
        assert daemon.launch().proc.wait(timeout=60) == 1, daemon.output()
        assert "--metrics" in daemon.output()
        daemon.stop()
    assert shm_entries_of(daemon.proc.pid) == []


def _daemon_in_a_pid_namespace(port: int) -> subprocess.Popen[bytes]:
    """kvstored as pid 1 of a pid namespace of its own (a container restarted beside the
    same /dev/shm), under unshare(1); its process group is its to kill."""
    from tests.daemon.conftest import REPO

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-m", "daemon",
         "--dram", "16MiB", "--listen", f"127.0.0.1:{port}"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)


def _entries_of_namespace(unshare: subprocess.Popen[bytes]) -> set[str]:
    """The /dev/shm entries of the daemon that ``unshare`` started (pid 1 of its
    namespace, whose inode its names carry)."""
    with open(f"/proc/{unshare.pid}/task/{unshare.pid}/children") as f:
        child = int(f.read().split()[0])
    pidns = os.stat(f"/proc/{child}/ns/pid").st_ino
    return {n for n in os.listdir(SHM) if n.startswith("kvstored-1-") and f"-{pidns}-" in n}


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="needs root and unshare(1) for a pid namespace")
def test_a_dead_daemon_of_another_pid_namespace_is_reclaimed_a_live_one_kept(start_daemon):
    """From review: a daemon SIGKILLed in another pid namespace (its pid means nothing
    here) left its pool for good; now a pool no process holds locked is a dead owner's."""
    ports = [_free_port() for _ in range(2)]
    dead, live = (_daemon_in_a_pid_namespace(port) for port in ports)
    try:
        for port in ports:
            _wait_for_port(port)
        dead_entries, live_entries = _entries_of_namespace(dead), _entries_of_namespace(live)
        assert kinds(sorted(dead_entries)) == kinds(sorted(live_entries)) == [
            "directory", "doorbell", "pool"]
        os.killpg(dead.pid, signal.SIGKILL)
        dead.wait(10)
        time.sleep(1.2)  # a pool is judged once it is older than a second
        fresh = start_daemon("--dram", "16MiB")
        assert not dead_entries & set(os.listdir(SHM)), fresh.output()
        assert live_entries <= set(os.listdir(SHM))
        assert "reclaimed 3 shared-memory entries" in fresh.output()
        with kvstore.connect(f"kvstore://127.0.0.1:{ports[1]}") as client:  # still serving
            assert client.put(make_key("ns"), make_value("ns", 200 * KiB))
            assert client.get(make_key("ns")) == make_value("ns", 200 * KiB)
    finally:
        for process in (dead, live):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(15)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            assert time.monotonic() < deadline, f"nothing listens on {port}"
            time.sleep(0.05)

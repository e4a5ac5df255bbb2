"""A real `kvstored` subprocess per test (or per module), on a free port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DaemonProcess:
    """``python -m daemon`` with the given flags; ``url`` once it accepts connections.
    With ``netns``, it runs in that network namespace, listening on ``host`` there
    (`start` cannot reach it from here: `launch` it and wait for what it does)."""

    def __init__(self, tmp_path: Path, *flags: str, port: int | None = None,
                 host: str = "127.0.0.1", netns: str | None = None) -> None:
        self.host, self.port = host, port or free_port()
        self.url = f"kvstore://{host}:{self.port}"
        self.flags = ["--listen", f"{host}:{self.port}", *flags]
        self.netns = netns
        self.log_path = tmp_path / f"kvstored-{self.port}-{time.monotonic_ns()}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def launch(self) -> DaemonProcess:
        """Start the process and return at once (`start` also waits until it serves)."""
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        self.log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        # `ip netns exec` execs the command: the process is the daemon (signals reach it).
        where = [] if self.netns is None else ["ip", "netns", "exec", self.netns]
        self.proc = subprocess.Popen([*where, sys.executable, "-m", "daemon", *self.flags],
                                     cwd=REPO, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        return self

    def start(self, timeout_s: float = 20.0) -> DaemonProcess:
        assert self.netns is None, "a daemon in another namespace: launch it"
        self.launch()
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kvstored exited {self.proc.returncode}: {self.output()}")
            try:
                socket.create_connection((self.host, self.port), 0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"kvstored did not start in {timeout_s} s: {self.output()}")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_output(self, text: str, timeout_s: float = 30.0) -> None:
        """Until ``text`` is in the log (polled every few ms: a test may have to act while
        the daemon is still at that point)."""
        deadline = time.monotonic() + timeout_s
        while text not in self.output():
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"kvstored exited {self.proc.returncode} before logging "
                                   f"{text!r}: {self.output()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"kvstored did not log {text!r} in {timeout_s} s: "
                                   f"{self.output()}")
            time.sleep(0.005)

    def sigterm_at(self, text: str) -> int:
        """SIGTERM as soon as ``text`` is in the log; the exit code."""
        try:
            self.wait_for_output(text)
        except BaseException:
            self.stop()
            raise
        return self.signal(signal.SIGTERM)

    def signal(self, sig: int) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "log", None) is not None:
            self.log.close()


def shm_entries_of(pid: int) -> list[str]:
    """The /dev/shm entries named for process ``pid`` (``kvstored-<pid>-...``)."""
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(f"kvstored-{pid}-"))


@pytest.fixture
def start_daemon(tmp_path):
    """``start_daemon(*flags)`` -> a running DaemonProcess, stopped at teardown."""
    started: list[DaemonProcess] = []

    def start(*flags: str, port: int | None = None) -> DaemonProcess:
        daemon = DaemonProcess(tmp_path, *flags, port=port).start()
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


@pytest.fixture(scope="module")
def shared_daemon(tmp_path_factory):
    """One daemon (64 MiB DRAM + 64 MiB NVMe) for a whole test module."""
    tmp = tmp_path_factory.mktemp("kvstored")
    daemon = DaemonProcess(tmp, "--dram", "64MiB", "--nvme-path", str(tmp / "nvme"),
                           "--nvme", "64MiB", "--max-value", "4MiB").start()
    yield daemon
    daemon.stop()

"""Hosts for a test, made of Linux network namespaces on this machine: each host has its
own network stack and address, and reaches the others only over one bridge (its loopback
is its own).

    namespace <tag>-hub                      namespace <tag>-<host>
    br0 10.77.0.1/24 ──── veth v-<host> ──── eth0 10.77.0.<10+i>/24
    redis-server on 10.77.0.1:6379
    (and on a Unix socket: how this process, in the root namespace, reads Redis)

Nothing is added to the root namespace, so runs side by side do not collide: each
network's namespaces are named for the creating process and a random tag (``<tag>`` is
``kvt-<pid>-<hex>``), and addresses exist only inside them. `Network.close` kills what
still runs in its namespaces (only this harness starts processes there) and deletes them;
the namespaces of a run that was killed (its process is gone) go when the next one starts.

A test cannot open a socket in another namespace (``os.setns`` is Python 3.12), so code
that must run on a host runs in an `Agent` there: a Python process that runs the calls it
is sent on its stdin and answers on its stdout, pickled (this module, run as a script).
"""

from __future__ import annotations

import importlib
import itertools
import os
import pickle
import re
import secrets
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parents[2]
SUBNET = "10.77.0"
HUB_IP = f"{SUBNET}.1"
HUB_MAC = "02:6b:76:00:00:01"  # locally administered
REDIS_PORT = 6379
NODE_PORT = 7400  # every host has the whole port range to itself
_NAME = re.compile(r"kvt-(\d+)-[0-9a-f]+(-[a-z0-9]+)?")  # a network's tag, or a host's
_LENGTH = struct.Struct("<Q")


def _ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def netns_unavailable() -> str | None:
    """Why network namespaces cannot be made here; None if they can."""
    if os.geteuid() != 0:
        return "needs root: the test makes network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip`"
    probe = f"kvt-{os.getpid()}-0-probe"
    try:
        _ip("netns", "add", probe)
        _ip("netns", "del", probe)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        return f"`ip netns` does not work here: {e}"
    return None


@dataclass(frozen=True)
class Host:
    name: str
    netns: str
    ip: str

    def argv(self, *command: str) -> list[str]:
        """``command`` run on this host (`ip netns exec` execs it: same process)."""
        return ["ip", "netns", "exec", self.netns, *command]


class Network:
    """A bridge in a namespace of its own (the hub) and the hosts `add_host` puts on it."""

    def __init__(self) -> None:
        _remove_stale()
        self.tag = f"kvt-{os.getpid()}-{secrets.token_hex(3)}"
        self.hub = f"{self.tag}-hub"
        self.hosts: dict[str, Host] = {}
        self._made: list[str] = []
        try:
            self._add_netns(self.hub)
            # A bridge without an address of its own takes its ports' lowest one, so it
            # would change as hosts are added, and hosts that cached the old one would
            # lose the hub (Redis) for as long as their ARP entry lives.
            _ip("-n", self.hub, "link", "add", "br0", "address", HUB_MAC, "type", "bridge")
            _ip("-n", self.hub, "addr", "add", f"{HUB_IP}/24", "dev", "br0")
            _ip("-n", self.hub, "link", "set", "br0", "up")
        except BaseException:
            self.close()
            raise

    def _add_netns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._made.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def add_host(self, name: str) -> Host:
        """A new host on the bridge, at the next address."""
        if name in self.hosts or not re.fullmatch(r"[a-z0-9]{1,8}", name):
            raise ValueError(f"host names are new, 1-8 lower-case letters or digits: {name!r}")
        host = Host(name, f"{self.tag}-{name}", f"{SUBNET}.{10 + len(self.hosts)}")
        self._add_netns(host.netns)
        hub_end = f"v-{name}"
        _ip("link", "add", "eth0", "netns", host.netns, "type", "veth",
            "peer", "name", hub_end, "netns", self.hub)
        _ip("-n", self.hub, "link", "set", hub_end, "master", "br0", "up")
        _ip("-n", host.netns, "addr", "add", f"{host.ip}/24", "dev", "eth0")
        _ip("-n", host.netns, "link", "set", "eth0", "up")
        self.hosts[name] = host
        return host

    def cut(self, host: Host) -> None:
        """Take ``host`` off the network (its link down): packets to and from it are lost."""
        _ip("-n", host.netns, "link", "set", "eth0", "down")

    def mend(self, host: Host) -> None:
        _ip("-n", host.netns, "link", "set", "eth0", "up")

    def close(self) -> None:
        for name in reversed(self._made):
            _remove_netns(name)
        self._made.clear()

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _remove_netns(name: str) -> None:
    """Kill what still runs in namespace ``name`` (this harness's processes), delete it."""
    listed = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True,
                            timeout=30).stdout
    for pid in listed.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


def _remove_stale() -> None:
    """Remove the namespaces and Redis directories of runs whose process is gone (killed
    before cleaning up)."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                            timeout=30).stdout
    for line in listed.splitlines():
        name = line.split(" ", 1)[0]
        if _is_stale(name):
            _remove_netns(name)
    for path in Path(tempfile.gettempdir()).glob("kvt-*-redis-*"):
        if _is_stale(path.name.partition("-redis-")[0]):
            shutil.rmtree(path, ignore_errors=True)


def _is_stale(name: str) -> bool:
    """Whether ``name`` is one of this harness's, made by a process that is gone."""
    match = _NAME.fullmatch(name)
    if match is None or int(match[1]) == os.getpid():
        return False
    try:
        os.kill(int(match[1]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        pass
    return False


class HubRedis:
    """redis-server in the hub's namespace: on ``url`` for the hosts, on a Unix socket for
    this process (`client`), with a password as a Redis other hosts reach must have (it
    refuses them in its protected mode otherwise). The shape of
    `tests.daemon.test_registry.RedisServer`."""

    def __init__(self, network: Network) -> None:
        self.network = network
        self.password = secrets.token_hex(16)
        self.url = f"redis://:{self.password}@{HUB_IP}:{REDIS_PORT}/0"
        self._dir: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def socket_path(self) -> str:
        assert self._dir is not None, "not started"
        return os.path.join(self._dir, "redis.sock")

    def start(self) -> HubRedis:
        import redis

        assert self._proc is None, "already running"
        # Short (a socket's path is under 108 bytes), named for the network: see _remove_stale.
        self._dir = tempfile.mkdtemp(prefix=f"{self.network.tag}-redis-")
        self._proc = subprocess.Popen(
            ["ip", "netns", "exec", self.network.hub, "redis-server", "--bind", HUB_IP,
             "--port", str(REDIS_PORT), "--unixsocket", self.socket_path,
             "--unixsocketperm", "700", "--requirepass", self.password, "--save", "",
             "--appendonly", "no", "--dir", self._dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            client = redis.Redis(unix_socket_path=self.socket_path, password=self.password,
                                 socket_connect_timeout=0.2)
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError("redis-server did not start in the hub") from None
                time.sleep(0.02)
            finally:
                client.close()

    def client(self) -> Any:
        import redis

        return redis.Redis(unix_socket_path=self.socket_path, password=self.password)

    def kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(timeout=10)
            self._proc = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


class Agent:
    """A Python process on ``host`` that runs what it is sent: `call` a function by name
    (``"module:function"``), or `make` an object that stays there and is called through
    the `Remote` returned. Arguments, results and raised errors travel pickled; a call
    that takes longer than ``timeout_s`` fails the test and ends the agent. ``path``: more
    directories for its ``sys.path``."""

    def __init__(self, host: Host, *, timeout_s: float = 60.0, path: Sequence[str] = ()) -> None:
        self.host = host
        self.timeout_s = timeout_s
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            filter(None, [str(REPO), *path, os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen(host.argv(sys.executable, "-m", "tests.cluster.netns"),
                                     cwd=REPO, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE)

    def call(self, function: str, *args: Any, **kwargs: Any) -> Any:
        return self._ask("call", function, args, kwargs)

    def make(self, function: str, *args: Any, **kwargs: Any) -> Remote:
        return Remote(self, self._ask("make", function, args, kwargs))

    def _ask(self, kind: str, target: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            _write(self.proc.stdin, (kind, target, tuple(args), kwargs))
            outcome, value = _read(self.proc.stdout, time.monotonic() + self.timeout_s)
        except TimeoutError:
            self.close()
            raise AssertionError(f"the agent on {self.host.name} did not answer {kind} "
                                 f"{target!r} in {self.timeout_s} s") from None
        if outcome == "error":
            raise value
        return value

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            try:
                self.proc.stdin.close()  # its end of input: it exits
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Remote:
    """An object an `Agent` keeps: its methods, called there."""

    def __init__(self, agent: Agent, handle: int) -> None:
        self._agent = agent
        self._handle = handle

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *args, **kwargs: self._agent._ask("method", (self._handle, name),
                                                        args, kwargs)

    def close(self) -> None:
        """Close the object there (if it has ``close``) and let it go."""
        self._agent._ask("drop", self._handle, (), {})


def _write(stream: IO[bytes], message: Any) -> None:
    data = pickle.dumps(message)
    stream.write(_LENGTH.pack(len(data)) + data)
    stream.flush()


def _read(stream: IO[bytes], deadline: float | None = None) -> Any:
    """The next message on ``stream``; None at its end. TimeoutError past ``deadline``."""
    fd, got = stream.fileno(), bytearray()
    need = _LENGTH.size
    length = None
    while True:
        while len(got) < need:
            if deadline is not None:
                ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
                if not ready:
                    raise TimeoutError
            chunk = os.read(fd, need - len(got))
            if not chunk:
                if got or length is not None:
                    raise EOFError("the other side ended mid-message")
                return None
            got += chunk
        if length is not None:
            return pickle.loads(got)
        (length,) = _LENGTH.unpack(got)
        got, need = bytearray(), length


def _resolve(name: str) -> Any:
    module, _, attr = name.partition(":")
    found: Any = importlib.import_module(module)
    for part in attr.split("."):
        found = getattr(found, part)
    return found


def _error(e: Exception) -> Exception:
    """``e`` as it can travel: itself with its traceback, or a RuntimeError that says it."""
    text = traceback.format_exc()
    try:
        pickle.loads(pickle.dumps(e))
    except Exception:
        return RuntimeError(f"in the agent: {text}")
    e.add_note(f"in the agent: {text}")
    return e


def serve() -> None:
    """The agent: messages on stdin, answers on stdout, until stdin ends."""
    requests, answers = os.fdopen(0, "rb", buffering=0), os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # what the code run here prints goes to stderr, not into the answers
    objects: dict[int, Any] = {}
    handles = itertools.count(1)
    while (message := _read(requests)) is not None:
        kind, target, args, kwargs = message
        try:
            if kind == "call":
                answer: Any = ("ok", _resolve(target)(*args, **kwargs))
            elif kind == "make":
                handle = next(handles)
                objects[handle] = _resolve(target)(*args, **kwargs)
                answer = ("ok", handle)
            elif kind == "method":
                handle, name = target
                answer = ("ok", getattr(objects[handle], name)(*args, **kwargs))
            elif kind == "drop":
                close = getattr(objects.pop(target), "close", None)
                answer = ("ok", close() if close is not None else None)
            else:
                raise ValueError(f"unknown message kind {kind!r}")
        except Exception as e:
            answer = ("error", _error(e))
        try:
            _write(answers, answer)
        except Exception as e:  # a result that cannot be pickled
            _write(answers, ("error", _error(e)))
    for obj in objects.values():
        close = getattr(obj, "close", None)
        if close is not None:
            close()


if __name__ == "__main__":
    serve()

"""A pool for a test: a real redis-server (or a real 3-master Redis Cluster) and real
`kvstored` processes on free ports, all in one cluster."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.cluster import RedisCluster

from kvstore.cluster.index import ClusterIndex
from kvstore.cluster.peers import scope_key_of
from kvstore.keys import namespace_secret, scoped_key
from tests.cluster.netns import NODE_PORT, Host, HubRedis, Network
from tests.daemon.conftest import DaemonProcess
from tests.daemon.test_registry import RedisServer

CLUSTER = "test"
TTL_S = 2.0


def _free_ports(n: int) -> list[int]:
    """``n`` free loopback ports whose cluster bus ports (port + 10000) are free too."""
    ports: list[int] = []
    while len(ports) < n:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port + 10000 > 65535 or port in ports:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        ports.append(port)
    return ports


class _ServerExited(RuntimeError):
    """A redis-server of the cluster exited while starting (its port was taken)."""


class RedisClusterServers:
    """A real 3-master Redis Cluster (redis-server --cluster-enabled, redis-cli --cluster
    create) on free ports; ``client`` is a `RedisCluster` of it."""

    def __init__(self, tmp_path: Path) -> None:
        if shutil.which("redis-cli") is None:
            pytest.skip("redis-cli is not on PATH: cannot create a Redis Cluster")
        for attempt in range(3):
            self.ports = _free_ports(3)
            self.url = f"redis+cluster://127.0.0.1:{self.ports[0]}/0"
            self._procs: list[subprocess.Popen[bytes]] = []
            try:
                self._start(tmp_path)
                return
            except _ServerExited:  # a port (or its bus port) was taken since it was free
                self.kill()
                if attempt == 2:
                    raise
            except BaseException:
                self.kill()
                raise

    def _start(self, tmp_path: Path) -> None:
        for port in self.ports:
            work = tmp_path / f"redis-{port}"
            work.mkdir(exist_ok=True)
            self._procs.append(subprocess.Popen(
                ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                 "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                 "--save", "", "--appendonly", "no", "--dir", str(work)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for port, proc in zip(self.ports, self._procs, strict=True):
            deadline = time.monotonic() + 10
            while True:
                try:
                    redis.Redis(port=port, socket_connect_timeout=0.2).ping()
                    break
                except redis.ConnectionError:
                    if proc.poll() is not None:
                        raise _ServerExited(f"redis-server on port {port} exited") from None
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        subprocess.run(["redis-cli", "--cluster", "create",
                        *[f"127.0.0.1:{p}" for p in self.ports], "--cluster-replicas", "0",
                        "--cluster-yes"], check=True, capture_output=True, timeout=60)
        deadline = time.monotonic() + 20
        while b"cluster_state:ok" not in redis.Redis(port=self.ports[0]).execute_command(
                "CLUSTER", "INFO"):
            if time.monotonic() > deadline:
                pytest.fail("the Redis Cluster did not come up")
            time.sleep(0.1)
        self.client = RedisCluster(host="127.0.0.1", port=self.ports[0])

    def kill(self) -> None:
        if getattr(self, "client", None) is not None:
            self.client.close()
        for proc in self._procs:
            proc.kill()
            proc.wait()


class Pool:
    """Nodes n0, n1, ... of cluster `CLUSTER` on one redis-server: ``redis_server``
    (started; ``url`` for the nodes, ``client()`` for the test, ``kill()``), else a fresh
    one on loopback; or (``redis_cluster``) on a 3-master Redis Cluster."""

    def __init__(self, tmp_path: Path, redis_server: Any = None, *,
                 redis_cluster: bool = False) -> None:
        self.tmp_path = tmp_path
        self.redis_cluster: RedisClusterServers | None = None
        if redis_cluster:
            self.redis_server = None
            self.redis_cluster = RedisClusterServers(tmp_path)
            self.redis: Any = self.redis_cluster.client
            self.redis_url = self.redis_cluster.url
            self.redis_port = self.redis_cluster.ports[0]
        else:
            if redis_server is None:
                redis_server = RedisServer(tmp_path)
                redis_server.start()
            self.redis_server = redis_server
            self.redis = redis_server.client()
            self.redis_url = redis_server.url
            self.redis_port = getattr(redis_server, "port", None)
        self.index = ClusterIndex(self.redis, CLUSTER)
        self.nodes: dict[str, DaemonProcess] = {}

    def start(self, node_id: str, *flags: str, port: int | None = None) -> DaemonProcess:
        daemon = self._launch(node_id, ["--redis", self.redis_url, "--cluster", CLUSTER,
                                        "--node-id", node_id, "--redis-ttl", str(TTL_S),
                                        *flags], port)
        self.nodes[node_id] = daemon

        def registered() -> bool:
            assert daemon.proc is not None
            if daemon.proc.poll() is not None:
                raise RuntimeError(f"{node_id} exited {daemon.proc.returncode}: "
                                   f"{daemon.output()}")
            return bool(self.redis.exists(f"kvstore:{CLUSTER}:node:{node_id}"))

        wait_until(registered, what=f"{node_id} registered")
        return daemon

    def _launch(self, node_id: str, flags: list[str], port: int | None) -> DaemonProcess:
        """The node's process, started (it serves once it has registered)."""
        return DaemonProcess(self.tmp_path, *flags, port=port).start()

    def stored(self, keys: list[bytes], namespace: str = "default",
               secret_file: Path | None = None) -> list[bytes]:
        """``keys`` as the pool stores them for ``namespace`` (what its index holds), with
        the pool's secret (from ``secret_file``, else the one the nodes keep in Redis)."""
        secret = (secret_file.read_bytes() if secret_file is not None
                  else self.redis.get(f"kvstore:{CLUSTER}:secret"))
        scope = namespace_secret(namespace, scope_key_of(secret))
        return [scoped_key(scope, k) for k in keys]

    def wait_published(self, node_id: str, keys: list[bytes], **scoping: object) -> None:
        """Until the index says ``node_id`` holds every one of ``keys`` (a client's keys,
        scoped as `stored`)."""
        stored = set(self.stored(keys, **scoping))  # type: ignore[arg-type]
        wait_until(lambda: stored <= set(self.index.holdings(node_id)),
                   what=f"{node_id} published {len(keys)} blocks")

    def wait_peers(self, node_id: str, peers: set[str], client: object) -> None:
        """Until ``node_id`` (through ``client``, an admin's) sees exactly ``peers``."""
        wait_until(lambda: set(client.stats()["cluster"]["peers"]) == peers,  # type: ignore[attr-defined]
                   what=f"{node_id} sees peers {sorted(peers)}")

    def close(self) -> None:
        for daemon in self.nodes.values():
            daemon.stop()
        if self.redis_cluster is not None:
            self.redis_cluster.kill()
        else:
            assert self.redis_server is not None
            self.redis.close()
            self.redis_server.kill()


class NetPool(Pool):
    """A `Pool` across hosts of ``network`` (`tests.cluster.netns`): each node on a host
    of its own, named as the node, listening on its address there; Redis in the hub."""

    def __init__(self, tmp_path: Path, network: Network) -> None:
        self.network = network
        super().__init__(tmp_path, HubRedis(network).start())

    def host(self, node_id: str) -> Host:
        return self.network.hosts[node_id]

    def _launch(self, node_id: str, flags: list[str], port: int | None) -> DaemonProcess:
        host = self.network.hosts.get(node_id) or self.network.add_host(node_id)
        return DaemonProcess(self.tmp_path, *flags, port=port or NODE_PORT, host=host.ip,
                             netns=host.netns).launch()


def wait_until(predicate: Callable[[], object], *, what: str, timeout_s: float = 15.0
               ) -> float:
    """Poll ``predicate`` until it is true; the seconds it took."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"timed out after {timeout_s} s waiting for: {what}")
        time.sleep(0.02)
    return time.monotonic() - started


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[Pool]:
    made = Pool(tmp_path)
    try:
        yield made
    finally:
        made.close()

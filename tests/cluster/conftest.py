"""A pool for a test: a real redis-server and real `kvstored` processes on free ports,
all in one cluster."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from kvstore.cluster.index import ClusterIndex
from kvstore.cluster.peers import scope_key_of
from kvstore.keys import namespace_secret, scoped_key
from tests.daemon.conftest import DaemonProcess
from tests.daemon.test_registry import RedisServer

CLUSTER = "test"
TTL_S = 2.0


class Pool:
    """Nodes n0, n1, ... of cluster `CLUSTER` on one redis-server."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.redis_server = RedisServer(tmp_path)
        self.redis_server.start()
        self.redis = redis.Redis(port=self.redis_server.port)
        self.index = ClusterIndex(self.redis, CLUSTER)
        self.nodes: dict[str, DaemonProcess] = {}

    def start(self, node_id: str, *flags: str, port: int | None = None) -> DaemonProcess:
        daemon = DaemonProcess(
            self.tmp_path, "--redis", self.redis_server.url, "--cluster", CLUSTER,
            "--node-id", node_id, "--redis-ttl", str(TTL_S), *flags, port=port).start()
        self.nodes[node_id] = daemon
        wait_until(lambda: self.redis.exists(f"kvstore:{CLUSTER}:node:{node_id}"),
                   what=f"{node_id} registered")
        return daemon

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
        self.redis.close()
        self.redis_server.kill()


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

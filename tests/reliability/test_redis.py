"""Redis down and back under a serving daemon: the store never depends on it. Reads and
writes go on exactly while Redis is gone, and the node registers again once it is back."""

from __future__ import annotations

import shutil
import time

import pytest
import redis

import kvstore
from tests.daemon.test_registry import RedisServer
from tests.reliability.harness import KiB, Verdicts, key_of, value_of

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None,
                                reason="needs redis-server on PATH")


def _registered(server: RedisServer, node_id: str) -> bool:
    client = redis.Redis(port=server.port, socket_connect_timeout=0.5)
    try:
        return client.exists(f"kvstore:default:node:{node_id}") == 1
    except redis.ConnectionError:
        return False
    finally:
        client.close()


def _wait(predicate, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "not within the time"
        time.sleep(0.05)


def test_redis_down_and_back_costs_nothing(tmp_path, start_daemon):
    server = RedisServer(tmp_path)
    server.start()
    try:
        daemon = start_daemon("--dram", "16MiB", "--redis", server.url, "--node-id",
                              "reliability-node")
        _wait(lambda: _registered(server, "reliability-node"), 10)
        verdicts = Verdicts()
        with kvstore.connect(daemon.url) as client:
            for phase, (first, last) in enumerate(((0, 40), (40, 80), (80, 120))):
                if phase == 1:
                    server.kill()  # Redis gone: the daemon keeps serving
                if phase == 2:
                    server.start()  # back, empty (no persistence): the node registers again
                    _wait(lambda: _registered(server, "reliability-node"), 15)
                for i in range(first, last):
                    assert client.put(key_of(i), value_of(i, 1, 20 * KiB))
                for i, got in enumerate(client.get_many([key_of(i) for i in range(last)])):
                    verdicts.judge(i, got, {1}, 1)
        assert verdicts.bad == 0 and verdicts.checked == 40 + 80 + 120, verdicts.examples
        assert daemon.proc.poll() is None
    finally:
        server.kill()

"""The Redis node registry against a real `redis-server` started on a free port per test.

Each test gets its own server (no persistence, killed at teardown); the shared 6379 instance
is never touched. Coroutines run under `asyncio.run` (no pytest-asyncio).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
import redis.asyncio as aioredis

from daemon.registry import (
    Backoff,
    NodeInfo,
    NodeRegistry,
    RegistryUnavailableError,
    default_node_id,
)
from kvstore.errors import ConfigError

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None,
                                reason="needs redis-server on PATH")

T = TypeVar("T")
LOGGER = "daemon.registry"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """One throwaway redis-server that a test can kill and restart on the same port."""

    def __init__(self, workdir: Path) -> None:
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._workdir = workdir
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert self._proc is None, "already running"
        self._proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self._workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.02)
            finally:
                client.close()

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)

    def kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(timeout=10)
            self._proc = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()


def run(coro: Awaitable[T], timeout_s: float = 20.0) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


async def wait_until(predicate: Callable[[], bool], timeout_s: float) -> float:
    """Poll until ``predicate()``; returns the seconds it took, fails the test on timeout."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout_s:
            pytest.fail(f"condition not met within {timeout_s} s")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


async def next_event(pubsub: aioredis.client.PubSub, timeout_s: float = 2.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
        if message is not None:
            return json.loads(message["data"])
    pytest.fail("no event published")


def make_node(port: int = 7400) -> NodeInfo:
    return NodeInfo(node_id=f"test-host:{port}",
                    addresses={"control": f"127.0.0.1:{port}", "metrics": "127.0.0.1:9400"},
                    tiers={"dram": 8 << 30, "nvme": 100 << 30}, started_at=time.time())


def records(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and r.levelno == level]


# -- registration --------------------------------------------------------------------------------


def test_start_registers_an_entry_with_fields_ttl_and_membership(redis_server):
    node = make_node()

    async def main() -> None:
        registry = NodeRegistry(redis_server.url, node, ttl_s=10.0, key_prefix="kvs-test",
                                status=lambda: {"dram_used_bytes": 123})
        check = aioredis.Redis.from_url(redis_server.url)
        try:
            await registry.start()
            assert registry.is_registered
            key = f"kvs-test:node:{node.node_id}"
            assert registry.node_key == key
            entry = json.loads(await check.get(key))
            assert entry == {"v": 1, "node_id": node.node_id, "addresses": node.addresses,
                             "tiers": node.tiers, "started_at": node.started_at,
                             "updated_at": entry["updated_at"],
                             "status": {"dram_used_bytes": 123}}
            assert node.started_at <= entry["updated_at"] <= time.time()
            assert 9_000 < await check.pttl(key) <= 10_000
            assert await check.smembers("kvs-test:nodes") == {node.node_id.encode()}
            assert await registry.nodes() == [dataclasses.replace(
                node, updated_at=entry["updated_at"], status={"dram_used_bytes": 123})]
        finally:
            await registry.stop()
            await check.aclose()

    run(main())


def test_heartbeat_keeps_the_entry_alive_past_its_ttl(redis_server):
    node = make_node()

    async def main() -> None:
        registry = NodeRegistry(redis_server.url, node, ttl_s=1.0, interval_s=0.2)
        check = aioredis.Redis.from_url(redis_server.url)
        try:
            await registry.start()
            first = json.loads(await check.get(registry.node_key))
            await asyncio.sleep(2.5)  # 2.5 TTLs: the first write alone would have expired
            last = json.loads(await check.get(registry.node_key))
            assert last["updated_at"] - first["updated_at"] > 2.0
            assert 0 < await check.pttl(registry.node_key) <= 1_000
            assert registry.is_registered
        finally:
            await registry.stop()
            await check.aclose()

    run(main())


def test_stop_removes_the_entry_and_publishes_join_then_leave(redis_server):
    node = make_node()

    async def main() -> None:
        registry = NodeRegistry(redis_server.url, node)
        check = aioredis.Redis.from_url(redis_server.url)
        pubsub = check.pubsub()
        try:
            await pubsub.subscribe(registry.events_channel)
            await registry.start()
            join = await next_event(pubsub)
            assert (join["event"], join["node_id"]) == ("join", node.node_id)
            await registry.stop()
            leave = await next_event(pubsub)
            assert (leave["event"], leave["node_id"]) == ("leave", node.node_id)
            assert await check.exists(registry.node_key) == 0
            assert await check.smembers(registry.nodes_key) == set()
            assert not registry.is_registered
            await registry.stop()  # idempotent
            with pytest.raises(RuntimeError, match="start"):
                await registry.nodes()
        finally:
            await registry.stop()
            await pubsub.aclose()
            await check.aclose()

    run(main())


def test_nodes_lists_live_entries_and_prunes_stale_members(redis_server, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    node_a, node_b = make_node(7401), make_node(7402)

    async def main() -> None:
        reg_a = NodeRegistry(redis_server.url, node_a)
        reg_b = NodeRegistry(redis_server.url, node_b)
        check = aioredis.Redis.from_url(redis_server.url)
        try:
            await reg_a.start()
            await reg_b.start()
            await check.sadd("kvstore:nodes", "ghost:1", "garbled:2")  # ghost has no entry
            await check.set("kvstore:node:garbled:2", b"{not json", px=10_000)
            assert [n.node_id for n in await reg_a.nodes()] == [node_a.node_id, node_b.node_id]
            assert await check.smembers("kvstore:nodes") == {
                node_a.node_id.encode(), node_b.node_id.encode(), b"garbled:2"}
            assert any("garbled:2" in r.getMessage() for r in records(caplog, logging.WARNING))
            await reg_b.stop()
            assert [n.node_id for n in await reg_a.nodes()] == [node_a.node_id]
        finally:
            await reg_a.stop()
            await reg_b.stop()
            await check.aclose()

    run(main())


def test_a_failing_status_callback_does_not_stop_the_heartbeat(redis_server, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)

    def broken_status() -> dict[str, int]:
        raise RuntimeError("stats unavailable")

    async def main() -> None:
        registry = NodeRegistry(redis_server.url, make_node(), ttl_s=1.0, interval_s=0.1,
                                status=broken_status)
        try:
            await registry.start()
            await asyncio.sleep(0.5)
            [info] = await registry.nodes()
            assert info.status == {}
            assert registry.is_registered
        finally:
            await registry.stop()

    run(main())
    assert len(records(caplog, logging.WARNING)) == 1


# -- Redis outages ---------------------------------------------------------------------------


def test_redis_restart_logs_one_warning_and_re_registers(redis_server, caplog):
    caplog.set_level(logging.DEBUG, logger=LOGGER)

    async def main() -> None:
        registry = NodeRegistry(redis_server.url, make_node(), ttl_s=1.0, interval_s=0.2)
        try:
            await registry.start()
            assert registry.is_registered
            redis_server.kill()
            await wait_until(lambda: not registry.is_registered, timeout_s=2.0)
            await asyncio.sleep(1.5)  # several retries while Redis is down
            assert len(records(caplog, logging.DEBUG)) >= 2, "expected repeated retries"
            assert len(records(caplog, logging.WARNING)) == 1
            redis_server.start()  # same port, empty: no persistence
            await wait_until(lambda: registry.is_registered, timeout_s=4.0)
            await asyncio.sleep(0.5)  # a few more heartbeats: the entry stays, no more logs
            check = aioredis.Redis.from_url(redis_server.url)
            try:
                assert await check.exists(registry.node_key) == 1
                assert await check.sismember(registry.nodes_key, registry.node_id)
            finally:
                await check.aclose()
        finally:
            await registry.stop()

    run(main())
    assert len(records(caplog, logging.WARNING)) == 1
    back = [r for r in records(caplog, logging.INFO) if "is back" in r.getMessage()]
    assert len(back) == 1


def test_start_with_redis_down_returns_and_registers_when_redis_comes_up(redis_server, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    redis_server.kill()

    async def main() -> None:
        registry = NodeRegistry(redis_server.url, make_node(), ttl_s=1.0, interval_s=0.2)
        try:
            started = time.monotonic()
            await registry.start()
            assert time.monotonic() - started < 1.0
            assert not registry.is_registered
            with pytest.raises(RegistryUnavailableError):
                await registry.nodes()
            await asyncio.sleep(0.5)
            redis_server.start()
            await wait_until(lambda: registry.is_registered, timeout_s=4.0)
            assert [n.node_id for n in await registry.nodes()] == [registry.node_id]
        finally:
            await registry.stop()

    run(main())
    assert len(records(caplog, logging.WARNING)) == 1


def test_stop_with_redis_down_returns_quickly(redis_server):
    async def main() -> None:
        registry = NodeRegistry(redis_server.url, make_node(), ttl_s=1.0, interval_s=0.2)
        await registry.start()
        redis_server.kill()
        started = time.monotonic()
        await registry.stop()
        assert time.monotonic() - started < 1.0
        assert not registry.is_registered

    run(main())


def test_a_redis_that_never_answers_cannot_stall_start_or_stop(caplog):
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    with socket.socket() as silent:  # accepts connections (kernel backlog), never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"

        async def main() -> None:
            registry = NodeRegistry(url, make_node(), ttl_s=1.0, interval_s=0.2, timeout_s=0.2)
            started = time.monotonic()
            await registry.start()
            assert time.monotonic() - started < 0.6
            assert not registry.is_registered
            await asyncio.sleep(0.8)
            started = time.monotonic()
            await registry.stop()
            assert time.monotonic() - started < 0.6

        run(main())
    [warning] = records(caplog, logging.WARNING)
    assert "no answer from Redis within 0.2 s" in warning.getMessage()
    assert len(records(caplog, logging.DEBUG)) >= 1


# -- construction and helpers ------------------------------------------------------------------


@pytest.mark.parametrize("url", ["", "localhost:6379", "http://localhost:6379",
                                 "redis://localhost:notaport", "redis://localhost:99999",
                                 "redis://", "redis://localhost:0"])
def test_a_malformed_url_raises_config_error(url):
    with pytest.raises(ConfigError, match="Redis URL"):
        NodeRegistry(url, make_node())


def test_the_url_error_does_not_echo_the_password():
    with pytest.raises(ValueError) as info:
        NodeRegistry("redis://:hunter2@localhost:port", make_node())
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize("kwargs", [{"ttl_s": 0}, {"ttl_s": 1.0, "interval_s": 1.0},
                                    {"interval_s": -1.0}, {"key_prefix": ""},
                                    {"timeout_s": 0}])
def test_bad_timing_or_prefix_raises(kwargs):
    with pytest.raises(ConfigError):
        NodeRegistry("redis://localhost:6379", make_node(), **kwargs)


def test_default_node_id_is_hostname_and_port():
    hostname = socket.gethostname()
    assert default_node_id("127.0.0.1:7400") == f"{hostname}:7400"
    assert default_node_id("[::1]:7400") == default_node_id("0.0.0.0:7400")
    assert default_node_id("127.0.0.1:7400") != default_node_id("127.0.0.1:7401")
    for bad in ("7400", "host:", "host:http", ":7400", "host:70000"):
        with pytest.raises(ConfigError, match="HOST:PORT"):
            default_node_id(bad)


def test_node_info_round_trips_through_json_and_rejects_garbage():
    node = dataclasses.replace(make_node(), updated_at=time.time(), status={"dram_used_bytes": 5})
    assert NodeInfo.from_json(node.to_json()) == node
    newer = json.loads(node.to_json()) | {"v": 2, "future_field": [1, 2]}
    assert NodeInfo.from_json(json.dumps(newer)) == node
    for raw in (b"\xff", "[]", "{}", json.dumps({"v": 1, "node_id": "x"}),
                json.dumps(json.loads(node.to_json()) | {"v": 0}),
                json.dumps(json.loads(node.to_json()) | {"tiers": {"dram": -1}})):
        with pytest.raises(ValueError):
            NodeInfo.from_json(raw)
    with pytest.raises(ValueError, match="node_id"):
        NodeInfo(node_id="has space", addresses={}, tiers={}, started_at=0.0)


def test_backoff_grows_with_jitter_up_to_its_cap():
    backoff, rng = Backoff(base_s=0.1, cap_s=2.0), random.Random(0)
    for num_failures in range(1, 40):
        step_s = min(2.0, 0.1 * 2 ** (num_failures - 1))
        delays = [backoff.delay_s(num_failures, rng) for _ in range(50)]
        assert all(step_s / 2 <= d <= step_s for d in delays)
        assert len(set(delays)) > 1  # jittered

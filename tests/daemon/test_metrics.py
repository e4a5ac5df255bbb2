"""DaemonMetrics and MetricsServer over real sockets, against a real kvstore.Store."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from daemon.metrics import DaemonMetrics, MetricsServer
from kvstore import Store, StoreConfig
from kvstore.config import MiB
from tests.conftest import make_key, make_value

T = TypeVar("T")
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _run(fn: Callable[[MetricsServer], Awaitable[T]], metrics: DaemonMetrics,
         **kwargs: Any) -> T:
    """Start a MetricsServer on a free port, run ``fn(server)``, stop it."""
    async def main() -> T:
        async with MetricsServer(metrics, "127.0.0.1", 0, **kwargs) as server:
            return await asyncio.wait_for(fn(server), 5.0)
    return asyncio.run(main())


async def _http(server: MetricsServer, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``raw`` over a fresh TCP connection; read the whole reply until close."""
    reader, writer = await asyncio.open_connection(*server.address)
    try:
        writer.write(raw)
        await writer.drain()
        reply = await asyncio.wait_for(reader.read(), 5.0)
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = reply.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("ascii").split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (h.split(":", 1) for h in header_lines)}
    assert int(headers["content-length"]) == len(body), "Content-Length must match the body"
    return int(status_line.split(" ")[1]), headers, body


async def _get(server: MetricsServer, path: str) -> tuple[int, dict[str, str], bytes]:
    return await _http(server, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())


def _samples(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


async def _scrape(server: MetricsServer) -> Samples:
    status, headers, body = await _get(server, "/metrics")
    assert status == 200
    assert headers["content-type"] == CONTENT_TYPE_LATEST
    assert headers["connection"] == "close"
    return _samples(body.decode())


def test_scrape_matches_store_stats_and_request_histogram() -> None:
    # 8 x 1 MiB slots, 12 puts: the store must evict, so eviction figures are not all zero.
    with Store(StoreConfig(dram_bytes=8 * MiB, max_value_bytes=1 * MiB)) as store:
        for i in range(12):
            store.put(make_key(i), make_value(i, 1 * MiB))
        assert store.get(make_key(11)) == make_value(11, 1 * MiB)
        assert store.get(make_key("absent")) is None
        assert store.delete(make_key(10))  # so used bytes differ from capacity
        metrics = DaemonMetrics(stats=store.stats)
        for seconds in (60e-6, 200e-6, 200e-6):
            metrics.observe_request("get", seconds, ok=True)
        metrics.observe_request("put", 3e-3, ok=False)

        samples = _run(_scrape, metrics)
        stats = store.stats()

    dram = stats["tiers"]["dram"]
    assert stats["evictions"] > 0 and stats["hits"] > 0
    assert 0 < dram["used_bytes"] < dram["capacity_bytes"] and dram["blocks"] > 0
    assert _value(samples, "kvstore_tier_capacity_bytes", tier="dram") == dram["capacity_bytes"]
    assert _value(samples, "kvstore_tier_used_bytes", tier="dram") == dram["used_bytes"]
    assert _value(samples, "kvstore_tier_blocks", tier="dram") == dram["blocks"]
    assert _value(samples, "kvstore_tier_hits_total", tier="dram") == dram["hits"]
    for name in ("queries", "hits", "evictions", "demotions", "promotions",
                 "checksum_failures"):
        assert _value(samples, f"kvstore_{name}_total") == stats[name], name
    assert _value(samples, "kvstore_stats_errors_total") == 0

    assert _value(samples, "kvstore_request_seconds_count", op="get") == 3
    assert _value(samples, "kvstore_request_seconds_bucket", op="get", le="5e-05") == 0
    assert _value(samples, "kvstore_request_seconds_bucket", op="get", le="0.0001") == 1
    assert _value(samples, "kvstore_request_seconds_bucket", op="get", le="0.00025") == 3
    assert _value(samples, "kvstore_request_seconds_bucket", op="get", le="10.0") == 3
    assert _value(samples, "kvstore_request_seconds_sum", op="get") == pytest.approx(460e-6)
    assert _value(samples, "kvstore_request_seconds_count", op="put") == 1
    assert _value(samples, "kvstore_requests_total", op="get", status="ok") == 3
    assert _value(samples, "kvstore_requests_total", op="put", status="error") == 1
    assert ("kvstore_requests_total", frozenset({("op", "get"), ("status", "error")})) \
        not in samples


def test_request_path_counters_and_gauge() -> None:
    metrics = DaemonMetrics()  # no stats callable: store figures are simply absent
    metrics.client_connected()
    metrics.client_connected()
    metrics.client_connected()
    metrics.client_disconnected()
    metrics.error("bad_frame")
    metrics.error("bad_frame")
    metrics.error("timeout")
    metrics.record_transfer("in", 4096)
    metrics.record_transfer("in", 1000)
    metrics.record_transfer("out", 7)
    metrics.record_prefix("local", query_tokens=64, hit_tokens=48)
    metrics.record_prefix("local", query_tokens=16, hit_tokens=0)
    metrics.record_prefix("peer", query_tokens=32, hit_tokens=32)
    with pytest.raises(ValueError, match="hit_tokens"):
        metrics.record_prefix("local", query_tokens=4, hit_tokens=5)
    with pytest.raises(ValueError, match="nbytes"):
        metrics.record_transfer("out", -1)

    samples = _run(_scrape, metrics)

    assert _value(samples, "kvstore_connected_clients") == 2
    assert _value(samples, "kvstore_errors_total", code="bad_frame") == 2
    assert _value(samples, "kvstore_errors_total", code="timeout") == 1
    assert _value(samples, "kvstore_transfer_bytes_total", direction="in") == 5096
    assert _value(samples, "kvstore_transfer_bytes_total", direction="out") == 7
    assert _value(samples, "kvstore_prefix_query_tokens_total", source="local") == 80
    assert _value(samples, "kvstore_prefix_hit_tokens_total", source="local") == 48
    assert _value(samples, "kvstore_prefix_query_tokens_total", source="peer") == 32
    assert _value(samples, "kvstore_prefix_hit_tokens_total", source="peer") == 32
    assert not any(name.startswith("kvstore_tier_") for name, _ in samples)


def test_failing_stats_still_scrapes_and_counts() -> None:
    calls = 0

    def broken_stats() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        if calls == 2:
            return {"tiers": {"dram": {}}}  # malformed: missing keys
        raise RuntimeError("store is gone")

    metrics = DaemonMetrics(stats=broken_stats)
    metrics.observe_request("get", 1e-3, ok=True)

    async def scrape_three(server: MetricsServer) -> list[Samples]:
        return [await _scrape(server) for _ in range(3)]

    scrapes = _run(scrape_three, metrics)

    assert [_value(s, "kvstore_stats_errors_total") for s in scrapes] == [1, 2, 3]
    assert metrics.num_stats_errors == 3
    for samples in scrapes:
        assert _value(samples, "kvstore_request_seconds_count", op="get") == 1
        assert not any(name.startswith(("kvstore_tier_", "kvstore_evictions"))
                       for name, _ in samples)


def test_healthz_ok_unhealthy_and_raising() -> None:
    state: dict[str, Any] = {"healthy": True}

    def health() -> tuple[bool, dict[str, Any]]:
        if state.get("raise"):
            raise RuntimeError("probe exploded")
        return state["healthy"], {"store": "open", "clients": 3}

    async def probe(server: MetricsServer) -> list[tuple[int, dict[str, str], bytes]]:
        replies = [await _get(server, "/healthz")]
        state["healthy"] = False
        replies.append(await _get(server, "/healthz"))
        state["raise"] = True
        replies.append(await _get(server, "/healthz"))
        return replies

    ok, unhealthy, raising = _run(probe, DaemonMetrics(), health=health)

    assert ok[0] == 200 and ok[1]["content-type"] == "application/json"
    assert json.loads(ok[2]) == {"status": "ok", "store": "open", "clients": 3}
    assert unhealthy[0] == 503
    assert json.loads(unhealthy[2])["status"] == "unhealthy"
    assert raising[0] == 503
    body = json.loads(raising[2])
    assert body["status"] == "error" and "probe exploded" in body["error"]


def test_healthz_without_callback_is_ok() -> None:
    status, _, body = _run(lambda server: _get(server, "/healthz"), DaemonMetrics())
    assert status == 200 and json.loads(body) == {"status": "ok"}


def test_http_errors() -> None:
    async def requests(server: MetricsServer) -> dict[str, int]:
        cases = {
            "not_found": b"GET /nope HTTP/1.1\r\n\r\n",
            "post": b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
            "delete": b"DELETE /healthz HTTP/1.1\r\n\r\n",
            "garbage": b"\x00\xffnot http at all\r\n\r\n",
            "no_version": b"GET /metrics\r\n\r\n",
            "relative_target": b"GET metrics HTTP/1.1\r\n\r\n",
            "head_too_long": b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20_000 + b"\r\n\r\n",
            "closed_early": b"GET /metrics HTTP/1.1\r\n",  # then EOF: no blank line
            "query_string": b"GET /metrics?name[]=x HTTP/1.0\r\n\r\n",
        }
        results = {}
        for name, raw in cases.items():
            if name == "closed_early":
                reader, writer = await asyncio.open_connection(*server.address)
                writer.write(raw)
                writer.write_eof()
                reply = await asyncio.wait_for(reader.read(), 5.0)
                writer.close()
                results[name] = int(reply.split(b" ")[1])
            else:
                status, headers, _ = await _http(server, raw)
                results[name] = status
                if status == 405:
                    assert headers["allow"] == "GET"
        return results

    results = _run(requests, DaemonMetrics())

    assert results == {
        "not_found": 404, "post": 405, "delete": 405, "garbage": 400, "no_version": 400,
        "relative_target": 400, "head_too_long": 400, "closed_early": 400,
        "query_string": 200,
    }


def test_silent_client_times_out_and_server_keeps_serving() -> None:
    async def slow_then_fast(server: MetricsServer) -> tuple[bytes, int]:
        reader, writer = await asyncio.open_connection(*server.address)
        writer.write(b"GET /metrics HTTP/1.1\r\n")  # and never finishes the head
        # Meanwhile another client is served: the silent one does not block the loop.
        status, _, _ = await _get(server, "/healthz")
        reply = await asyncio.wait_for(reader.read(), 5.0)
        writer.close()
        return reply, status

    reply, status = _run(slow_then_fast, DaemonMetrics(), timeout_s=0.2)
    assert status == 200
    assert reply.startswith(b"HTTP/1.1 408 ")


def test_urllib_client_and_lifecycle() -> None:
    metrics = DaemonMetrics()
    metrics.observe_request("contains", 1e-4, ok=True)

    def fetch(url: str) -> tuple[int, str, str]:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()

    async def main() -> None:
        server = MetricsServer(metrics, "127.0.0.1", 0)
        with pytest.raises(RuntimeError, match="start"):
            _ = server.address
        await server.start()
        host, port = server.address
        assert port != 0
        status, content_type, text = await asyncio.to_thread(
            fetch, f"http://{host}:{port}/metrics")
        assert status == 200 and content_type == CONTENT_TYPE_LATEST
        assert _value(_samples(text), "kvstore_requests_total", op="contains", status="ok") == 1
        # A connection left open is dropped by stop(), which is idempotent.
        _, idle_writer = await asyncio.open_connection(host, port)
        await asyncio.wait_for(server.stop(), 5.0)
        await server.stop()
        idle_writer.close()
        with pytest.raises(OSError):
            await asyncio.open_connection(host, port)

    asyncio.run(main())


def test_registries_are_independent() -> None:
    # Two daemons in one process: same metric names, separate registries, separate values.
    a, b = DaemonMetrics(), DaemonMetrics()
    a.error("timeout")
    a_samples, b_samples = _samples(a.render().decode()), _samples(b.render().decode())
    assert _value(a_samples, "kvstore_errors_total", code="timeout") == 1
    assert ("kvstore_errors_total", frozenset({("code", "timeout")})) not in b_samples

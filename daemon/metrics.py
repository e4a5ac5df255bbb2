"""The daemon's Prometheus metrics and its ``/metrics`` + ``/healthz`` HTTP endpoint.

Two kinds of figures, gathered two ways:

- Request-path figures (latency, request and error counts, transfer bytes, connected
  clients, prefix tokens) are pushed by the server as they happen, through the cheap
  methods of `DaemonMetrics`. They live in ordinary prometheus_client metrics.
- Store figures (per-tier bytes, blocks, hits; store-wide queries, hits, evictions, ...)
  are pulled at scrape time from a ``stats`` callable returning `kvstore.Store.stats()`'s
  dict, by `_StoreCollector`. Nothing is copied between scrapes, so they are never stale.

Invariants:

- Every `DaemonMetrics` owns its own `CollectorRegistry`, never prometheus_client's global
  one: several daemons (or tests) in one process do not clash.
- A scrape never fails because of the store: if ``stats()`` raises or returns something
  malformed, the scrape still carries every request-path metric, the store figures are left
  out, and ``kvstore_stats_errors_total`` counts the failure.
- Label values must come from small fixed sets (op names, error codes, directions,
  sources) chosen by the daemon, never from client input, or the series count is unbounded.
- `MetricsServer` speaks just enough HTTP/1.1 for Prometheus and health probes: one GET
  per connection, ``Connection: close``, every read and write bounded by a timeout, request
  heads capped at ``_MAX_HEAD_BYTES``. It runs on the daemon's event loop; a scrape calls
  ``stats()`` there too (it takes the store's lock for a few microseconds).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

logger = logging.getLogger(__name__)

StatsFn = Callable[[], Mapping[str, Any]]
HealthFn = Callable[[], tuple[bool, Mapping[str, Any]]]

# 50 us (a DRAM hit over shared memory) to 10 s (a deadline-bound NVMe scan), ~2.5x apart.
REQUEST_BUCKETS_S: tuple[float, ...] = (
    50e-6, 100e-6, 250e-6, 500e-6,
    1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3,
    1.0, 2.5, 5.0, 10.0,
)

# Store-wide counters: (name without _total, key in Store.stats(), help).
_STORE_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("kvstore_queries", "queries", "Block lookups made against the store."),
    ("kvstore_hits", "hits", "Block lookups that found the block in some tier."),
    ("kvstore_evictions", "evictions", "Blocks dropped from the store entirely."),
    ("kvstore_demotions", "demotions", "Blocks moved down to a slower tier."),
    ("kvstore_promotions", "promotions", "Blocks copied up to the write tier on a hit."),
    ("kvstore_checksum_failures", "checksum_failures",
     "NVMe reads whose checksum did not match (served as misses)."),
)


# A node of a pool (`daemon.cluster`): (name without _total, key in its stats, help).
_POOL_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("kvstore_pool_remote_hits", "remote_hits", "Blocks this node's clients read from peers."),
    ("kvstore_pool_remote_misses", "remote_misses",
     "Blocks missing here that no live peer served."),
    ("kvstore_pool_peer_failures", "peer_failures",
     "Peer calls that failed (the peer is skipped for a while)."),
    ("kvstore_pool_spilled", "spilled", "Blocks this node handed to a peer with room."),
    ("kvstore_pool_spill_dropped", "spill_dropped",
     "Evicted blocks no peer had room for (dropped, as without a pool)."),
    ("kvstore_pool_received", "received", "Blocks peers handed to this node."),
)
_POOL_GAUGES: tuple[tuple[str, str, Callable[[Mapping[str, Any]], float]], ...] = (
    ("kvstore_pool_peers", "Live peers this node sees.", lambda pool: len(pool["peers"])),
    ("kvstore_pool_spill_queued", "Evicted blocks on their way to a peer.",
     lambda pool: pool["spill_queued"]),
    ("kvstore_pool_redis_up", "1 while this node reaches the pool's Redis.",
     lambda pool: 1.0 if pool["redis_ok"] else 0.0),
)


class _StoreCollector:
    """Turns one ``stats()`` call per scrape into the store's metric families."""

    def __init__(self, stats: StatsFn) -> None:
        self._stats = stats
        self._lock = threading.Lock()  # a scrape may come from a thread (tests, other servers)
        self.num_errors = 0

    def describe(self) -> Iterator[Metric]:
        # Names only, so the registry rejects a clash at register time without calling stats().
        yield from self._families(None)

    def collect(self) -> Iterator[Metric]:
        try:
            stats = self._stats()
            families = list(self._families(stats))
        except Exception:
            # Includes a closed store and a malformed dict: the scrape must still succeed.
            logger.warning("metrics: store stats() failed; scrape omits store figures",
                           exc_info=True)
            with self._lock:
                self.num_errors += 1
            families = []
        yield from families
        yield CounterMetricFamily("kvstore_stats_errors",
                                  "Scrapes whose store stats() call failed.",
                                  value=self.num_errors)

    @staticmethod
    def _families(stats: Mapping[str, Any] | None) -> Iterator[Metric]:
        capacity = GaugeMetricFamily("kvstore_tier_capacity_bytes",
                                     "Configured capacity of each tier.", labels=["tier"])
        used = GaugeMetricFamily("kvstore_tier_used_bytes",
                                 "Bytes held by blocks in each tier.", labels=["tier"])
        blocks = GaugeMetricFamily("kvstore_tier_blocks",
                                   "Blocks held in each tier.", labels=["tier"])
        tier_hits = CounterMetricFamily("kvstore_tier_hits",
                                        "Lookups served from each tier.", labels=["tier"])
        read_only = GaugeMetricFamily(
            "kvstore_tier_read_only", "1 where a disk error stopped the tier's writes (it "
            "serves what it holds until the daemon restarts).", labels=["tier"])
        read_errors = CounterMetricFamily(
            "kvstore_tier_read_errors", "Reads the disk refused (served as misses).",
            labels=["tier"])
        if stats is not None:
            for tier, figures in stats["tiers"].items():
                capacity.add_metric([tier], float(figures["capacity_bytes"]))
                used.add_metric([tier], float(figures["used_bytes"]))
                blocks.add_metric([tier], float(figures["blocks"]))
                tier_hits.add_metric([tier], float(figures["hits"]))
                if "read_only" in figures:
                    read_only.add_metric([tier], float(figures["read_only"]))
                    read_errors.add_metric([tier], float(figures["read_errors"]))
        yield from (capacity, used, blocks, tier_hits, read_only, read_errors)
        for name, key, help_text in _STORE_COUNTERS:
            value = None if stats is None else float(stats[key])
            yield CounterMetricFamily(name, help_text, value=value)
        pool = None if stats is None else stats.get("cluster")  # a node of a pool
        for name, key, help_text in _POOL_COUNTERS:
            yield CounterMetricFamily(name, help_text,
                                      value=None if pool is None else float(pool[key]))
        for name, help_text, value_of in _POOL_GAUGES:
            yield GaugeMetricFamily(name, help_text,
                                    value=None if pool is None else float(value_of(pool)))


class DaemonMetrics:
    """Every metric the daemon exports, in a registry of its own.

    The ``observe_*``/``record_*``/``client_*``/``error`` methods are called on the request
    path and cost about a dict lookup and a locked add each. ``stats`` (usually
    ``store.stats``) is called once per scrape; None leaves the store figures out.
    """

    def __init__(self, stats: StatsFn | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._store_collector: _StoreCollector | None = None
        if stats is not None:
            self._store_collector = _StoreCollector(stats)
            self.registry.register(self._store_collector)
        r = self.registry
        self._request_seconds = Histogram(
            "kvstore_request_seconds", "Time from a request's arrival to its reply, by op.",
            ["op"], buckets=REQUEST_BUCKETS_S, registry=r)
        self._requests = Counter(
            "kvstore_requests", "Requests answered, by op and status (ok or error).",
            ["op", "status"], registry=r)
        self._errors = Counter(
            "kvstore_errors", "Error replies and failures, by error code.", ["code"], registry=r)
        self._connected_clients = Gauge(
            "kvstore_connected_clients", "Client connections open now.", registry=r)
        self._transfer_bytes = Counter(
            "kvstore_transfer_bytes", "Value bytes moved to or from clients, by direction.",
            ["direction"], registry=r)
        # Token-level prefix reuse (hit_tokens / query_tokens is the useful ratio); ``source``
        # says who answered, e.g. "local" or "peer".
        self._prefix_query_tokens = Counter(
            "kvstore_prefix_query_tokens", "Prompt tokens looked up as block prefixes.",
            ["source"], registry=r)
        self._prefix_hit_tokens = Counter(
            "kvstore_prefix_hit_tokens", "Prompt tokens found as cached prefix blocks.",
            ["source"], registry=r)
        # Shared-memory leases: expired reservations keep their slots quarantined (out of
        # use) until the client commits, aborts or hangs up (daemon.shm_plane).
        self._lease_expiries = Counter(
            "kvstore_lease_expiries", "Reservations and pins held past their lease, by kind.",
            ["kind"], registry=r)
        self._quarantined_slots = Gauge(
            "kvstore_quarantined_slots",
            "DRAM slots of expired reservations kept out of use now.", registry=r)
        self._quarantined_bytes = Gauge(
            "kvstore_quarantined_bytes",
            "Bytes of DRAM slots of expired reservations kept out of use now.", registry=r)
        # Children cached per label value: labels() re-validates and locks on every call.
        self._op_children: dict[tuple[str, bool], tuple[Any, Any]] = {}

    # -- request path ---------------------------------------------------------------------

    def observe_request(self, op: str, seconds: float, ok: bool) -> None:
        """One answered request: its latency and whether it succeeded."""
        children = self._op_children.get((op, ok))
        if children is None:
            children = (self._request_seconds.labels(op),
                        self._requests.labels(op, "ok" if ok else "error"))
            self._op_children[(op, ok)] = children
        latency, count = children
        latency.observe(seconds)
        count.inc()

    def error(self, code: str) -> None:
        """One error, by its protocol error code (e.g. ``"bad_frame"``, ``"timeout"``)."""
        self._errors.labels(code).inc()

    def client_connected(self) -> None:
        self._connected_clients.inc()

    def client_disconnected(self) -> None:
        self._connected_clients.dec()

    def record_transfer(self, direction: str, nbytes: int) -> None:
        """Value bytes moved: ``direction`` is ``"in"`` (puts) or ``"out"`` (gets)."""
        if nbytes < 0:
            raise ValueError(f"record_transfer: nbytes must be >= 0, got {nbytes}")
        self._transfer_bytes.labels(direction).inc(nbytes)

    def record_prefix(self, source: str, query_tokens: int, hit_tokens: int) -> None:
        """One prefix lookup of ``query_tokens`` tokens, ``hit_tokens`` of them cached."""
        if not 0 <= hit_tokens <= query_tokens:
            raise ValueError(f"record_prefix: need 0 <= hit_tokens <= query_tokens, "
                             f"got hit_tokens={hit_tokens}, query_tokens={query_tokens}")
        self._prefix_query_tokens.labels(source).inc(query_tokens)
        self._prefix_hit_tokens.labels(source).inc(hit_tokens)

    def record_leases(self, num_expired_reservations: int, num_expired_pins: int,
                      num_quarantined_slots: int, quarantined_bytes: int) -> None:
        """Leases that just ran out, and the slots quarantined now."""
        if num_expired_reservations:
            self._lease_expiries.labels("reservation").inc(num_expired_reservations)
        if num_expired_pins:
            self._lease_expiries.labels("pin").inc(num_expired_pins)
        self._quarantined_slots.set(num_quarantined_slots)
        self._quarantined_bytes.set(quarantined_bytes)

    # -- scrape ---------------------------------------------------------------------------

    @property
    def num_stats_errors(self) -> int:
        """How many scrapes found ``stats()`` failing (0 without a stats callable)."""
        return 0 if self._store_collector is None else self._store_collector.num_errors

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


# -- HTTP endpoint ---------------------------------------------------------------------------

_MAX_HEAD_BYTES = 8 * 1024
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 500: "Internal Server Error", 503: "Service Unavailable"}


class _BadRequest(Exception):
    pass


class MetricsServer:
    """``GET /metrics`` and ``GET /healthz`` on ``host:port`` (port 0 picks a free one).

    ``health`` returns ``(is_healthy, details)``; details (JSON-serialisable) are merged into
    the reply body. Without a callback the daemon counts as healthy while this server runs.
    """

    def __init__(self, metrics: DaemonMetrics, host: str, port: int,
                 health: HealthFn | None = None, timeout_s: float = 5.0) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"MetricsServer: port must be in 0..65535, got {port}")
        if timeout_s <= 0:
            raise ValueError(f"MetricsServer: timeout_s must be > 0, got {timeout_s}")
        self.metrics = metrics
        self.host = host
        self.port = port
        self.timeout_s = timeout_s
        self._health = health
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._address: tuple[str, int] | None = None

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) actually bound; the port is the real one when 0 was asked for."""
        if self._address is None:
            raise RuntimeError("MetricsServer.address: call start() first")
        return self._address

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("MetricsServer.start: already started")
        self._server = await asyncio.start_server(self._handle, self.host, self.port,
                                                  limit=_MAX_HEAD_BYTES)
        sockname = self._server.sockets[0].getsockname()
        self._address = (sockname[0], sockname[1])
        logger.info("metrics: serving /metrics and /healthz on http://%s:%d",
                    self._address[0], self._address[1])

    async def stop(self) -> None:
        """Stop listening and drop connections in flight. Idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.gather(*self._handlers, return_exceptions=True)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(server.wait_closed(), self.timeout_s)
        logger.info("metrics: stopped")

    async def __aenter__(self) -> MetricsServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- one connection -------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None, "stream handlers run as tasks"
        if self._server is None:  # accepted just before stop(): not worth serving
            writer.close()
            return
        self._handlers.add(task)
        try:
            status, content_type, body = await self._respond(reader)
            await self._write(writer, status, content_type, body)
        except asyncio.CancelledError:
            raise
        except (TimeoutError, ConnectionError) as e:
            logger.debug("metrics: connection dropped: %r", e)
        except Exception:
            logger.exception("metrics: unexpected error serving a request")
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), self.timeout_s)

    async def _respond(self, reader: asyncio.StreamReader) -> tuple[int, str, bytes]:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.timeout_s)
            method, path = _parse_head(head)
        except TimeoutError:
            return _text(408, "request head not received in time\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, _BadRequest):
            return _text(400, "bad request\n")
        if method != "GET":
            return _text(405, "only GET is served\n")
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, self.metrics.render()
        if path == "/healthz":
            return self._healthz()
        return _text(404, "not found: try /metrics or /healthz\n")

    def _healthz(self) -> tuple[int, str, bytes]:
        try:
            is_healthy, details = (True, {}) if self._health is None else self._health()
            body: dict[str, Any] = {"status": "ok" if is_healthy else "unhealthy", **details}
        except Exception as e:
            logger.warning("metrics: health callback failed", exc_info=True)
            is_healthy, body = False, {"status": "error", "error": repr(e)}
        payload = json.dumps(body, default=str).encode() + b"\n"
        return 200 if is_healthy else 503, "application/json", payload

    async def _write(self, writer: asyncio.StreamWriter, status: int, content_type: str,
                     body: bytes) -> None:
        head = (f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
                f"Content-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n"
                + ("Allow: GET\r\n" if status == 405 else "")
                + "Connection: close\r\n\r\n").encode("ascii")
        writer.write(head + body)
        await asyncio.wait_for(writer.drain(), self.timeout_s)


def _text(status: int, message: str) -> tuple[int, str, bytes]:
    return status, "text/plain; charset=utf-8", message.encode()


def _parse_head(head: bytes) -> tuple[str, str]:
    """(method, path without query) from a request head, or `_BadRequest`."""
    try:
        request_line = head.split(b"\r\n", 1)[0].decode("ascii")
    except UnicodeDecodeError as e:
        raise _BadRequest("request line is not ASCII") from e
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[0].isupper():
        raise _BadRequest(f"malformed request line {request_line!r}")
    method, target, version = parts
    if not version.startswith("HTTP/1.") or not target.startswith("/"):
        raise _BadRequest(f"malformed request line {request_line!r}")
    return method, target.split("?", 1)[0]

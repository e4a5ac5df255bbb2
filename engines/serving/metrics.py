"""`kvstore serve`'s Prometheus metrics (``GET /metrics``), in a registry of its own.

    kvstore_serve_time_to_first_token_seconds   histogram  request arrival -> first token
    kvstore_serve_inter_token_seconds           histogram  between a request's tokens
    kvstore_serve_requests_total{route,finish_reason}      counter  requests finished
    kvstore_serve_prompt_tokens_total{source}   counter    prompt tokens computed / fetched
                                                           from the KV store
    kvstore_serve_requests_running              gauge      requests accepted, not finished
    kvstore_serve_requests_cancelled_total      counter    requests whose client went away
    kvstore_serve_engine_requests{engine,state} gauge      each decode engine's waiting and
                                                           running requests (read at scrape)
    kvstore_serve_prefill_queued_seconds{engine} gauge     each prefill engine's queued work
    kvstore_serve_engine_up{engine}             gauge      1 while an engine runs, 0 while it
                                                           restarts after its process died
    kvstore_serve_engine_restarts_total{engine} counter    engine processes started again

Times are measured where the HTTP layer sees the tokens, so they include routing, queues
and the hand-over between engines.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ServingMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("kvstore_serve_time_to_first_token_seconds",
                              "Request arrival to its first token", buckets=TTFT_BUCKETS,
                              registry=r)
        self.itl = Histogram("kvstore_serve_inter_token_seconds",
                             "Time between a request's consecutive tokens",
                             buckets=ITL_BUCKETS, registry=r)
        self.requests = Counter("kvstore_serve_requests", "Requests finished",
                                ["route", "finish_reason"], registry=r)
        self.prompt_tokens = Counter("kvstore_serve_prompt_tokens",
                                     "Prompt tokens, by where their KV came from",
                                     ["source"], registry=r)
        self.running = Gauge("kvstore_serve_requests_running",
                             "Requests accepted and not finished", registry=r)
        self.cancellations = Counter("kvstore_serve_requests_cancelled",
                                     "Requests whose client went away before the end",
                                     registry=r)

    def watch(self, conductor: Any) -> None:
        """Report ``conductor``'s engines' queues at each scrape."""
        self.registry.register(_EngineQueues(conductor))

    def started(self) -> None:
        self.running.inc()

    def finished(self) -> None:
        self.running.dec()

    def cancelled(self) -> None:
        self.cancellations.inc()

    def request_done(self, *, route: str, finish_reason: str, ttft_s: float,
                     inter_token_s: Sequence[float], prompt_tokens: int,
                     fetched_tokens: int) -> None:
        self.requests.labels(route, finish_reason).inc()
        if not math.isnan(ttft_s):
            self.ttft.observe(ttft_s)
        for gap in inter_token_s:
            self.itl.observe(gap)
        self.prompt_tokens.labels("fetched").inc(fetched_tokens)
        self.prompt_tokens.labels("computed").inc(prompt_tokens - fetched_tokens)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _EngineQueues:
    """A collector reading the engines' queue figures when scraped."""

    def __init__(self, conductor: Any) -> None:
        self.conductor = conductor

    def collect(self) -> Any:
        engines = GaugeMetricFamily("kvstore_serve_engine_requests",
                                    "A decode engine's requests, by state",
                                    labels=["engine", "state"])
        for worker in self.conductor.decode:
            running = worker.num_running
            engines.add_metric([worker.name, "running"], running)
            engines.add_metric([worker.name, "waiting"], max(worker.num_active - running, 0))
        yield engines
        queued = GaugeMetricFamily("kvstore_serve_prefill_queued_seconds",
                                   "A prefill engine's queued work, estimated",
                                   labels=["engine"])
        for worker in self.conductor.prefill:
            queued.add_metric([worker.name], worker.queued_s)
        yield queued
        up = GaugeMetricFamily("kvstore_serve_engine_up", "Whether an engine runs (0: its "
                               "process died and a new one is starting)", labels=["engine"])
        restarts = CounterMetricFamily("kvstore_serve_engine_restarts",
                                       "Engine processes started again after one died",
                                       labels=["engine"])
        for worker in [*self.conductor.prefill, *self.conductor.decode]:
            up.add_metric([worker.name], 1 if worker.is_healthy else 0)
            restarts.add_metric([worker.name], getattr(worker, "restarts", 0))
        yield up
        yield restarts

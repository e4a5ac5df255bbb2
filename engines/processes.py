"""Engines in processes of their own, as `kvstore serve` runs them.

Each engine is a child process (multiprocessing's spawn: a fresh interpreter, no torch
state forked from the server) holding its own copy of the model and a client of the
store the engines share (a `kvstored`: the server's embedded one, or ``--url``). The child
(`engines.engine_child`) runs the engine on a thread worker (`engines.workers`), as the server would
in-process; the parent's `EngineProcess` drives it over a pipe and offers the conductor
what a thread worker offers (submit, cancel, load figures, health), and an `EngineView`
of the engine for routing (its block keys and store; `engines.kv_io.BlockKeys`). The
engine that measures the cost model measures each tier of the store too, where its client
tells tiers (`engines.cost_model.planner_for`: a fetch planner); the others plan with its
costs (`EngineSpec.planner_costs`).

    conductor ──submit/cancel──> EngineProcess ──pipe──> child: worker thread + engine
              <──futures, on_token── reader thread <──tokens, results, load──┘

**A child that dies** (killed, crashed, out of memory, or its engine's step failed) is
seen at once: its pipe ends. Every request it had fails with `EngineDiedError` (its
client gets an error, never a hang), the worker reports unhealthy while a new child
starts (the conductor routes around it; `/health` answers 503), and it is healthy again
once the new child is ready. A child whose parent died exits too (its pipe ends).

Messages, parent -> child: ``("submit", job, prompt, sampling, first_token, request_id)``,
``("cancel", request_id)``, ``None`` (stop). Child -> parent: ``("ready", info)`` or
``("fatal", message)`` once; then ``("token", job, token, running, free_pages)``,
``("done", job, fields, running, free_pages)``, ``("error", job, exception)``.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any

from engines.cost_model import CostModel, planner_of
from engines.decode import DecodeRequest, FinishReason, TokenCallback
from engines.engine_child import EngineSpec, child_main
from engines.kv_io import BlockKeys
from engines.prefill import PrefillResult
from engines.sampling import SamplingParams
from kvstore.errors import KVStoreError

log = logging.getLogger(__name__)

START_TIMEOUT_S = 600.0  # a child's model load (and, for one, the cost model's measuring)
STOP_TIMEOUT_S = 30.0
RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)  # between failed restarts


class EngineDiedError(KVStoreError):
    """The engine process a request ran on died; a new one is starting."""


class EngineStartError(KVStoreError):
    """An engine process could not start (its model, its store): the child's own words."""


class _Pages:
    def __init__(self, num_pages: int, page_tokens: int) -> None:
        self.num_pages = num_pages
        self.page_tokens = page_tokens

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_tokens)


class EngineView:
    """What the conductor reads of an engine in another process: its block size, its
    store's view of its blocks (``io``: the parent's own client of the shared store, in
    the child engine's namespace), its page count, and a planner with the child's fetch
    planner's costs as the child started with them (for the conductor's estimates; the
    child's own learns from its loads)."""

    def __init__(self, info: dict[str, Any], store: Any) -> None:
        self.block_tokens = int(info["block_tokens"])
        self.io = BlockKeys(store, info["namespace"], self.block_tokens)
        self.cache = _Pages(int(info["num_pages"]), self.block_tokens)
        self.model_id = info["model_id"]
        costs = info.get("planner")
        self.planner = None if costs is None else planner_of(costs, self.block_tokens)

    def pages_needed(self, num_prompt_tokens: int, sampling: SamplingParams) -> int:
        return self.cache.pages_for(num_prompt_tokens + sampling.max_new_tokens + 1)


@dataclass
class _Job:
    future: Future[Any]
    request: DecodeRequest | None  # decode: what the future resolves to, kept up to date
    estimate_s: float = 0.0  # prefill: its share of queued_s


class EngineProcess:
    """One engine in a child process, restarted when it dies (thread-safe). `start` it,
    then `wait_ready` (several can start at once); `close` at the end."""

    def __init__(self, spec: EngineSpec, name: str, store: Any) -> None:
        """``store``: this process's client of the shared store (routing questions)."""
        if spec.role not in ("prefill", "decode"):
            raise ValueError(f"an engine's role is prefill or decode, got {spec.role!r}")
        self.spec = spec
        self.name = name
        self.store = store
        self.engine: EngineView | None = None
        self.cost: CostModel | None = None  # measured by the child, if it was asked to
        self.planner_costs: dict[str, Any] | None = spec.planner_costs  # what it plans with
        self.restarts = 0
        self._context = multiprocessing.get_context("spawn")
        self._process: Any = None
        self._conn: Any = None
        self._lock = threading.Lock()  # jobs, load figures, health
        self._send_lock = threading.Lock()
        self._jobs: dict[int, _Job] = {}
        self._job_ids = itertools.count()
        self._num_running = 0
        self._num_free_pages = 0
        self._queued_s = 0.0
        self._healthy = False
        self._closing = threading.Event()
        self._reader: threading.Thread | None = None

    # -- the child's life ------------------------------------------------------------------

    def start(self) -> None:
        """Start the child (it loads its model meanwhile: `wait_ready`)."""
        parent, child = self._context.Pipe(duplex=True)
        process = self._context.Process(target=child_main, args=(self.spec, child),
                                        name=f"engine-{self.name}", daemon=True)
        process.start()
        child.close()
        self._process, self._conn = process, parent

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Wait for the child's ready message; `EngineStartError` (the child's reason) if
        it fails, dies or takes past ``timeout_s``."""
        info = self._await_ready(timeout_s)
        self.engine = EngineView(info, self.store)
        if info.get("cost") is not None:
            self.cost = CostModel(**info["cost"])
        self.planner_costs = info.get("planner")
        with self._lock:
            self._num_free_pages = self.engine.cache.num_pages
            self._healthy = True
        if self._reader is None:
            self._reader = threading.Thread(target=self._read, name=f"engine-{self.name}",
                                            daemon=True)
            self._reader.start()
        log.info("engine %s (%s) ready in process %d", self.name, self.spec.role,
                 self._process.pid)

    def _await_ready(self, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            if self._closing.is_set():  # (a restart that close() overtook)
                self._end_child()
                raise EngineStartError(f"engine {self.name} was stopped while starting")
            try:
                if self._conn.poll(0.2):
                    message = self._conn.recv()
                    if message[0] == "ready":
                        return dict(message[1])
                    self._end_child()
                    raise EngineStartError(f"engine {self.name}: {message[1]}")
            except (EOFError, OSError):
                pass  # it died: said below
            if not self._process.is_alive():
                self._end_child()
                raise EngineStartError(f"engine {self.name} exited while starting (exit "
                                       f"code {self._process.exitcode})")
            if time.monotonic() > deadline:
                self._end_child()
                raise EngineStartError(f"engine {self.name} did not start in {timeout_s:.0f} s")

    def _end_child(self) -> None:
        """Make sure the current child is gone and its pipe closed."""
        self._conn.close()
        self._process.join(timeout=STOP_TIMEOUT_S)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()

    def _read(self) -> None:
        """The reader thread: the child's messages, and a new child when it dies."""
        while not self._closing.is_set():
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                if self._closing.is_set():
                    return
                self._died()
                self._restart()
                continue
            try:
                self._handle(message)
            except Exception:  # (a callback's own failure must not stop the reader)
                log.exception("engine %s: handling %s failed", self.name, message[0])

    def _handle(self, message: tuple[Any, ...]) -> None:
        kind, job_id = message[0], message[1]
        if kind == "token":
            _, _, token, running, free = message
            with self._lock:
                self._num_running, self._num_free_pages = running, free
                job = self._jobs.get(job_id)
            if job is not None and job.request is not None:
                job.request.output.append(token)
                job.request.token_times_s.append(time.perf_counter())
                if job.request.on_token is not None:
                    job.request.on_token(job.request, token)
            return
        with self._lock:
            job = self._jobs.pop(job_id, None)
            if job is not None:
                self._queued_s = max(self._queued_s - job.estimate_s, 0.0)
            if kind == "done":
                self._num_running, self._num_free_pages = message[3], message[4]
        if job is None:
            return
        if kind == "error":
            job.future.set_exception(message[2])
        elif job.request is None:  # a prefill
            job.future.set_result(PrefillResult(**message[2]))
        else:
            fields = dict(message[2])
            reason = fields.pop("finish_reason")
            request = job.request
            request.finish_reason = None if reason is None else FinishReason(reason)
            request.output = fields.pop("output")
            # The child's times (time.perf_counter is the system's monotonic clock: the
            # same in every process of this host).
            request.token_times_s = fields.pop("token_times_s")
            for name, value in fields.items():
                setattr(request, name, value)
            job.future.set_result(request)

    def _died(self) -> None:
        self._process.join(timeout=5)
        code = self._process.exitcode
        with self._lock:
            self._healthy = False
            jobs, self._jobs = self._jobs, {}
            self._num_running, self._queued_s = 0, 0.0
        log.error("engine %s (process %d) died (exit code %s): %d requests failed; starting "
                  "a new one", self.name, self._process.pid, code, len(jobs))
        error = EngineDiedError(f"engine {self.name} died (exit code {code}) while running "
                                "this request; a new one is starting")
        for job in jobs.values():
            job.future.set_exception(error)
        self._conn.close()

    def _restart(self) -> None:
        """Start children until one is ready (or the worker closes)."""
        self.spec = replace(self.spec, calibrate_lengths=(), planner_costs=self.planner_costs)
        for attempt in itertools.count():
            if self._closing.is_set():
                return
            try:
                self.start()
                self.wait_ready()
            except EngineStartError as e:
                delay = RESTART_BACKOFF_S[min(attempt, len(RESTART_BACKOFF_S) - 1)]
                log.error("%s; trying again in %.0f s", e, delay)
                if self._closing.wait(delay):
                    return
                continue
            with self._lock:
                self.restarts += 1
            return

    def close(self) -> None:
        """Stop the child: it finishes the requests it runs (bounded by `STOP_TIMEOUT_S`,
        then killed); requests still waiting here fail."""
        self._closing.set()
        with self._lock:
            self._healthy = False
        if self._conn is None:
            return
        self._stop_child()  # (the reader then sees its pipe end, or its restart stop)
        if self._reader is not None:
            self._reader.join(timeout=STOP_TIMEOUT_S)
        self._stop_child()  # one a restart started meanwhile
        with self._lock:
            jobs, self._jobs = self._jobs, {}
        for job in jobs.values():
            if not job.future.done():
                job.future.set_exception(EngineDiedError(f"engine {self.name} was stopped"))

    def _stop_child(self) -> None:
        try:
            with self._send_lock:
                self._conn.send(None)
        except (OSError, ValueError):
            pass
        self._end_child()

    # -- what the conductor uses -------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def is_healthy(self) -> bool:
        with self._lock:
            return self._healthy

    @property
    def num_active(self) -> int:
        with self._lock:
            return len(self._jobs)

    @property
    def num_running(self) -> int:
        with self._lock:
            return self._num_running

    @property
    def num_free_pages(self) -> int:
        with self._lock:
            return self._num_free_pages

    @property
    def queued_s(self) -> float:
        with self._lock:
            return self._queued_s

    def _submit(self, job: _Job, message: tuple[Any, ...]) -> None:
        with self._lock:
            if not self._healthy:
                job.future.set_exception(EngineDiedError(
                    f"engine {self.name} is not running (restarting)"))
                return
            job_id = next(self._job_ids)
            self._jobs[job_id] = job
            self._queued_s += job.estimate_s
        try:
            with self._send_lock:
                self._conn.send((message[0], job_id, *message[1:]))
        except (OSError, ValueError):
            pass  # the child is gone: the reader fails the job with the others

    def submit(self, prompt: Sequence[int], sampling: SamplingParams, *args: Any,
               first_token: int | None = None, on_token: TokenCallback | None = None,
               request_id: str | None = None) -> Future[Any]:
        """As `engines.workers.PrefillWorker.submit` (``(prompt, sampling, estimate_s)``:
        a `PrefillResult`) or `DecodeWorker.submit` (a `DecodeRequest`)."""
        future: Future[Any] = Future()
        prompt = list(prompt)
        if self.spec.role == "prefill":
            (estimate_s,) = args
            self._submit(_Job(future, None, estimate_s),
                         ("submit", prompt, sampling, None, request_id))
            return future
        request = DecodeRequest(request_id or "", prompt, sampling, first_token=first_token,
                                on_token=on_token)
        self._submit(_Job(future, request), ("submit", prompt, sampling, first_token,
                                             request_id))
        return future

    def cancel(self, request_id: str) -> None:
        """Abort ``request_id`` on the child's engine at its next step."""
        try:
            with self._send_lock:
                self._conn.send(("cancel", request_id))
        except (OSError, ValueError):
            pass

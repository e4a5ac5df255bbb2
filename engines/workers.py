"""Engines on their own threads, fed through queues: what the conductor dispatches to.

A `PrefillWorker` runs one prompt at a time, first come first served; a `DecodeWorker`
steps its continuously batched engine while it has requests and sleeps when it has none.
Only the worker's thread touches its engine. Each keeps the load figures the conductor
reads (queued prefill seconds, active requests, free pages), updated under a lock.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass

from engines.decode import DecodeEngine, DecodeRequest, TokenCallback
from engines.prefill import PrefillEngine, PrefillResult
from engines.sampling import SamplingParams

log = logging.getLogger(__name__)

_STOP = object()


@dataclass
class _PrefillJob:
    prompt: list[int]
    sampling: SamplingParams
    estimate_s: float
    future: Future[PrefillResult]


class PrefillWorker:
    def __init__(self, engine: PrefillEngine, name: str) -> None:
        self.engine = engine
        self.name = name
        self._jobs: queue.Queue[_PrefillJob | object] = queue.Queue()
        self._lock = threading.Lock()
        self._queued_s = 0.0
        self._thread = threading.Thread(target=self._run, name=f"prefill-{name}", daemon=True)
        self._thread.start()

    @property
    def is_healthy(self) -> bool:
        """Whether it still takes prompts (its thread runs)."""
        return self._thread.is_alive()

    @property
    def queued_s(self) -> float:
        """Estimated seconds of prefill work accepted and not yet done."""
        with self._lock:
            return self._queued_s

    def submit(self, prompt: Sequence[int], sampling: SamplingParams,
               estimate_s: float) -> Future[PrefillResult]:
        future: Future[PrefillResult] = Future()
        with self._lock:
            self._queued_s += estimate_s
        self._jobs.put(_PrefillJob(list(prompt), sampling, estimate_s, future))
        return future

    def close(self) -> None:
        self._jobs.put(_STOP)
        self._thread.join()
        self.engine.close()

    def _run(self) -> None:
        self.engine.capture_graphs()
        while True:
            job = self._jobs.get()
            if job is _STOP:
                return
            assert isinstance(job, _PrefillJob)
            try:
                result = self.engine.prefill(job.prompt, job.sampling)
            except Exception as e:  # handed to the caller through the future
                job.future.set_exception(e)
            else:
                job.future.set_result(result)
            finally:
                with self._lock:
                    self._queued_s = max(self._queued_s - job.estimate_s, 0.0)


@dataclass
class _DecodeJob:
    prompt: list[int]
    sampling: SamplingParams
    first_token: int | None
    on_token: TokenCallback | None
    future: Future[DecodeRequest]
    request_id: str | None = None


@dataclass
class _Cancel:
    request_id: str


class DecodeWorker:
    def __init__(self, engine: DecodeEngine, name: str) -> None:
        self.engine = engine
        self.name = name
        self._inbox: queue.Queue[_DecodeJob | object] = queue.Queue()
        self._requests: list[tuple[DecodeRequest, Future[DecodeRequest]]] = []
        self._lock = threading.Lock()
        self._num_active = 0
        self._error: BaseException | None = None  # a failed step stops the worker
        self._thread = threading.Thread(target=self._run, name=f"decode-{name}", daemon=True)
        self._thread.start()

    @property
    def is_healthy(self) -> bool:
        """Whether it still decodes (no step failed, its thread runs)."""
        with self._lock:
            return self._error is None and self._thread.is_alive()

    @property
    def num_active(self) -> int:
        """Requests accepted and not finished (queued, waiting or running)."""
        with self._lock:
            return self._num_active

    @property
    def num_running(self) -> int:
        return self.engine.num_running

    @property
    def num_free_pages(self) -> int:
        return self.engine.cache.num_free_pages

    def submit(self, prompt: Sequence[int], sampling: SamplingParams, *,
               first_token: int | None = None, on_token: TokenCallback | None = None,
               request_id: str | None = None) -> Future[DecodeRequest]:
        future: Future[DecodeRequest] = Future()
        with self._lock:
            if self._error is not None:
                future.set_exception(self._error)
                return future
            self._num_active += 1
        self._inbox.put(_DecodeJob(list(prompt), sampling, first_token, on_token, future,
                                   request_id))
        return future

    def cancel(self, request_id: str) -> None:
        """Abort request ``request_id`` at the worker's next turn (its pages back at once);
        its future resolves with finish reason ``abort``. Nothing if it is not here."""
        self._inbox.put(_Cancel(request_id))

    def close(self) -> None:
        self._inbox.put(_STOP)
        self._thread.join()
        self.engine.close()

    def _done(self, future: Future[DecodeRequest], request: DecodeRequest | None,
              error: BaseException | None) -> None:
        with self._lock:
            self._num_active -= 1
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(request)

    def _take(self, block: bool) -> bool:
        """Move queued jobs into the engine; False once asked to stop."""
        while True:
            try:
                job = self._inbox.get(block=block)
            except queue.Empty:
                return True
            if job is _STOP:
                return False
            if isinstance(job, _Cancel):
                self._abort(job.request_id)
                block = False
                continue
            assert isinstance(job, _DecodeJob)
            try:
                request = self.engine.add_request(job.prompt, job.sampling,
                                                  first_token=job.first_token,
                                                  on_token=job.on_token,
                                                  request_id=job.request_id)
            except Exception as e:  # a request that can never run: its caller hears why
                self._done(job.future, None, e)
            else:
                self._requests.append((request, job.future))
            block = False

    def _abort(self, request_id: str) -> None:
        for i, (request, future) in enumerate(self._requests):
            if request.request_id == request_id:
                if self.engine.abort(request):
                    del self._requests[i]
                    self._done(future, request, None)
                return

    def _run(self) -> None:
        self.engine.capture_graphs()
        running = True
        while running or self.engine.has_work:
            running = self._take(block=running and not self.engine.has_work) and running
            if not self.engine.has_work:
                continue
            try:
                self.engine.step()
            except Exception as e:
                log.exception("decode worker %s: step failed", self.name)
                with self._lock:
                    self._error = e
                while not self._inbox.empty():
                    job = self._inbox.get()
                    if isinstance(job, _DecodeJob):
                        self._done(job.future, None, e)
                for _, future in self._requests:
                    self._done(future, None, e)
                self._requests.clear()
                return
            still = []
            for request, future in self._requests:
                if request.is_finished:
                    self._done(future, request, None)
                else:
                    still.append((request, future))
            self._requests = still

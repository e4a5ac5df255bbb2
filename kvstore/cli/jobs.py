"""The replays of one ``kvstore hitrate`` command, spread over the cores, and their
progress bar.

A job is a callable that takes the trace and returns its result as a JSON-ready dict
(`policy_job`, `belady_job`, `pool_job` with their configuration bound first).
Job i runs in worker ``i % workers``, one worker per core: worker 0 is this process, the
others are forked from it once the trace is interned (they inherit the trace and the
jobs; each sends back its results as JSON on a pipe). Results come back in job order.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

from kvstore.errors import KVStoreError
from kvstore.sim.pool import PoolConfig, replay_pool
from kvstore.sim.replay import Progress, ReplayConfig, belady, replay
from kvstore.sim.traces import Trace

Job = Callable[[Trace], dict[str, Any]]


def policy_job(config: ReplayConfig, trace: Trace) -> dict[str, Any]:
    return replay(trace, config).to_dict()


def belady_job(capacity_blocks: int, window_s: float | None, trace: Trace) -> dict[str, Any]:
    return belady(trace, capacity_blocks, window_s).to_dict()


def pool_job(config: PoolConfig, trace: Trace) -> dict[str, Any]:
    return {"configuration": "pooled" if config.is_pooled else "per-node",
            **replay_pool(trace, config).to_dict()}


def run_jobs(trace: Trace, jobs: list[Job], progress: Progress | None) -> list[dict[str, Any]]:
    """Every job's result, in order (see the module docstring)."""
    workers = min(len(jobs), os.cpu_count() or 1) if hasattr(os, "fork") else 1
    trace.interned()  # once, before any fork
    children = [_fork_worker(trace, jobs, w, workers) for w in range(1, workers)]
    results: dict[int, dict[str, Any]] = {}
    try:
        for i in range(0, len(jobs), workers):
            results[i] = jobs[i](trace)
            if progress:
                progress(len(results))
    finally:
        for pid, pipe in children:
            with os.fdopen(pipe, "rb") as f:
                answer = f.read()
            _, status = os.waitpid(pid, 0)
            if status != 0 or not answer:
                raise KVStoreError(f"a replay worker failed: {answer.decode(errors='replace')}")
            results.update((i, result) for i, result in json.loads(answer))
            if progress:
                progress(len(results))
    return [results[i] for i in range(len(jobs))]


def _fork_worker(trace: Trace, jobs: list[Job], worker: int, workers: int) -> tuple[int, int]:
    """A forked process running jobs ``worker, worker + workers, ...``: (pid, read end)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker: results or the error on the pipe, then out without cleanup
        os.close(read_end)
        code = 0
        try:
            answer = json.dumps([(i, jobs[i](trace))
                                 for i in range(worker, len(jobs), workers)]).encode()
        except BaseException as e:
            answer, code = f"{type(e).__name__}: {e}".encode(), 1
        with os.fdopen(write_end, "wb") as f:
            f.write(answer)
        os._exit(code)
    os.close(write_end)
    return pid, read_end


class LazyProgress:
    """A rich progress bar on stderr that appears only once a run passes a second."""

    def __init__(self, total: int, what: str, enabled: bool) -> None:
        self.total, self.what, self.enabled = total, what, enabled
        self.started_s = time.monotonic()
        self._bar: Any = None
        self._task: Any = None

    def __call__(self, done: int) -> None:
        if not self.enabled:
            return
        if self._bar is None:
            if time.monotonic() - self.started_s < 1.0:
                return
            from rich.console import Console
            from rich.progress import Progress as Bar

            self._bar = Bar(console=Console(stderr=True), transient=True)
            self._bar.start()
            self._task = self._bar.add_task(self.what, total=self.total)
        self._bar.update(self._task, completed=done)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()

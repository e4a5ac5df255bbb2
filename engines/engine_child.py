"""What an engine process runs (`engines.processes`): its spec, the engine and store
client it builds from it, and its loop over the pipe to the parent.

The child runs the engine on a thread worker (`engines.workers`), as the server would
in-process, and answers on the pipe: ``("ready", info)`` or ``("fatal", message)`` once,
then ``("token", ...)``, ``("done", ...)`` and ``("error", ...)`` per request (the
parent's module docstring has the messages).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from engines.cost_model import planner_costs, planner_of
from engines.decode import DecodeRequest
from engines.prefill import PrefillResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineSpec:
    """What a child builds: its engine (``role`` prefill or decode) on ``model`` (a
    `engines.presets.load_model` spec) on ``device``, a client of ``store_url``."""

    role: str
    model: str
    store_url: str
    device: str = "cpu"
    token: str | None = None
    num_pages: int | None = None
    max_batch: int = 8
    max_step_tokens: int | None = None
    kv_codec: str = "none"
    # Measure the conductor's cost model at start (`engines.cost_model.calibrate`): one
    # engine does, before the others start (their load would skew it), never on a restart.
    calibrate_lengths: tuple[int, ...] = ()
    calibrate_blocks: int = 8
    # The fetch planner's costs (`planner_costs`): the engine that calibrates measures the
    # store's tiers too (`engines.cost_model.planner_for`) and says them when ready; the
    # others, and its own restarts, plan with those. None: no planner.
    planner_costs: dict[str, Any] | None = None
    log_level: str = "INFO"  # the child's logging, as the server's


_DECODE_FIELDS = ("output", "token_times_s", "num_cached_tokens", "arrival_s",
                  "num_published_blocks", "num_stored_blocks", "step_tokens")


def child_main(spec: EngineSpec, conn: Any) -> None:
    """A child's whole life: build the engine, say ready, serve the pipe until told to
    stop or the parent is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server stops its engines itself
    logging.basicConfig(level=spec.log_level,
                        format=f"%(asctime)s %(levelname)s engine[{os.getpid()}] "
                               "%(name)s: %(message)s")
    try:
        worker, client, info = _build(spec)
    except Exception as e:  # its model, its store: the parent says it in one line
        conn.send(("fatal", f"{type(e).__name__}: {e}"))
        return
    lock = threading.Lock()

    def send(message: tuple[Any, ...]) -> None:
        with lock:
            try:
                conn.send(message)
            except (OSError, ValueError):
                pass  # the parent is gone: the loop below ends
            except Exception as e:  # a value that does not pickle: the request fails
                conn.send(("error", message[1], RuntimeError(
                    f"the engine's answer could not be sent ({type(e).__name__}: {e})")))

    send(("ready", info))
    engine = worker.engine
    try:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                return
            if message is None:
                return
            if message[0] == "cancel":
                if spec.role == "decode":
                    worker.cancel(message[1])
                continue
            _, job, prompt, sampling, first_token, request_id = message
            if spec.role == "prefill":
                future = worker.submit(prompt, sampling, 0.0)
                future.add_done_callback(lambda f, job=job: send(
                    ("error", job, f.exception()) if f.exception() is not None
                    else ("done", job, _prefill_fields(f.result()), 0, 0)))
                continue

            def on_token(_: DecodeRequest, token: int, job: int = job) -> None:
                send(("token", job, token, engine.num_running, engine.cache.num_free_pages))

            def done(f: Future[DecodeRequest], job: int = job) -> None:
                if f.exception() is not None:
                    send(("error", job, f.exception()))
                    if not worker.is_healthy:  # a step failed: a new process starts over
                        log.error("the engine's step failed; this process exits")
                        os._exit(1)
                    return
                request = f.result()
                fields = {name: getattr(request, name) for name in _DECODE_FIELDS}
                fields["finish_reason"] = (None if request.finish_reason is None
                                           else request.finish_reason.value)
                send(("done", job, fields, engine.num_running, engine.cache.num_free_pages))

            worker.submit(prompt, sampling, first_token=first_token, on_token=on_token,
                          request_id=request_id).add_done_callback(done)
    finally:
        worker.close()
        client.close()


def _prefill_fields(result: PrefillResult) -> dict[str, Any]:
    return {name: getattr(result, name) for name in PrefillResult.__dataclass_fields__}


def _build(spec: EngineSpec) -> tuple[Any, Any, dict[str, Any]]:
    import kvstore
    from engines.cost_model import calibrate, planner_for
    from engines.decode import DecodeEngine
    from engines.prefill import PrefillEngine
    from engines.presets import load_model
    from engines.workers import DecodeWorker, PrefillWorker

    model = load_model(spec.model, device=spec.device).model
    client = kvstore.connect(spec.store_url, token=spec.token)
    try:
        if spec.role == "prefill":
            engine: Any = PrefillEngine(model, client, num_pages=spec.num_pages,
                                        kv_codec=spec.kv_codec)
        else:
            engine = DecodeEngine(model, client, num_pages=spec.num_pages,
                                  max_batch=spec.max_batch, kv_codec=spec.kv_codec,
                                  max_step_tokens=spec.max_step_tokens)
        cost = planner = None
        if spec.calibrate_lengths:
            cost = calibrate(model, engine.io, lengths=list(spec.calibrate_lengths),
                             num_blocks=spec.calibrate_blocks)
            planner = planner_for(engine.io, cost)  # None: the store tells no tiers
        elif spec.planner_costs is not None:
            planner = planner_of(spec.planner_costs, engine.block_tokens)
        engine.planner = planner
    except BaseException:
        client.close()
        raise
    worker = (PrefillWorker(engine, spec.role) if spec.role == "prefill"
              else DecodeWorker(engine, spec.role))
    info = {"namespace": engine.io.namespace, "block_tokens": engine.block_tokens,
            "num_pages": engine.cache.num_pages, "model_id": model.model_id,
            "cost": None if cost is None else cost.as_dict(),
            "planner": None if planner is None else planner_costs(planner)}
    log.info("fetch planner: %s", "none (every cached block is loaded)" if planner is None
             else f"tier costs {planner.stats()['tier_costs']}")
    return worker, client, info

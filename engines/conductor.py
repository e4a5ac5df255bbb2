"""The conductor: routes each request across prefill and decode engines by where its KV
cache is, and decides whether disaggregating it pays.

For a prompt of ``L`` tokens it asks every engine's store how many leading blocks are
cached there (`match_prefix`; engines may share one store or have their own), then
estimates with the fitted `CostModel`:

    prefill engine p:   ttft_p = queued_s(p) + fetch_s(cached_p) + prefill_s(L - cached_p, L)
    decode engine d:    chosen among those with pages free, fewest active requests first,
                        then the most cached blocks
    colocated on d:     ttft_d = wait + fetch_s(cached_d) + prefill_s(L - cached_d, L)
                        cost = ttft_d + decode_step_s + running(d) * prefill_s(L - cached_d, L)
    disaggregated:      cost = min_p ttft_p + publish_s(new blocks) + wait + fetch_s(full
                        blocks) + (1 + running(d)) * prefill_s(tail + 1, L)

Each cost runs to the request's second token (colocated: its prefill then a decode step;
disaggregated: the decode engine fetches every full block and computes only the partial
last block and the handed-over token) plus the stall it imposes on the ``running(d)``
requests decoding on d, each of which waits for that compute. ``wait`` is a decode step
when d is busy (the request joins at the next step).

and takes the cheaper. A short prompt costs little to compute but a publish and a fetch
to ship; a prompt whose KV is already in the decode engine's store costs only its fetch
there: both run colocated. A long uncached prompt next to a busy decode batch is
disaggregated. Every decision is logged with its numbers.

With service objectives (``objectives``: a time to first token and an inter-token gap,
as `kvstore serve --ttft-slo/--itl-slo`), what counts is meeting them, as in DistServe's
goodput: a request runs colocated when that meets both (its TTFT, and the stall its
prefill adds to a step of the requests decoding beside it), else disaggregated when that
meets both (the prefill engine's TTFT, and the hand-over's gap before its second token),
else disaggregated when its prefill would stall the batch past the inter-token objective
(the request misses its objectives either way; the batch need not), else the cheaper as
above. Colocated first: it ships nothing and leaves the prefill engines to the prompts
that need them. ``running(d)`` counts the requests admitted to d, waiting ones too (a
burst's requests all decode together), and d's wait includes the prefills already routed
to it and not yet done.

``mode`` may fix the choice instead (``colocated``: always on a decode engine;
``disaggregated``: always through a prefill engine, where there is one); the costs are
still computed and logged.

`cancel` stops a request whose client went away: on its decode engine at the next step
(its pages back at once), or, still in prefill, before it is handed over.

Engines on the nodes of a pool (`pool`: anything with `locate(keys)`, such as the
cluster-aware client): any node serves the whole pool, so every engine could fetch the
whole cached prefix; the conductor asks the pool's index once per request (one Redis
round trip, no question to each engine) where the prefix lives, costs each engine with
the prefix the pool holds, and among equal costs takes the engine whose own node holds
the most of it (its fetch stays on its host). The log line gives each engine's local
blocks and their tiers.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from engines.cost_model import CostModel, calibrate
from engines.decode import DecodeEngine, DecodeRequest, FinishReason
from engines.fetch_plan import FetchPlan
from engines.kv_io import CacheFullError, usable_prefix_blocks
from engines.prefill import PrefillEngine, PrefillResult
from engines.sampling import SamplingParams
from engines.workers import DecodeWorker, PrefillWorker
from kvstore.errors import KVStoreError

MODES = ("auto", "colocated", "disaggregated")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Objectives:
    """Service objectives: seconds to the first token, and between tokens."""

    ttft_s: float
    itl_s: float

    def __post_init__(self) -> None:
        if not (self.ttft_s > 0 and self.itl_s > 0):
            raise ValueError(f"objectives must be positive, got {self}")


@dataclass(frozen=True)
class Route:
    request_id: str
    is_disaggregated: bool
    prefill: int | None  # index of the prefill engine, None when colocated
    decode: int
    colocated_cost_s: float
    disaggregated_cost_s: float
    estimated_ttft_s: float
    cached_blocks_prefill: int
    cached_blocks_decode: int
    num_blocks: int
    # With a pool: each engine's node's own leading blocks ("d0": (tier bits, ...)).
    local_blocks: dict[str, tuple[int, ...]] = field(default_factory=dict)
    # The objectives' view (nan without objectives): each way's TTFT, and the longest gap
    # it makes (colocated: the step its prefill stalls; disaggregated: the hand-over).
    ttft_colocated_s: float = math.nan
    ttft_disaggregated_s: float = math.nan
    gap_colocated_s: float = math.nan
    gap_disaggregated_s: float = math.nan
    reason: str = "cost"  # why: mode, cost, or which way meets the objectives
    compute_colocated_s: float = 0.0  # its prefill's estimate on the decode engine

    def describe(self) -> str:
        where = (f"prefill p{self.prefill} -> decode d{self.decode}" if self.is_disaggregated
                 else f"colocated on d{self.decode}")
        local = "".join(f"; local {name}={len(tiers)}" + (f" (tiers {_tiers(tiers)})"
                                                          if tiers else "")
                        for name, tiers in self.local_blocks.items())
        slo = ("" if math.isnan(self.ttft_colocated_s) else
               f"; ttft/gap colocated {self.ttft_colocated_s * 1e3:.0f}/"
               f"{self.gap_colocated_s * 1e3:.0f} ms, disaggregated "
               f"{self.ttft_disaggregated_s * 1e3:.0f}/{self.gap_disaggregated_s * 1e3:.0f} "
               f"ms ({self.reason})")
        return (f"{where}: est colocated {self.colocated_cost_s * 1e3:.0f} ms vs "
                f"disaggregated {self.disaggregated_cost_s * 1e3:.0f} ms; cached blocks "
                f"p={self.cached_blocks_prefill} d={self.cached_blocks_decode} "
                f"of {self.num_blocks}{local}{slo}")


def _tiers(bits: tuple[int, ...]) -> str:
    """How many of the blocks are in each tier, by their fastest copy: hbm 3, dram 5."""
    counts: dict[str, int] = {}
    for b in bits:
        name = "hbm" if b & 1 else "dram" if b & 2 else "nvme"
        counts[name] = counts.get(name, 0) + 1
    return ", ".join(f"{name} {n}" for name, n in counts.items())


@dataclass
class RequestResult:
    request_id: str
    prompt: list[int]
    output: list[int]
    route: Route
    ttft_s: float  # nan: cancelled before its first token
    inter_token_s: list[float]
    num_cached_tokens: int  # prompt tokens whose KV came from a store, not computed
    finish_reason: FinishReason | None
    prefill: PrefillResult | None = None
    decode: DecodeRequest | None = field(default=None, repr=False)


class NoEngineError(KVStoreError):
    """No engine of a role the request needs is running (one died and is restarting)."""


class Conductor:
    def __init__(self, prefill_engines: Sequence[Any], decode_engines: Sequence[Any], *,
                 cost: CostModel | None = None, pool: Any | None = None,
                 mode: str = "auto", objectives: Objectives | None = None) -> None:
        """Engines (`PrefillEngine`, `DecodeEngine`: each run on a thread worker here), or
        workers that run them elsewhere (`engines.processes.EngineProcess`: ``cost`` is
        then required). ``pool``: the pool the engines' stores are nodes of
        (``locate(keys)``), to route by where prefixes live without asking each engine.
        ``mode``: one of `MODES`; ``objectives``: what auto meets first (see the module
        docstring)."""
        if not decode_engines:
            raise ValueError("the conductor needs at least one decode engine")
        if mode not in MODES:
            raise ValueError(f"mode is one of {MODES}, got {mode!r}")
        if mode == "disaggregated" and not prefill_engines:
            raise ValueError("mode disaggregated needs at least one prefill engine")
        self.mode = mode
        self.objectives = objectives
        self.prefill = [PrefillWorker(e, f"p{i}") if isinstance(e, PrefillEngine) else e
                        for i, e in enumerate(prefill_engines)]
        self.decode = [DecodeWorker(e, f"d{i}") if isinstance(e, DecodeEngine) else e
                       for i, e in enumerate(decode_engines)]
        workers = [*self.prefill, *self.decode]
        if len({w.engine.block_tokens for w in workers}) != 1:
            self.close()
            raise ValueError("all engines must use the same block size")
        self.block_tokens = workers[0].engine.block_tokens
        if cost is None:
            first = self.decode[0].engine
            if not isinstance(first, DecodeEngine):
                self.close()
                raise ValueError("engines run elsewhere: give the conductor their cost model")
            cost = calibrate(first.model, first.io)
        self.cost = cost
        self.pool = pool
        # Each engine's node in the pool (its store's daemon), by worker name.
        self._node_of = ({w.name: getattr(w.engine.io.store, "node_id", None)
                          for w in [*self.prefill, *self.decode]} if pool is not None else {})
        self._lock = threading.Lock()  # routing reads and bumps load figures together
        # Requests not finished: id -> the decode worker it went to (None: in prefill); under
        # a lock of their own, never held while calling out (futures' callbacks take it).
        self._active: dict[str, DecodeWorker | None] = {}
        self._cancelled: set[str] = set()
        self._book = threading.Lock()
        # Prefill seconds routed colocated to each decode worker and not done yet (under
        # _book): a burst's prompts queue behind each other there.
        self._pending_s: dict[str, float] = {w.name: 0.0 for w in self.decode}

    def close(self) -> None:
        for worker in [*self.prefill, *self.decode]:
            worker.close()

    def __enter__(self) -> Conductor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- routing ---------------------------------------------------------------------------

    def route(self, prompt: Sequence[int], sampling: SamplingParams,
              request_id: str | None = None) -> Route:
        request_id = request_id or uuid.uuid4().hex[:12]
        cost, n, block = self.cost, len(prompt), self.block_tokens
        keys = self._healthy(self.decode)[0].engine.io.keys(prompt)
        cached_of, local = self._where(keys)

        def usable(blocks: int) -> int:
            return usable_prefix_blocks(blocks, n, block)

        decode_index, cached_d = self._pick_decode(prompt, sampling, cached_of, local)
        decode = self.decode[decode_index]
        running = decode.num_active  # waiting ones too: they decode beside it soon
        with self._book:
            pending_s = self._pending_s[decode.name]
        wait_d = (cost.decode_step_s if running else 0.0) + pending_s  # the next step
        fetch_d, loaded_d = self._fetch_cost(self.decode[decode_index], keys, n,
                                             usable(cached_d), overlap=False)
        compute_d = cost.prefill_s(n - loaded_d * block, n)
        ttft_colocated = wait_d + fetch_d + compute_d
        # Both costs run to the second token, plus what the request stalls the others by.
        colocated = ttft_colocated + cost.decode_step_s + running * compute_d

        best: tuple[float, int, int, int] | None = None  # (ttft, -local, index, cached)
        for i, p in enumerate(self.prefill):
            if not p.is_healthy:  # (restarting)
                continue
            cached_p = usable(cached_of(p))
            ttft_p = p.queued_s + self._prefill_cost(p, keys, n, cached_p)
            option = (ttft_p, -len(local.get(p.name, ())), i, cached_p)
            if best is None or option < best:
                best = option
        disaggregated = ttft_p = hand_over = float("inf")
        if best is not None:
            ttft_p, _, _, cached_p = best
            full = n // block
            tail_s = cost.prefill_s(n - full * block + 1, n)  # decode runs tail + 1st token
            hand_over = cost.publish_s(full - cached_p) + wait_d + cost.fetch_s(full) + tail_s
            disaggregated = ttft_p + hand_over + running * tail_s
        split, reason = self.mode == "disaggregated" and best is not None, "mode"
        if self.mode == "auto":
            split, reason = best is not None and disaggregated < colocated, "cost"
        slo = self.objectives
        stall = compute_d if running else 0.0  # the step that computes it, for the others
        if self.mode == "auto" and slo is not None:
            if ttft_colocated <= slo.ttft_s and stall <= slo.itl_s:
                split, reason = False, "colocated meets objectives"
            elif ttft_p <= slo.ttft_s and hand_over <= slo.itl_s + cost.decode_step_s:
                split, reason = True, "disaggregated meets objectives"
            elif stall > slo.itl_s and best is not None:
                # Neither way meets them for this request: do not take the decoding
                # batch's objectives down with it.
                split, reason = True, "neither meets objectives; spares the batch"
        route = Route(
            request_id=request_id, is_disaggregated=split,
            prefill=best[2] if split and best is not None else None, decode=decode_index,
            colocated_cost_s=colocated, disaggregated_cost_s=disaggregated,
            estimated_ttft_s=best[0] if split and best is not None else ttft_colocated,
            cached_blocks_prefill=best[3] if best is not None else 0,
            cached_blocks_decode=usable(cached_d), num_blocks=len(keys), local_blocks=local,
            ttft_colocated_s=ttft_colocated if slo else math.nan,
            ttft_disaggregated_s=ttft_p if slo else math.nan,
            gap_colocated_s=max(stall, cost.decode_step_s) if slo else math.nan,
            gap_disaggregated_s=hand_over if slo else math.nan, reason=reason,
            compute_colocated_s=compute_d)
        log.info("route %s (%d tokens): %s", request_id, n, route.describe())
        return route

    def _fetch_cost(self, worker: Any, keys: list[bytes], n: int, cached: int, *,
                    overlap: bool) -> tuple[float, int]:
        """(seconds, blocks loaded) of fetching what ``worker``'s engine would load of
        ``cached`` leading blocks: by its planner's plan where it has one and its store
        tells tiers (the plan may load fewer), else the cost model's fetch of them all."""
        plan = self._plan(worker, keys, n, cached, overlap=overlap)
        if plan is None:
            return self.cost.fetch_s(cached), cached
        compute = self.cost.prefill_s(n - plan.head_load_end * self.block_tokens, n)
        return max(plan.estimate_s - compute, 0.0), plan.head_load_end

    def _prefill_cost(self, worker: Any, keys: list[bytes], n: int, cached: int) -> float:
        """A prefill engine's time to first token for the request (its planner's estimate,
        which may overlap loads with compute, where it has one)."""
        plan = self._plan(worker, keys, n, cached, overlap=True)
        if plan is None:
            return self.cost.fetch_s(cached) + self.cost.prefill_s(
                n - cached * self.block_tokens, n)
        return plan.estimate_s

    def _plan(self, worker: Any, keys: list[bytes], n: int, cached: int, *, overlap: bool
              ) -> FetchPlan | None:
        planner = getattr(worker.engine, "planner", None)
        if planner is None or not cached or self.pool is not None:
            return None
        bits = worker.engine.io.tier_bits(keys[:cached])
        if bits is None:
            return None
        plan = planner.estimate(n, bits, overlap=overlap)
        log.debug("plan for %s: %s", worker.name, plan.describe())
        return plan

    @staticmethod
    def _healthy(workers: list[Any]) -> list[Any]:
        """The workers that run (`NoEngineError` if none: one died and is restarting)."""
        up = [w for w in workers if w.is_healthy]
        if not up:
            raise NoEngineError("no decode engine is running (restarting after a failure); "
                                "try again shortly")
        return up

    def _where(self, keys: list[bytes]) -> tuple[Callable[[Any], int],
                                                  dict[str, tuple[int, ...]]]:
        """How to count an engine's cached leading blocks, and (with a pool) each
        engine's node's own leading blocks' tiers, by worker name."""
        if self.pool is None:
            return lambda w: w.engine.io.cached_blocks(keys, probe=True), {}
        try:
            found = {loc.node_id: loc.tiers for loc in self.pool.locate(keys)}
        except KVStoreError as e:  # the index cannot be read: ask the engines
            log.warning("locate failed (%s); asking each engine", e)
            return lambda w: w.engine.io.cached_blocks(keys, probe=True), {}
        pooled = max((len(t) for t in found.values()), default=0)  # any node serves it
        local = {name: found.get(node, ()) for name, node in self._node_of.items()}
        return lambda w: pooled, local

    def _pick_decode(self, prompt: Sequence[int], sampling: SamplingParams,
                     cached_of: Callable[[Any], int], local: dict[str, tuple[int, ...]]
                     ) -> tuple[int, int]:
        """(index, cached blocks) of the decode engine to use: room first, then load, then
        the longest cached prefix, then the most of it on the engine's own node."""
        candidates = []
        for i, worker in enumerate(self.decode):
            if not worker.is_healthy:  # (restarting)
                continue
            need = worker.engine.pages_needed(len(prompt), sampling)
            if need > worker.engine.cache.num_pages:
                continue
            cached = cached_of(worker)
            has_room = worker.num_free_pages >= need
            candidates.append((not has_room, worker.num_active, -cached,
                               -len(local.get(worker.name, ())), i, cached))
        if not candidates:
            raise CacheFullError(f"no decode engine can hold a request of {len(prompt)} "
                                 f"+ {sampling.max_new_tokens} tokens")
        *_, index, cached = min(candidates)
        return index, cached

    # -- running ---------------------------------------------------------------------------

    def submit(self, prompt: Sequence[int], sampling: SamplingParams | None = None, *,
               request_id: str | None = None,
               on_token: Callable[[DecodeRequest, int], None] | None = None
               ) -> Future[RequestResult]:
        """Route and start a request; the future resolves when its last token is out (or
        it was cancelled: finish reason ``abort``)."""
        prompt = list(prompt)
        sampling = (sampling or SamplingParams()).with_seed()
        request_id = request_id or uuid.uuid4().hex[:12]
        start_s = time.perf_counter()
        result: Future[RequestResult] = Future()
        result.add_done_callback(lambda _: self._forget(request_id))
        with self._lock:
            route = self.route(prompt, sampling, request_id)
            if not route.is_disaggregated:
                worker = self.decode[route.decode]
                prefilled_once = self._pending(worker.name, route.compute_colocated_s)

                def first_token(request: DecodeRequest, token: int) -> None:
                    prefilled_once()
                    if on_token is not None:
                        on_token(request, token)

                with self._book:
                    self._active[request_id] = worker
                    decoded = worker.submit(prompt, sampling, on_token=first_token,
                                            request_id=request_id)
                decoded.add_done_callback(lambda _: prefilled_once())
                decoded.add_done_callback(
                    lambda f: _settle(result, f, lambda d: _colocated(route, prompt, d,
                                                                      start_s)))
                return result
            assert route.prefill is not None
            with self._book:
                self._active[request_id] = None
            estimate = self.cost.prefill_s(
                len(prompt) - route.cached_blocks_prefill * self.block_tokens, len(prompt))
            prefilled = self.prefill[route.prefill].submit(prompt, sampling, estimate)
        decode_worker = self.decode[route.decode]

        def handed_over(f: Future[PrefillResult]) -> None:
            if f.exception() is not None:
                result.set_exception(f.exception())
                return
            first = f.result()
            first_token_at = time.perf_counter()
            with self._book:
                cancelled = request_id in self._cancelled  # its client left during prefill
                if not cancelled:
                    self._active[request_id] = decode_worker
                    decoded = decode_worker.submit(prompt, sampling,
                                                   first_token=first.first_token,
                                                   on_token=on_token, request_id=request_id)
            if cancelled:  # (settled outside the lock: its callback takes it)
                result.set_result(_aborted(route, prompt, first, start_s))
                return
            decoded.add_done_callback(lambda d: _settle(
                result, d, lambda req: _disaggregated(route, prompt, first, req, start_s,
                                                      first_token_at)))

        prefilled.add_done_callback(handed_over)
        return result

    def _pending(self, name: str, seconds: float) -> Callable[[], None]:
        """Count ``seconds`` of prefill as pending on decode worker ``name``; the function
        returned takes them off, once (its first token is out, or it ended)."""
        with self._book:
            self._pending_s[name] += seconds
        left = [seconds]  # (under _book)

        def prefilled() -> None:
            with self._book:
                self._pending_s[name] = max(self._pending_s[name] - left[0], 0.0)
                left[0] = 0.0

        return prefilled

    def cancel(self, request_id: str) -> None:
        """Stop request ``request_id`` (its client went away); nothing if it finished."""
        with self._book:  # (a decode worker's cancel goes after the request's submit)
            if request_id not in self._active:
                return
            self._cancelled.add(request_id)
            worker = self._active[request_id]
            if worker is not None:
                worker.cancel(request_id)

    def _forget(self, request_id: str) -> None:
        with self._book:
            self._active.pop(request_id, None)
            self._cancelled.discard(request_id)

    def run(self, prompt: Sequence[int], sampling: SamplingParams | None = None
            ) -> RequestResult:
        return self.submit(prompt, sampling).result()


def _settle(result: Future[RequestResult], done: Future[DecodeRequest],
            build: Callable[[DecodeRequest], RequestResult]) -> None:
    if done.exception() is not None:
        result.set_exception(done.exception())
    else:
        result.set_result(build(done.result()))


def _aborted(route: Route, prompt: list[int], first: PrefillResult,
             start_s: float) -> RequestResult:
    """A request cancelled after its prefill, before any decode: no token went out."""
    return RequestResult(
        request_id=route.request_id, prompt=prompt, output=[], route=route,
        ttft_s=first.ttft_s, inter_token_s=[], num_cached_tokens=first.num_cached_tokens,
        finish_reason=FinishReason.ABORT, prefill=first)


def _colocated(route: Route, prompt: list[int], request: DecodeRequest,
               start_s: float) -> RequestResult:
    times = request.token_times_s
    return RequestResult(
        request_id=route.request_id, prompt=prompt, output=request.output, route=route,
        ttft_s=times[0] - start_s if times else math.nan,  # (nan: aborted before one)
        inter_token_s=[b - a for a, b in itertools.pairwise(times)],
        num_cached_tokens=request.num_cached_tokens, finish_reason=request.finish_reason,
        decode=request)


def _disaggregated(route: Route, prompt: list[int], first: PrefillResult,
                   request: DecodeRequest, start_s: float,
                   first_token_at: float) -> RequestResult:
    # The first token is out when prefill returns it; decode's own tokens follow.
    times = [first_token_at, *request.token_times_s[1:]]
    return RequestResult(
        request_id=route.request_id, prompt=prompt, output=request.output, route=route,
        ttft_s=first_token_at - start_s,
        inter_token_s=[b - a for a, b in itertools.pairwise(times)],
        num_cached_tokens=first.num_cached_tokens, finish_reason=request.finish_reason,
        prefill=first, decode=request)

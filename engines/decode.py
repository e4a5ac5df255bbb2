"""The decode engine: fetches a prompt's KV from the store, computes only what is not
cached, then decodes, several requests at once (continuous batching).

Each `step` runs one forward over a ragged batch: one new token for every running
request, plus the uncached tail of each request admitted this step (its cached prefix
fetched from the store first, copied into the pages layer by layer while the forward
runs). A request joins as soon as the cache has pages for it and leaves when it hits its
token budget or a stop token; its pages go back at once.

With a per-step token budget (``max_step_tokens``, vLLM's chunked prefill) a step computes
at most that many tokens: one for each decoding request first, then the uncached prompts
in chunks of what is left, a long prompt over several steps, so that the requests already
decoding keep producing a token every step while it is computed (colocated serving). A
prompt in chunks produces its first token at the step that computes its last chunk.

A request handed over by a prefill engine carries that engine's first token: the decode
engine appends it to the prompt and continues, so the stream is the one a single process
would produce. The full prompt blocks a step computes are published right after it (layer
by layer during the forward), so a request arriving next with the same prefix finds
them; when a request finishes, the full blocks of its reply follow, so the next turn of
the conversation finds those too.
"""

from __future__ import annotations

import enum
import itertools
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from engines.fetch_plan import FetchPlanner
from engines.kv_io import CacheFullError, KVBlockIO, LayerLoad, Publisher, fetchable_blocks
from engines.model import LlamaModel
from engines.paged_cache import SequenceKV
from engines.sampling import SamplingParams, sample

TokenCallback = Callable[["DecodeRequest", int], None]


class RequestState(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.Enum):
    LENGTH = "length"
    STOP = "stop"
    ABORT = "abort"  # cancelled (its client went away): its pages went back at once


@dataclass(eq=False)
class DecodeRequest:
    request_id: str
    prompt: list[int]
    sampling: SamplingParams
    first_token: int | None = None  # from a prefill engine
    on_token: TokenCallback | None = None
    state: RequestState = RequestState.WAITING
    output: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the store
    finish_reason: FinishReason | None = None
    arrival_s: float = field(default_factory=time.perf_counter)
    token_times_s: list[float] = field(default_factory=list)
    seq: SequenceKV = field(default_factory=SequenceKV)
    keys: list[bytes] = field(default_factory=list)
    num_published_blocks: int = 0
    num_stored_blocks: int = 0  # leading blocks known to be in the store (fetched or put)
    step_tokens: list[int] = field(default_factory=list)  # tokens it computed, per step
    _pending: int | None = None  # the last token sampled, not yet run through the model
    _tail: list[int] = field(default_factory=list)  # prompt tokens left to compute (chunks)

    @property
    def is_finished(self) -> bool:
        return self.state is RequestState.FINISHED

    @property
    def first_token_s(self) -> float | None:
        """Seconds from arrival to the first token this engine produced."""
        return self.token_times_s[0] - self.arrival_s if self.token_times_s else None

    @property
    def inter_token_s(self) -> list[float]:
        t = self.token_times_s
        return [b - a for a, b in itertools.pairwise(t)]


class DecodeEngine:
    def __init__(self, model: LlamaModel, store: Any, *, num_pages: int | None = None,
                 block_tokens: int = 16, max_batch: int = 8, publish: bool = True,
                 cuda_graphs: bool = True, planner: FetchPlanner | None = None,
                 kv_codec: str | None = None, max_step_tokens: int | None = None) -> None:
        """``planner``: decide per request how many cached blocks to load, the rest
        computed in the request's first step (`engines.fetch_plan`, without overlap: a
        step is one forward); without one every cached block is loaded. ``kv_codec``:
        as `PrefillEngine`'s (engines sharing blocks must use the same).
        ``max_step_tokens``: the tokens one step may compute (chunked prefill; None: a
        prompt's whole tail in the step that admits it); at least ``max_batch``."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_step_tokens is not None and max_step_tokens < max_batch:
            raise ValueError(f"max_step_tokens ({max_step_tokens}) must be at least max_batch "
                             f"({max_batch}): every decoding request takes a token a step")
        self.max_step_tokens = max_step_tokens
        self.model = model
        if num_pages is None:
            num_pages = 2 * -(-model.config.max_position_tokens // block_tokens)
        self.cache = model.new_cache(num_pages=num_pages, page_tokens=block_tokens,
                                     cuda_graphs=cuda_graphs)
        self.io = KVBlockIO(model, self.cache, store, codec=kv_codec)
        self.block_tokens = block_tokens
        self.max_batch = max_batch
        self.publish = publish
        self.planner = planner
        self._waiting: deque[DecodeRequest] = deque()
        self._running: list[DecodeRequest] = []

    def capture_graphs(self) -> None:
        """Capture the forward's CUDA graphs now (`LlamaModel.capture_graphs`)."""
        self.model.capture_graphs(self.cache)

    def close(self) -> None:
        for request in self._running:
            self.cache.release(request.seq)
        self._running.clear()
        self.io.close()

    def __enter__(self) -> DecodeEngine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- requests --------------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def has_work(self) -> bool:
        return bool(self._waiting or self._running)

    def pages_needed(self, num_prompt_tokens: int, sampling: SamplingParams) -> int:
        return self.cache.pages_for(num_prompt_tokens + sampling.max_new_tokens + 1)

    def add_request(self, prompt: Sequence[int], sampling: SamplingParams | None = None, *,
                    first_token: int | None = None, request_id: str | None = None,
                    on_token: TokenCallback | None = None) -> DecodeRequest:
        prompt = list(prompt)
        sampling = (sampling or SamplingParams()).with_seed()
        if not prompt:
            raise ValueError("a request needs at least one prompt token")
        total = len(prompt) + sampling.max_new_tokens
        if total > self.model.config.max_position_tokens:
            raise ValueError(f"prompt ({len(prompt)}) + max_new_tokens "
                             f"({sampling.max_new_tokens}) exceeds the model's "
                             f"{self.model.config.max_position_tokens} positions")
        if self.pages_needed(len(prompt), sampling) > self.cache.num_pages:
            raise CacheFullError(f"a request of {total} tokens can never fit in "
                                 f"{self.cache.num_pages} pages")
        request = DecodeRequest(request_id=request_id or uuid.uuid4().hex[:12],
                                prompt=prompt, sampling=sampling, first_token=first_token,
                                on_token=on_token)
        self._waiting.append(request)
        return request

    def abort(self, request: DecodeRequest) -> bool:
        """Stop ``request`` now: out of the queue or the batch, its pages back at once (what
        it computed is not published). False if it had finished already."""
        if request.is_finished:
            return False
        if request in self._waiting:
            self._waiting.remove(request)
        elif request in self._running:
            self._running.remove(request)
            self.cache.release(request.seq)
        request.finish_reason = FinishReason.ABORT
        request.state = RequestState.FINISHED
        return True

    # -- running ---------------------------------------------------------------------------

    def step(self) -> list[tuple[DecodeRequest, int]]:
        """One forward: a token for each decoding request, the next chunk of each prompt
        still being computed, and what is admitted, within the step's token budget.
        Returns the tokens produced, in batch order."""
        budget = self.max_step_tokens or 1 << 62
        batch: list[tuple[SequenceKV, list[int]]] = []
        owners: list[DecodeRequest] = []
        prompts_done: list[DecodeRequest] = []  # prompts whose last chunk is in this step

        def add_chunk(request: DecodeRequest) -> None:
            """The next chunk of ``request``'s prompt, as much as the budget leaves."""
            nonlocal budget
            chunk, request._tail = request._tail[:budget], request._tail[budget:]
            batch.append((request.seq, chunk))
            owners.append(request)
            if not request._tail:
                prompts_done.append(request)
            budget -= len(chunk)

        for request in self._running:
            if not request._tail:
                batch.append((request.seq, [request._pending]))
                owners.append(request)
                budget -= 1
        for request in self._running:  # prompts in chunks, oldest first
            if request._tail and budget > 0:
                add_chunk(request)
        loads: list[LayerLoad] = []
        publishers: list[tuple[DecodeRequest, Publisher]] = []
        try:
            while (self._waiting and len(owners) < self.max_batch and budget > 0
                   and self.cache.can_allocate(self.pages_needed(
                       len(self._waiting[0].prompt), self._waiting[0].sampling))):
                request = self._waiting.popleft()
                tail, load = self._admit(request)
                if request.is_finished:  # the handed-over first token was its last
                    load.wait_all()
                    self._finish(request)
                    continue
                request._tail = tail
                add_chunk(request)
                loads.append(load)
        except BaseException:  # what the requests admitted so far borrowed goes back
            for load in loads:
                load.release()
            raise
        if not batch:
            return []
        if self.publish:  # prompts computed whole by this step: their blocks, layer by layer
            publishers = [(r, self._prompt_publisher(r)) for r in prompts_done]

        def before_layer(layer: int) -> None:
            for load in loads:
                load.wait(layer)

        def after_layer(layer: int) -> None:
            for _, publisher in publishers:
                publisher.after_layer(layer)

        try:
            logits = self.model.forward(self.cache, batch,
                                        before_layer=before_layer if loads else None,
                                        after_layer=after_layer if publishers else None)
        finally:
            for load in loads:
                load.wait_all()  # gives back what the fetch borrowed from the store
        for request, publisher in publishers:  # prompts sharing a prefix find it at once
            stored = publisher.finish()
            if stored == len(publisher.keys):
                request.num_stored_blocks = publisher.first_block + stored
            request.num_published_blocks += max(
                stored - (request.num_cached_tokens // self.block_tokens
                          - publisher.first_block), 0)
        now = time.perf_counter()
        produced = []
        for request, row, (_, tokens) in zip(owners, logits, batch, strict=True):
            request.step_tokens.append(len(tokens))
            if request._tail:  # a chunk of its prompt, more to come: no token yet
                continue
            token = sample(row, request.sampling, len(request.output))
            self._emit(request, token, now)
            produced.append((request, token))
        for request in [r for r in self._running if r.is_finished]:
            self._finish(request)
        return produced

    def run(self) -> None:
        """Step until every request has finished."""
        while self.has_work:
            self.step()

    def generate(self, prompt: Sequence[int], sampling: SamplingParams | None = None, *,
                 first_token: int | None = None) -> DecodeRequest:
        """Run one request to the end (other queued requests run alongside)."""
        request = self.add_request(prompt, sampling, first_token=first_token)
        while not request.is_finished:
            self.step()
        return request

    def stream(self, prompt: Sequence[int], sampling: SamplingParams | None = None, *,
               first_token: int | None = None) -> Iterator[int]:
        """Yield one request's tokens as they are produced."""
        request = self.add_request(prompt, sampling, first_token=first_token)
        sent = 0
        while True:
            if not request.is_finished:
                self.step()
            while sent < len(request.output):
                yield request.output[sent]
                sent += 1
            if request.is_finished:
                return

    # -- internals -------------------------------------------------------------------------

    def _admit(self, request: DecodeRequest) -> tuple[list[int], LayerLoad]:
        """Pages, cached prefix and uncached tail of a request joining the batch."""
        tokens = request.prompt + ([request.first_token] if request.first_token is not None
                                   else [])
        reserved = self.cache.reserve(request.seq, self.pages_needed(
            len(request.prompt), request.sampling) * self.block_tokens)
        assert reserved, "admitted without room"
        # A request a prefill engine handed over was already looked up there: this lookup
        # is part of the same request, so a daemon's access log should not count it again.
        fetch = self.io.fetch_prefix(
            request.prompt, request.seq,
            max_blocks=fetchable_blocks(len(tokens), self.block_tokens),
            probe=request.first_token is not None, planner=self.planner, overlap=False)
        request.keys, load = fetch.keys, fetch.load
        request.seq.num_tokens = request.num_cached_tokens = load.num_blocks * self.block_tokens
        request.state = RequestState.RUNNING
        self._running.append(request)
        if request.first_token is not None:
            self._emit(request, request.first_token, time.perf_counter())
        return tokens[request.seq.num_tokens:], load

    def _emit(self, request: DecodeRequest, token: int, now_s: float) -> None:
        request.output.append(token)
        request.token_times_s.append(now_s)
        request._pending = token
        if request.on_token is not None:
            request.on_token(request, token)
        if token in request.sampling.stop_token_ids:
            request.finish_reason = FinishReason.STOP
        elif len(request.output) >= request.sampling.max_new_tokens:
            request.finish_reason = FinishReason.LENGTH
        else:
            return
        request.state = RequestState.FINISHED

    def _finish(self, request: DecodeRequest) -> None:
        self._running.remove(request)
        try:
            if self.publish:
                self._publish(request)
        finally:
            self.cache.release(request.seq)

    def _prompt_publisher(self, request: DecodeRequest) -> Publisher:
        """A publisher of the full prompt blocks this step computes (from the last cached
        block, re-put as the anchor that links the new ones to their parent)."""
        full = len(request.prompt) // self.block_tokens
        cached = request.num_cached_tokens // self.block_tokens
        request.num_stored_blocks = cached
        anchor = max(min(cached, full) - 1, 0)
        keys = request.keys[:full] if full > cached else request.keys[:0]
        return self.io.publisher(keys, request.seq, anchor)

    def _publish(self, request: DecodeRequest) -> None:
        """Store the full blocks of prompt + reply not stored yet (the last token sampled
        has no KV yet)."""
        tokens = (request.prompt + request.output)[:request.seq.num_tokens]
        keys = self.io.keys(tokens)
        first_new = request.num_stored_blocks
        if len(keys) <= first_new:
            return
        anchor = max(first_new - 1, 0)
        publisher = self.io.publisher(keys, request.seq, anchor)
        for layer in range(self.model.config.num_layers):
            publisher.after_layer(layer)
        request.num_published_blocks += max(publisher.finish() - (first_new - anchor), 0)

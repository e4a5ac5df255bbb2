"""What `kvstore serve`'s HTTP layer asks of the engines: one request's output as text, as
it is produced, through the conductor (`engines.conductor`).

    HTTP handler ──generate()──> Backend ──Conductor.submit(on_token)──> engine threads
        <── Delta(text, finish) ── asyncio queue <── call_soon_threadsafe(token) ──┘

The text comes from an incremental detokenizer (special tokens skipped); a stop string
ends the request where it starts (the text before it is all that is sent, and the
request is cancelled on its engine at once); text that may be the start of a stop string
is held back until it is known not to be. A client that goes away (the generator is
closed) cancels its request: its pages go back at the engine's next step. Every request
is counted in the serving metrics (`engines.serving.metrics`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from engines.conductor import Conductor, NoEngineError, RequestResult
from engines.decode import DecodeRequest, FinishReason
from engines.kv_io import CacheFullError
from engines.sampling import SamplingParams
from engines.serving.metrics import ServingMetrics

log = logging.getLogger(__name__)


SKIPPED = "this server has no tokenizer (--skip-tokenizer-init)"


class ServingError(Exception):
    """A request that cannot be served as asked: answered with the OpenAI error shape."""

    def __init__(self, message: str, *, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.type, self.param, self.code = status, type, param, code


@dataclass(frozen=True)
class Delta:
    """New text of a request (maybe empty); with ``finish_reason`` (``stop``, ``length``,
    ``abort``) the last one. ``completion_tokens``: tokens generated so far; ``token_ids``:
    the tokens since the previous delta."""

    text: str
    completion_tokens: int
    finish_reason: str | None = None
    result: RequestResult | None = None
    token_ids: tuple[int, ...] = ()


class Backend:
    """The model, its tokenizer and the conductor, as the HTTP layer uses them."""

    def __init__(self, conductor: Conductor, tokenizer: Any, *, model_name: str,
                 max_model_len: int, metrics: ServingMetrics | None = None,
                 vocab_size: int | None = None, eos_token_ids: Sequence[int] = ()) -> None:
        """``tokenizer`` None: token ids in and out only (``--skip-tokenizer-init``), with
        the model's ``vocab_size`` and ``eos_token_ids``."""
        if tokenizer is None and vocab_size is None:
            raise ValueError("without a tokenizer, give the model's vocab_size")
        self.conductor = conductor
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.metrics = metrics or ServingMetrics()
        self.vocab_size = tokenizer.vocab_size if tokenizer is not None else vocab_size
        self.stop_token_ids = tuple(getattr(tokenizer, "eos_token_ids", ()) or ()
                                    if tokenizer is not None else eos_token_ids)
        self.created = int(time.time())

    def healthy(self) -> bool:
        """Whether every engine runs (none is restarting)."""
        return all(w.is_healthy for w in [*self.conductor.prefill, *self.conductor.decode])

    def engines(self) -> dict[str, dict[str, Any]]:
        """Each engine's state, process and restarts, by name (``/health``'s detail)."""
        return {w.name: {"up": w.is_healthy, "pid": getattr(w, "pid", None),
                         "restarts": getattr(w, "restarts", 0)}
                for w in [*self.conductor.prefill, *self.conductor.decode]}

    # -- prompts ---------------------------------------------------------------------------

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        """A completion's prompt: text, or token ids (checked against the vocabulary)."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ServingError(f"{SKIPPED}: send the prompt as token ids", param="prompt")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            vocab = self.vocab_size
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise ServingError(f"prompt token id {bad[0]} is outside the vocabulary "
                                   f"(0..{vocab - 1})", param="prompt")
        if not ids:
            raise ServingError("the prompt is empty", param="prompt")
        return ids

    def chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """A chat's prompt: the model's chat template over ``messages``."""
        if self.tokenizer is None:
            raise ServingError(f"{SKIPPED}: chat needs the model's tokenizer and template; "
                               "send token ids to /v1/completions", param="messages")
        try:
            return self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True)
        except ValueError as e:
            raise ServingError(str(e), param="messages") from e

    def sampling(self, prompt: list[int], *, max_tokens: int | None, temperature: float,
                 top_p: float, seed: int | None, prompt_param: str = "prompt",
                 ignore_eos: bool = False) -> SamplingParams:
        """The engine's sampling for a request, its length checked against the context
        (``max_tokens`` None: whatever the context leaves, as vLLM does)."""
        room = self.max_model_len - len(prompt)
        if max_tokens is None:
            max_tokens = room
        if room < 1 or max_tokens > room:
            raise ServingError(
                f"This model's maximum context length is {self.max_model_len} tokens. "
                f"However, you requested {len(prompt) + max(max_tokens, 1)} tokens "
                f"({len(prompt)} in the {prompt_param}, {max(max_tokens, 1)} in the "
                f"completion). Please reduce the length of the {prompt_param} or completion.",
                param="max_tokens" if room >= 1 else prompt_param,
                code="context_length_exceeded")
        return SamplingParams(max_new_tokens=max_tokens, temperature=temperature,
                              top_p=top_p, seed=seed,
                              stop_token_ids=() if ignore_eos else self.stop_token_ids)

    # -- generating ------------------------------------------------------------------------

    async def generate(self, prompt: list[int], sampling: SamplingParams,
                       stop: Sequence[str] = (), *, request_id: str | None = None
                       ) -> AsyncIterator[Delta]:
        """The request's text as it comes; the last `Delta` carries its finish reason.
        Closing the generator early cancels the request."""
        request_id = request_id or uuid.uuid4().hex
        if self.tokenizer is None and any(stop):
            raise ServingError(f"{SKIPPED}: stop strings need the tokenizer", param="stop")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[int | RequestResult | BaseException] = asyncio.Queue()

        def on_token(_: DecodeRequest, token: int) -> None:  # (an engine's thread)
            loop.call_soon_threadsafe(queue.put_nowait, token)

        def on_done(future: Any) -> None:
            error = future.exception()
            loop.call_soon_threadsafe(queue.put_nowait,
                                      future.result() if error is None else error)

        arrived = time.perf_counter()
        self.metrics.started()
        try:
            future = self.conductor.submit(prompt, sampling, request_id=request_id,
                                           on_token=on_token)
        except CacheFullError as e:  # no engine could ever hold it
            self.metrics.finished()
            raise ServingError(str(e), param="max_tokens") from e
        except NoEngineError as e:  # every decode engine is restarting
            self.metrics.finished()
            raise ServingError(str(e), status=503, type="ServiceUnavailableError") from e
        except Exception:
            self.metrics.finished()
            raise
        future.add_done_callback(on_done)
        text = _StopText(self.tokenizer.stream_decoder(skip_special_tokens=True)
                         if self.tokenizer is not None else _NoText(), stop)
        num_tokens, finished, stamps, ids = 0, False, [], []
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if isinstance(item, RequestResult):
                    finished = True
                    reason = text.finish_reason or (
                        item.finish_reason or FinishReason.STOP).value
                    self._record(item, arrived, stamps, reason)
                    yield Delta(text.rest(), num_tokens, reason, item, tuple(ids))
                    return
                if text.finish_reason is not None:
                    continue  # (cancelled at a stop string; tokens already on their way)
                num_tokens += 1
                stamps.append(time.perf_counter())
                ids.append(item)
                piece = text.push(item)
                if text.finish_reason is not None:  # a stop string: nothing more is wanted
                    self.conductor.cancel(request_id)
                if piece or self.tokenizer is None:  # (no text: each token as it comes)
                    yield Delta(piece, num_tokens, token_ids=tuple(ids))
                    ids = []
        finally:
            if not finished:  # the client went away, or an error here: stop the engine
                self.conductor.cancel(request_id)
                self.metrics.cancelled()
            self.metrics.finished()

    def _record(self, result: RequestResult, arrived: float, stamps: list[float],
                finish_reason: str) -> None:
        self.metrics.request_done(
            route="disaggregated" if result.route.is_disaggregated else "colocated",
            finish_reason=finish_reason, ttft_s=stamps[0] - arrived if stamps else math.nan,
            inter_token_s=[b - a for a, b in itertools.pairwise(stamps)],
            prompt_tokens=len(result.prompt), fetched_tokens=result.num_cached_tokens)


class _NoText:
    """The decoder of a server with no tokenizer: no text."""

    def push(self, token: int) -> str:
        return ""

    def finish(self) -> str:
        return ""


class _StopText:
    """A request's text, cut at the first of ``stops``: `push` a token, get the text that
    is safe to send (none that could be the start of a stop string); `rest` at the end."""

    def __init__(self, decoder: Any, stops: Sequence[str]) -> None:
        self.decoder = decoder
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""  # everything decoded (up to a stop string, once one is found)
        self.sent = 0
        self.finish_reason: str | None = None

    def push(self, token: int) -> str:
        self.text += self.decoder.push(token)
        self._cut()
        end = len(self.text) if self.finish_reason else max(self.sent,
                                                            len(self.text) - self.hold)
        return self._take(end)

    def rest(self) -> str:
        if self.finish_reason is None:
            self.text += self.decoder.finish()
            self._cut()
        return self._take(len(self.text))

    def _cut(self) -> None:
        if self.finish_reason is not None or not self.stops:
            return
        start = max(0, self.sent - self.hold)
        found = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if found:
            self.text = self.text[:min(found)]
            self.finish_reason = "stop"

    def _take(self, end: int) -> str:
        piece, self.sent = self.text[self.sent:end], max(self.sent, end)
        return piece

"""The prefill engine: computes a prompt's KV and publishes it to the store.

For each prompt: match the longest prefix the store already holds and fetch it (so a
shared system prompt or an earlier turn is not recomputed), compute the rest layer by
layer, and publish every new full block while the next layer computes (`engines.kv_io`).
Blocks the store already has are not written again, except the last of them, which is
re-put in front of the new ones so the store links the new blocks to their parent
(prefix-aware eviction needs the chain). Returns the first generated token: in a
disaggregated deployment the decode engine continues from it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from engines.fetch_plan import FetchPlan, FetchPlanner
from engines.kv_io import CacheFullError, KVBlockIO, fetchable_blocks
from engines.model import LlamaModel
from engines.paged_cache import SequenceKV
from engines.sampling import SamplingParams, sample


@dataclass
class PrefillResult:
    request_id: str
    first_token: int
    num_prompt_tokens: int
    num_cached_tokens: int  # reused from the store, not computed
    num_published_blocks: int
    fetch_s: float
    compute_s: float
    publish_s: float  # the part of publishing not hidden behind compute
    ttft_s: float
    plan: FetchPlan | None = None  # with a planner: what it chose for the cached prefix


class PrefillEngine:
    def __init__(self, model: LlamaModel, store: Any, *, num_pages: int | None = None,
                 block_tokens: int = 16, cuda_graphs: bool = True,
                 planner: FetchPlanner | None = None, kv_codec: str | None = None) -> None:
        """``planner``: decide per request which cached blocks to load and which to
        compute again (`engines.fetch_plan`); without one every cached block is loaded.
        ``kv_codec``: store blocks compressed (`kvstore.codec`, ``"fp8"``: half the
        bytes, lossy), in a namespace of their own."""
        self.model = model
        self.planner = planner
        if num_pages is None:
            num_pages = -(-model.config.max_position_tokens // block_tokens)
        self.cache = model.new_cache(num_pages=num_pages, page_tokens=block_tokens,
                                     cuda_graphs=cuda_graphs)
        self.io = KVBlockIO(model, self.cache, store, codec=kv_codec)
        self.block_tokens = block_tokens

    def capture_graphs(self) -> None:
        """Capture the forward's CUDA graphs now (`LlamaModel.capture_graphs`)."""
        self.model.capture_graphs(self.cache)

    def close(self) -> None:
        self.io.close()

    def __enter__(self) -> PrefillEngine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def prefill(self, prompt: Sequence[int], sampling: SamplingParams | None = None, *,
                request_id: str | None = None, publish: bool = True) -> PrefillResult:
        """Compute and publish ``prompt``'s KV; return its first generated token. With
        ``publish=False`` nothing is stored (a compute-only run)."""
        start_s = time.perf_counter()
        prompt = list(prompt)
        if not prompt:
            raise ValueError("prefill needs at least one prompt token")
        if len(prompt) > self.model.config.max_position_tokens:
            raise ValueError(f"prompt of {len(prompt)} tokens exceeds the model's "
                             f"{self.model.config.max_position_tokens}")
        sampling = (sampling or SamplingParams(max_new_tokens=1)).with_seed()
        seq = SequenceKV()
        if not self.cache.reserve(seq, len(prompt)):
            raise CacheFullError(f"no room for {len(prompt)} tokens in the prefill cache")
        try:
            fetch = self.io.fetch_prefix(
                prompt, seq, max_blocks=fetchable_blocks(len(prompt), self.block_tokens),
                planner=self.planner)
            keys, num_stored, load = fetch.keys, fetch.num_stored_blocks, fetch.load
            middle, bt = fetch.middle, self.block_tokens
            seq.num_tokens = load.num_blocks * bt
            fetched_s = time.perf_counter()
            try:
                if middle is not None:
                    # Compute up to the middle blocks while they load, then go on from
                    # wherever their load ended (a block it could not get is computed).
                    head_end = middle.first_page * bt
                    if head_end > seq.num_tokens:
                        self.model.forward(self.cache, [(seq, prompt[seq.num_tokens:head_end])],
                                           before_layer=load.wait)
                    seq.num_tokens = (middle.first_page + middle.settle()) * bt
                loaded = seq.num_tokens // bt  # the leading blocks in the pages now
                # Publish from the last stored block on (see the module docstring);
                # nothing when every block is stored and only the last one, which must
                # run, was not fetched.
                first_new = min(loaded, num_stored)
                anchor = max(first_new - 1, 0)
                publish = publish and not (num_stored == len(keys) and loaded >= len(keys) - 1)
                publisher = self.io.publisher(keys if publish else keys[:0], seq, anchor)

                def before_layer(layer: int) -> None:
                    load.wait(layer)
                    if middle is not None:
                        middle.wait(layer)

                loading = load.num_blocks > 0 or middle is not None
                logits = self.model.forward(self.cache, [(seq, prompt[seq.num_tokens:])],
                                            before_layer=before_layer if loading else None,
                                            after_layer=publisher.after_layer)
            finally:
                try:
                    load.wait_all()  # gives back what the fetch borrowed from the store
                finally:
                    if middle is not None:
                        middle.wait_all()
            first_token = sample(logits[0], sampling, 0)
            computed_s = time.perf_counter()
            published = max(publisher.finish() - (first_new - anchor), 0)
            done_s = time.perf_counter()
        finally:
            self.cache.release(seq)
        num_loaded = load.num_blocks + (middle.num_blocks if middle is not None else 0)
        return PrefillResult(
            request_id=request_id or uuid.uuid4().hex[:12], first_token=first_token,
            num_prompt_tokens=len(prompt),
            num_cached_tokens=num_loaded * self.block_tokens,
            num_published_blocks=published, fetch_s=fetched_s - start_s,
            compute_s=computed_s - fetched_s, publish_s=done_s - computed_s,
            ttft_s=computed_s - start_s, plan=fetch.plan)

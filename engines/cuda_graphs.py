"""Piecewise CUDA graphs of the forward: everything but attention, replayed per layer.

A forward of a few tokens over a long cached context (the uncached tail of a prompt whose
prefix came from the store, a batched decode step) does little GPU work per kernel, and
the host's launching of ~12 kernels a layer is what takes the time: 8K tokens of llama3-8b
on the H100 spend 12-23 ms launching 9 ms of GPU work, and a tail's TTFT after a fetch
from DRAM then ends with the host, not with the copy. So the per-token parts of each
layer are captured once per token count and replayed (as vLLM's piecewise graphs do);
attention, whose shapes follow each sequence's context length, runs eagerly between them::

    P: embed the tokens, rotary tables
    A_i: norm, QKV, rotate q and k, write K and V to the cache   (graph)
    attention of each sequence over its pages                    (eager)
    B_i: output projection + residual, norm, MLP + residual      (graph)

The layer hooks run between the pieces, as in the eager forward: ``before_layer(i)``
(a stream wait for layer i's fetched KV) before A_i, ``after_layer(i)`` after B_i.

Where Triton runs (`engines.paged_attention`), a decode step (one token a sequence, one
sequence or several) and a forward of several sequences up to `FUSED_MAX_TOKENS` tokens
hold attention too: each layer is one graph ``A_i, paged attention, B_i``, and the
attention reads each row's context and each sequence's page table from the bucket's
buffers. Such a step is then 33 graph replays and no eager kernel, where eager attention
costs a few launches per sequence and layer, each waiting on the host. One sequence's
tail of several tokens keeps eager SDPA (it measured faster for a tail of 16); a lone
decode step is fused because eager SDPA left it to the host: in `kvstore serve` its steps
took 40 ms on the H100, cuDNN's attention planning per new length (docs/BENCHMARKS.md)::

    L_i: norm, QKV, rotate, write K and V, attention over the pages, output projection
         + residual, norm, MLP + residual                         (graph)

Graphs exist per bucket of token counts (`BUCKETS`); a forward of ``n`` tokens runs the
smallest bucket that holds them, its extra rows padded: token 0 at position 0, writing
K and V into the cache's pad page (never a sequence's), their outputs never read. A
forward whose token count is a bucket's and whose attention is eager gives the eager
forward's logits bit for bit; padded, its GEMMs have more rows and may round differently,
and paged attention rounds as its own kernel does (within the tests' tolerances).

Each bucket's graphs read their inputs from and write their outputs to static buffers of
that bucket, allocated outside the graphs. All graphs of one cache share one memory pool,
which is safe because nothing a graph allocates there outlives its replay: every tensor
passed from one piece to the next is a static buffer, and the forwards over one cache
never overlap (they run on one stream, one at a time).

Only a cache built with ``cuda_graphs=True`` on a CUDA device gets graphs (the engines'
caches); a forward of more tokens than the largest bucket is compute-bound and runs
eagerly, as does everything on the CPU. The model owns the graphs of its forwards over
each cache (`LlamaModel.graphs`); what they capture of it is `GraphedModel`.
"""

from __future__ import annotations

import bisect
import gc
import logging
import weakref
from collections.abc import Callable
from typing import Protocol

import torch

from engines import paged_attention
from engines.config import ModelConfig
from engines.paged_cache import PagedKVCache, SequenceKV

log = logging.getLogger(__name__)

# Powers of two up to 128 (decode steps, short tails), then steps of 64: a forward of a
# few hundred tokens is near compute-bound, where padding to twice the rows would cost.
BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 192, 256, 320, 384, 448, 512)
# The largest bucket whose layers hold their attention (paged attention's tiles of 16 rows
# read a sequence's context once per 16 new tokens: past this, eager SDPA reads less).
FUSED_MAX_TOKENS = 64
# A lone tail paced by a load fused (`ForwardGraphs.for_tokens`). Off until it has been
# timed and its GPU tests run on a GPU (written 2026-12-07 from a profile, when no GPU
# could be had): `ttft_bench.py --fuse-paced-tail` measures it.
FUSE_PACED = False


class GraphedModel(Protocol):
    """The pieces of a model's forward that the graphs capture (`engines.model.LlamaModel`
    has them): the embedding and rotary tables (P), and each layer's work before (A_i) and
    after (B_i) its attention."""

    config: ModelConfig
    paged_attention: bool  # False: attention always runs eagerly between the graphs

    @property
    def dtype(self) -> torch.dtype: ...

    def embed(self, tokens: torch.Tensor) -> torch.Tensor: ...

    def rope_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def layer_in(self, cache: PagedKVCache, layer: int, h: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor, slots: torch.Tensor) -> torch.Tensor: ...

    def layer_out(self, layer: int, h: torch.Tensor, attention: torch.Tensor
                  ) -> torch.Tensor: ...


def bucket_for(num_tokens: int) -> int | None:
    """The smallest bucket holding ``num_tokens`` tokens; None above the largest."""
    i = bisect.bisect_left(BUCKETS, num_tokens)
    return BUCKETS[i] if i < len(BUCKETS) else None


class ForwardGraphs:
    """The graphs of one model over one cache, per bucket, captured on first use."""

    def __init__(self, model: GraphedModel, cache: PagedKVCache) -> None:
        if cache.pad_slot is None:
            raise ValueError("CUDA graphs need a cache with a pad page (cuda_graphs=True)")
        # Weak: the model holds these graphs (and they go with the cache), and a cycle would
        # leave them to the garbage collector, which may run in the middle of another
        # cache's capture.
        self._model = weakref.ref(model)
        self._cache = weakref.ref(cache)
        self._pool = torch.cuda.graph_pool_handle()
        self._stream = torch.cuda.Stream(device=cache.device)
        # (bucket, fused) -> its graphs; None: capture failed
        self._buckets: dict[tuple[int, bool], BucketGraphs | None] = {}
        config = model.config
        # Whether the fused forwards' graphs hold their attention (`_fused`): off for good
        # once the paged kernels fail here (their compile or launch), so the forward still
        # runs.
        self.paged = (getattr(model, "paged_attention", True)
                      and paged_attention.available(cache.device)
                      and paged_attention.supports(config.num_heads, config.num_kv_heads,
                                                   config.head_dim))

    def for_tokens(self, num_tokens: int, sequences: int = 1, *,
                   paced: bool = False) -> BucketGraphs | None:
        """The graphs of a forward of ``num_tokens`` tokens of ``sequences`` sequences;
        None: run it eagerly. Fused (attention inside) for a decode step and for a batch
        of several sequences up to `FUSED_MAX_TOKENS`: there the eager attention costs a
        few launches per sequence and layer. One sequence's tail of several tokens keeps
        eager SDPA between the pieces (on the GPU it measured as fast or faster for a
        tail of 16, docs/BENCHMARKS.md), unless ``paced``: its layers wait for a load
        (a prefix fetched while the forward runs), where the eager forward's host work,
        some 0.3 ms a layer, is what the load's copies wait on; fused, a layer is one
        graph launch."""
        bucket = bucket_for(num_tokens)
        if bucket is None:
            return None
        key = (bucket, self._fused(bucket, sequences)
               or (paced and FUSE_PACED and self._fused(bucket, 2)))
        if key not in self._buckets:
            self._capture([key])
        if key[1] and not self.paged:  # the paged kernels failed in this capture
            return self.for_tokens(num_tokens, 1)
        return self._buckets[key]

    def capture_all(self) -> None:
        """Capture every bucket now (an engine starting up), not on its first forward:
        each bucket's graphs for one sequence (fused for a decode step), and for several
        where they are fused. (If the paged kernels fail later, the eager variant is
        captured on first use.)"""
        keys = [(bucket, False) for bucket in BUCKETS if not self._fused(bucket, 1)]
        keys += [(bucket, True) for bucket in BUCKETS if self._fused(bucket, bucket)]
        self._capture([key for key in keys if key not in self._buckets])

    def _fused(self, bucket: int, sequences: int) -> bool:
        return self.paged and bucket <= FUSED_MAX_TOKENS and (sequences > 1 or bucket == 1)

    def _capture(self, keys: list[tuple[int, bool]]) -> None:
        model, cache = self._model(), self._cache()
        assert model is not None and cache is not None, "graphs outlived their model or cache"
        # Garbage collected now, and not during the captures: a finalizer freeing CUDA
        # memory (pinned pages, another cache's graphs) would invalidate one.
        gc.collect()
        was_collecting = gc.isenabled()
        gc.disable()
        try:
            for bucket, fused in keys:
                if fused and not self.paged:
                    continue
                graphs, error = self._try_capture(model, cache, bucket, fused)
                if graphs is None and fused:  # the paged kernels failed (or the capture)
                    self.paged = False
                    log.warning("paged attention failed in the graphs of %d tokens (%s: "
                                "%s); attention runs eagerly between the pieces", bucket,
                                type(error).__name__, error)
                    if (bucket, False) in self._buckets:
                        continue
                    fused = False
                    graphs, error = self._try_capture(model, cache, bucket, False)
                if graphs is None:
                    log.warning("capturing the forward of %d tokens failed (%s); it runs "
                                "eagerly", bucket, error)
                self._buckets[bucket, fused] = graphs
        finally:
            if was_collecting:
                gc.enable()

    def _try_capture(self, model: GraphedModel, cache: PagedKVCache, bucket: int,
                     fused: bool) -> tuple[BucketGraphs | None, Exception | None]:
        """A bucket's graphs, or None and why: out of memory, an op the capture refused, or
        (``fused``) any failure of the paged kernels."""
        try:
            return BucketGraphs(model, cache, bucket, self._pool, self._stream,
                                fused=fused), None
        except Exception as e:
            if not fused and not isinstance(e, RuntimeError):
                raise
            # A failed capture can leave its pool and stream unusable for the next.
            self._pool = torch.cuda.graph_pool_handle()
            self._stream = torch.cuda.Stream(device=cache.device)
            return None, e

    @property
    def captured(self) -> dict[int, bool]:
        """Each bucket met so far: True if its graphs run (each variant captured: for one
        sequence, fused for several or for a decode step), False if a capture failed."""
        met: dict[int, bool] = {}
        for (bucket, _), graphs in self._buckets.items():
            met[bucket] = met.get(bucket, True) and graphs is not None
        return met


class BucketGraphs:
    """One bucket's graphs (P, then A_i and B_i of each layer, or one graph L_i per layer
    with paged attention inside) and their static buffers."""

    def __init__(self, model: GraphedModel, cache: PagedKVCache, num_tokens: int,
                 pool: tuple[int, int], stream: torch.cuda.Stream, *, fused: bool) -> None:
        """``fused``: each layer one graph with paged attention inside (`ForwardGraphs`
        decides where the kernels can run)."""
        config, device = model.config, cache.device
        self.num_tokens = num_tokens
        self.fused = fused
        # Inputs, one row each (one upload): token ids, positions, cache slots; fused, also
        # the tiles' table (`paged_attention.TILE_FIELDS`) and each row's validity.
        num_inputs = 3 + (len(paged_attention.TILE_FIELDS) + 1 if self.fused else 0)
        self._inputs = torch.zeros(num_inputs, num_tokens, dtype=torch.long, device=device)
        self._pad = torch.zeros(num_inputs, 1, dtype=torch.long)
        self._pad[2] = cache.pad_slot
        self._h = torch.empty(num_tokens, config.hidden_size, dtype=model.dtype,
                              device=device)
        self._q = torch.empty(num_tokens, config.num_heads, config.head_dim,
                              dtype=model.dtype, device=device)
        # Attention's output goes here (eager or paged); padding rows stay zero.
        self.attention = torch.zeros_like(self._q)
        self._cos = torch.empty(num_tokens, 1, config.head_dim, dtype=model.dtype,
                                device=device)
        self._sin = torch.empty_like(self._cos)
        tokens, positions, slots = self._inputs[:3]
        slots.fill_(cache.pad_slot)  # the warm-up and captures write the pad page only

        def embed() -> None:
            self._h.copy_(model.embed(tokens))
            cos, sin = model.rope_tables(positions)
            self._cos.copy_(cos)
            self._sin.copy_(sin)

        def layer_in(i: int) -> Callable[[], None]:
            def run() -> None:
                self._q.copy_(model.layer_in(cache, i, self._h, self._cos, self._sin, slots))
            return run

        def layer_out(i: int) -> Callable[[], None]:
            def run() -> None:
                self._h.copy_(model.layer_out(i, self._h, self.attention))
            return run

        pieces = [embed]
        if self.fused:
            self._attend = paged_attention.PagedAttention(
                num_rows=num_tokens, num_heads=config.num_heads,
                num_kv_heads=config.num_kv_heads, head_dim=config.head_dim,
                page_tokens=cache.page_tokens, device=device)
            # Each sequence's page table, a row per sequence (a forward has at most a
            # sequence per token); a sequence may own every page of the cache.
            self._pages = torch.zeros(num_tokens, cache.num_pages, dtype=torch.int32,
                                      device=device)
            tiles, valid = self._inputs[3:7], self._inputs[7]

            def layer(i: int) -> Callable[[], None]:
                def run() -> None:
                    layer_in(i)()
                    self._attend(self._q, cache.kv[i], tiles, self._pages, valid,
                                 self.attention)
                    layer_out(i)()
                return run

            pieces += [layer(i) for i in range(config.num_layers)]
        else:
            for i in range(config.num_layers):
                pieces += [layer_in(i), layer_out(i)]
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for piece in pieces:  # warm-up: lazy initialisation stays out of the graphs
                piece()
            stream.synchronize()
            self._graphs = [_capture(piece, pool) for piece in pieces]
        torch.cuda.current_stream(device).wait_stream(stream)

    def start(self, tokens: list[int], positions: torch.Tensor, slots: torch.Tensor,
              batch: list[tuple[SequenceKV, int]] | None = None) -> None:
        """Load a forward's inputs (padded to the bucket) and embed them (P). Fused, the
        attention's too: ``batch`` is each sequence with its count of new tokens, in row
        order (their cached tokens not yet counted in ``num_tokens``)."""
        n = len(tokens)
        inputs = torch.empty(self._inputs.shape, dtype=torch.long, pin_memory=True)
        inputs[0, :n] = torch.tensor(tokens, dtype=torch.long)
        inputs[1, :n] = positions
        inputs[2, :n] = slots
        inputs[:, n:] = self._pad
        if self.fused:
            if batch is None:
                raise ValueError("a fused forward needs its batch of sequences")
            paged_attention.fill_tiles(inputs[3:7], [(seq.num_tokens, k) for seq, k in batch],
                                       self._attend.tile_rows)
            inputs[7, :n] = 1
            page_tokens = self._attend.page_tokens
            width = max(-(-(seq.num_tokens + k) // page_tokens) for seq, k in batch)
            tables = paged_attention.page_tables([seq.pages for seq, _ in batch], width,
                                                 pin=True)
            # Pinned by the caching host allocator: not reused before these copies are done.
            self._pages[:len(batch), :width].copy_(tables, non_blocking=True)
        self._inputs.copy_(inputs, non_blocking=True)
        self._graphs[0].replay()

    def layer(self, layer: int) -> None:
        """Replay L_``layer`` (fused graphs only): the whole layer, attention included."""
        self._graphs[1 + layer].replay()

    def layer_in(self, layer: int) -> torch.Tensor:
        """Replay A_``layer``; returns the rotated queries (all rows of the bucket)."""
        self._graphs[1 + 2 * layer].replay()
        return self._q

    def layer_out(self, layer: int) -> None:
        """Replay B_``layer`` over what the eager attention left in `attention`."""
        self._graphs[2 + 2 * layer].replay()

    @property
    def hidden(self) -> torch.Tensor:
        """The hidden states after the last layer replayed (all rows of the bucket)."""
        return self._h


def _capture(piece: Callable[[], None], pool: tuple[int, int]) -> torch.cuda.CUDAGraph:
    """A graph of what ``piece`` launches on the current stream (the capture stream)."""
    graph = torch.cuda.CUDAGraph()
    graph.capture_begin(pool=pool, capture_error_mode="thread_local")
    try:
        piece()
    except BaseException:
        try:  # ends the broken capture; its own error only repeats that one
            graph.capture_end()
        except RuntimeError:
            try:
                _end_generator_capture()
            except RuntimeError as e:  # the capture's own error is the one to raise
                log.warning("could not reset the CUDA generators after a failed capture "
                            "(%s); random sampling may fail in this process", e)
        raise
    graph.capture_end()
    return graph


def _end_generator_capture() -> None:
    """Tell the CUDA random generators that no capture is under way.

    `capture_begin` marks them capturing and `capture_end` unmarks them only after the
    capture ended well. After one that failed every later random op of the process (a
    sampler's `torch.multinomial`) raised "Offset increment outside graph capture". A
    capture of one op, on a new stream (the failed capture's may be unusable), unmarks
    them. Thread-local: other threads' CUDA calls are not refused meanwhile (their random
    ops are, for the instant of this capture, as during any capture)."""
    device = torch.cuda.current_device()
    with torch.cuda.stream(torch.cuda.Stream(device=device)):
        scratch = torch.zeros(1, device=device)
        graph = torch.cuda.CUDAGraph()
        graph.capture_begin(capture_error_mode="thread_local")
        scratch.add_(1)
        graph.capture_end()

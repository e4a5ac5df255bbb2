"""A Llama-family decoder in torch: RMSNorm, rotary embeddings (with Llama 3 scaling),
grouped-query attention, SwiGLU, tied or untied embeddings, over a paged KV cache.

One `forward` serves every phase: it takes a ragged batch, one chunk of new tokens per
sequence, each continuing where that sequence's cached KV ends. A whole prompt, the
uncached tail of a prompt whose prefix came from the store, and a batched decode step
(one token for each of several sequences) are all the same call. The projections and
the MLP run once over the concatenated tokens; attention runs per sequence over its pages.

Layer hooks let the engines overlap transfers with compute: ``before_layer(i)`` runs
before layer i reads the cache (decode waits there for layer i's fetched KV) and
``after_layer(i)`` after layer i has written it (prefill publishes layer i there while
layer i+1 computes).

Numerics follow Hugging Face's `LlamaForCausalLM` (RMSNorm in fp32, rotary tables in fp32
cast to the model dtype, softmax scale 1/sqrt(head_dim)), so logits match it.
"""

from __future__ import annotations

import hashlib
import math
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from engines.config import ModelConfig, ModelLoadError
from engines.cuda_graphs import ForwardGraphs
from engines.paged_cache import PagedKVCache, SequenceKV, to_device
from engines.sampling import SamplingParams, sample

LayerHook = Callable[[int], None]


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused kernel, accumulating in fp32. In fp32 it is Hugging Face's arithmetic
        # exactly; in bf16 the weight is applied before the cast back instead of after
        # (a rounding's difference, for two fewer kernels per norm).
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        q_dim = config.num_heads * config.head_dim
        kv_dim = config.num_kv_heads * config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, kv_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, kv_dim, bias=False)
        self.o_proj = nn.Linear(q_dim, config.hidden_size, bias=False)
        self.qkv_weight: torch.Tensor | None = None  # q, k, v stacked: one matmul (fuse())

    def fuse(self) -> None:
        """Stack q, k and v into one weight, the projections becoming views of it."""
        stacked = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
        q, k = self.q_proj.weight.shape[0], self.k_proj.weight.shape[0]
        self.q_proj.weight = nn.Parameter(stacked[:q], requires_grad=False)
        self.k_proj.weight = nn.Parameter(stacked[q:q + k], requires_grad=False)
        self.v_proj.weight = nn.Parameter(stacked[q + k:], requires_grad=False)
        self.qkv_weight = stacked


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

        self.gate_up_weight: torch.Tensor | None = None  # gate and up stacked (fuse())

    def fuse(self) -> None:
        stacked = torch.cat([self.gate_proj.weight, self.up_proj.weight])
        n = self.gate_proj.weight.shape[0]
        self.gate_proj.weight = nn.Parameter(stacked[:n], requires_grad=False)
        self.up_proj.weight = nn.Parameter(stacked[n:], requires_grad=False)
        self.gate_up_weight = stacked

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The MLP of ``x``, plus ``residual`` when given (in the last GEMM)."""
        if self.gate_up_weight is None:
            act = F.silu(self.gate_proj(x)) * self.up_proj(x)
        else:
            gate, up = F.linear(x, self.gate_up_weight).chunk(2, dim=-1)
            act = F.silu(gate) * up
        if residual is None:
            return self.down_proj(act)
        return torch.addmm(residual, act, self.down_proj.weight.t())


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)


class Decoder(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Rotary inverse frequencies (fp32), with Llama 3's scaling when configured."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    low_wavelen = scaling.original_max_position_tokens / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_tokens / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = ((scaling.original_max_position_tokens / wavelen - scaling.low_freq_factor)
              / (scaling.high_freq_factor - scaling.low_freq_factor))
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


# The attention kernels the eager forward lets SDPA choose from: not cuDNN's, which torch
# prefers on recent GPUs and which builds an execution plan for each new shape; here the
# shapes keep changing (a decode step attends over one more token, each fresh prompt has
# its own length; a chunk over a cached prefix, with its lower-right mask, never reached
# cuDNN). On the H100 (torch 2.11) one-sequence decode steps took 40-45 ms in `kvstore
# serve` and in a fresh process's first request, 7.3 ms over lengths the process had met
# before, and a profile put 94% of the step's host time inside the attention call.
# `decode_bench.py --sdpa-cudnn` then measured it: 46-48 ms a step over a growing context
# with cuDNN's kernel allowed, 7.8-9.5 ms without. Flash and memory-efficient attention
# take any length.
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# Those flags are the process's, not a thread's: engines on threads of one process (the
# demo, tests) share one setting while any of their forwards runs, counted here, so that
# the last forward out gives back what the process had when the first went in (a save
# and restore per forward would leave cuDNN's kernel off for good when two forwards
# overlap). Other code that sets the flags while a forward runs has its change undone.
_sdpa_lock = threading.Lock()
_sdpa_users = 0
_sdpa_context: AbstractContextManager[None] | None = None


@contextmanager
def _sdpa_backends() -> Iterator[None]:
    """SDPA restricted to `SDPA_BACKENDS` while any forward of this process is inside."""
    global _sdpa_users, _sdpa_context
    with _sdpa_lock:
        if _sdpa_users == 0:
            _sdpa_context = sdpa_kernel(SDPA_BACKENDS)
            _sdpa_context.__enter__()
        _sdpa_users += 1
    try:
        yield
    finally:
        with _sdpa_lock:
            _sdpa_users -= 1
            if _sdpa_users == 0 and _sdpa_context is not None:
                _sdpa_context.__exit__(None, None, None)
                _sdpa_context = None


def causal_mask(start: int, num_new: int) -> Any:
    """The attention mask of ``num_new`` tokens after ``start`` cached ones: causal,
    aligned to the lower right (token i sees positions up to ``start + i``). None where
    SDPA's own flag does (a lone token sees everything; a fresh prompt is plain causal)."""
    if num_new == 1 or start == 0:
        return None
    return causal_lower_right(num_new, start + num_new)


class LlamaModel(nn.Module):
    """The model. Build it with `from_state_dict` or `random`; run it with `forward` over a
    `PagedKVCache`, or `generate` for the whole reference path in one place."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        self.lm_head = None if config.tie_embeddings else nn.Linear(
            config.hidden_size, config.vocab_size, bias=False)
        self.model_id = config.name  # completed by the builders with a weights digest
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        # The CUDA graphs of this model's forwards over each cache, made on first use: the
        # runner owns them and the cache stays plain tensors. They go with their cache.
        self._graphs: weakref.WeakKeyDictionary[PagedKVCache, ForwardGraphs] = (
            weakref.WeakKeyDictionary())
        # Graphs of short forwards hold their attention (`engines.paged_attention`) where
        # Triton runs; False keeps attention eager between them (set before any capture).
        self.paged_attention = True

    # -- building --------------------------------------------------------------------------

    @classmethod
    def from_state_dict(cls, config: ModelConfig, weights: dict[str, torch.Tensor], *,
                        dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu") -> LlamaModel:
        """A model holding ``weights`` (Hugging Face names), cast to ``dtype`` on ``device``."""
        with torch.device("meta"):
            model = cls(config)
        expected = set(model.state_dict())
        missing = sorted(expected - set(weights))
        if missing:
            raise ModelLoadError(f"{config.name}: checkpoint lacks {len(missing)} weights, "
                                 f"e.g. {missing[:3]}")
        tensors = {}
        for name in expected:
            tensor = weights[name]
            want = tuple(model.state_dict()[name].shape)
            if tuple(tensor.shape) != want:
                raise ModelLoadError(f"{config.name}: weight {name} has shape "
                                     f"{tuple(tensor.shape)}, the config needs {want}")
            tensors[name] = tensor.to(device=device, dtype=dtype)
        model.load_state_dict(tensors, assign=True)
        model.inv_freq = rope_inv_freq(config).to(device)
        model.model_id = f"{config.name}@{weights_digest(tensors)}"
        return model._fused()

    @classmethod
    def random(cls, config: ModelConfig, *, seed: int, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> LlamaModel:
        """Seeded random weights (normal, std 0.02; norms at 1): real shapes, real cost."""
        device = torch.device(device)
        with torch.device("meta"):
            model = cls(config)
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
        tensors = {}
        for name, param in sorted(model.state_dict().items()):
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(param.shape, dtype=dtype, device=device)
            else:
                t = torch.empty(param.shape, dtype=torch.float32, device=device)
                tensors[name] = t.normal_(0.0, 0.02, generator=generator).to(dtype)
        model.load_state_dict(tensors, assign=True)
        model.inv_freq = rope_inv_freq(config).to(device)
        model.model_id = f"{config.name}@seed{seed}"
        return model._fused()

    def _fused(self) -> LlamaModel:
        """Eval mode, no grads, and the stacked weights that save matmuls per layer."""
        self.eval().requires_grad_(False)
        for layer in self.model.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()
        return self

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def new_cache(self, *, num_pages: int, page_tokens: int = 16,
                  cuda_graphs: bool = False) -> PagedKVCache:
        """A paged cache for this model; ``cuda_graphs``: forwards over it replay CUDA
        graphs where they can (`engines.cuda_graphs`; ignored off CUDA). For a cache that
        lives long (an engine's): each bucket of token counts is captured on first use."""
        return PagedKVCache(self.config, num_pages=num_pages, page_tokens=page_tokens,
                            dtype=self.dtype, device=self.device, cuda_graphs=cuda_graphs)

    def graphs(self, cache: PagedKVCache) -> ForwardGraphs:
        """The CUDA graphs of this model's forward over ``cache`` (made on first use)."""
        if not cache.has_graphs:
            raise ValueError("this cache was built without cuda_graphs=True on a GPU")
        graphs = self._graphs.get(cache)
        if graphs is None:
            graphs = self._graphs[cache] = ForwardGraphs(self, cache)
        return graphs

    def capture_graphs(self, cache: PagedKVCache) -> None:
        """Capture the forward's graphs over ``cache`` for every bucket now, so that no
        request pays for it (`engines.cuda_graphs`); nothing for a cache without graphs."""
        if cache.has_graphs:
            self.graphs(cache).capture_all()

    # -- running ---------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, cache: PagedKVCache, batch: Sequence[tuple[SequenceKV, Sequence[int]]],
                *, all_logits: bool = False, before_layer: LayerHook | None = None,
                after_layer: LayerHook | None = None) -> torch.Tensor:
        """Run the new tokens of each sequence; return the logits of each chunk's last token
        (``[len(batch), vocab]``), or of every token with ``all_logits``.

        Each sequence must already have pages for all its tokens (`PagedKVCache.reserve`);
        its ``num_tokens`` advances by its chunk's length. On a cache built with
        ``cuda_graphs=True`` a forward of a few tokens (up to `cuda_graphs.BUCKETS`'s
        largest) replays CUDA graphs of each layer around its attention
        (`engines.cuda_graphs`): the same kernels, far fewer launches.
        ``before_layer(i)`` runs before layer i (a load's wait, see `engines.kv_io`):
        pass it only when there is something to wait for (a forward so paced runs
        layers as single graphs where it can: `ForwardGraphs.for_tokens`).
        """
        lengths = [len(tokens) for _, tokens in batch]
        if not batch or min(lengths) == 0:
            raise ValueError("forward needs at least one sequence, each with new tokens")
        for seq, n in zip((s for s, _ in batch), lengths, strict=True):
            if len(seq.pages) * cache.page_tokens < seq.num_tokens + n:
                raise ValueError("sequence has too few pages: reserve them first")
        tokens = [t for _, chunk in batch for t in chunk]
        positions = torch.cat([torch.arange(s.num_tokens, s.num_tokens + n)
                               for (s, _), n in zip(batch, lengths, strict=True)])
        slots = torch.cat([s.slots(s.num_tokens, s.num_tokens + n, cache.page_tokens)
                           for (s, _), n in zip(batch, lengths, strict=True)])
        num_new = len(tokens)
        graphs = (self.graphs(cache).for_tokens(num_new, len(batch),
                                                paced=before_layer is not None)
                  if cache.has_graphs else None)
        if graphs is not None and graphs.fused:  # each layer one graph, attention inside
            graphs.start(tokens, positions, slots,
                         [(seq, n) for (seq, _), n in zip(batch, lengths, strict=True)])
            for i in range(self.config.num_layers):
                if before_layer is not None:
                    before_layer(i)
                graphs.layer(i)
                if after_layer is not None:
                    after_layer(i)
            return self._finish(batch, lengths, graphs.hidden[:num_new], all_logits)
        with _sdpa_backends():
            return self._forward_eager_attention(cache, batch, lengths, tokens, positions,
                                                 slots, graphs, all_logits, before_layer,
                                                 after_layer)

    def _forward_eager_attention(
            self, cache: PagedKVCache, batch: Sequence[tuple[SequenceKV, Sequence[int]]],
            lengths: list[int], tokens: list[int], positions: torch.Tensor,
            slots: torch.Tensor, graphs: Any, all_logits: bool,
            before_layer: LayerHook | None, after_layer: LayerHook | None) -> torch.Tensor:
        """`forward` with attention run by SDPA per sequence, between the graphs' pieces
        (``graphs``) or the eager layers (None)."""
        device = self.device
        num_new = len(tokens)
        plans = [cache.plan(seq, seq.num_tokens + n)
                 for (seq, _), n in zip(batch, lengths, strict=True)]
        masks = [causal_mask(seq.num_tokens, n)
                 for (seq, _), n in zip(batch, lengths, strict=True)]
        if graphs is not None:
            graphs.start(tokens, positions, slots)
            out = graphs.attention[:num_new]
        else:
            slots = to_device(slots, device)
            h = self.embed(to_device(tokens, device))
            cos, sin = self.rope_tables(to_device(positions, device))
            out = torch.empty(num_new, self.config.num_heads, self.config.head_dim,
                              dtype=self.dtype, device=device)
        for i in range(self.config.num_layers):
            if before_layer is not None:
                before_layer(i)
            if graphs is not None:
                q = graphs.layer_in(i)[:num_new]
            else:
                q = self.layer_in(cache, i, h, cos, sin, slots)
            offset = 0
            for (seq, _), n, plan, mask in zip(batch, lengths, plans, masks, strict=True):
                out[offset:offset + n] = self._attend(cache, i, seq, plan, mask,
                                                      q[offset:offset + n])
                offset += n
            if graphs is not None:
                graphs.layer_out(i)
            else:
                h = self.layer_out(i, h, out)
            if after_layer is not None:
                after_layer(i)
        if graphs is not None:
            h = graphs.hidden[:num_new]
        return self._finish(batch, lengths, h, all_logits)

    def _finish(self, batch: Sequence[tuple[SequenceKV, Sequence[int]]], lengths: list[int],
                h: torch.Tensor, all_logits: bool) -> torch.Tensor:
        """Count the new tokens into their sequences; the logits of each chunk's last token
        (of every token with ``all_logits``) from the last layer's hidden states ``h``."""
        for (seq, _), n in zip(batch, lengths, strict=True):
            seq.num_tokens += n
        if not all_logits:
            ends = to_device(torch.tensor(lengths).cumsum(0) - 1, h.device)
            h = h[ends]
        return self._logits(self.model.norm(h))

    # The pieces of a layer, shared by the eager forward and its CUDA graphs.

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(tokens)

    def rope_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sign-folded sin of ``positions`` (``[tokens, 1, head_dim]``): rotating x
        is x * cos + roll(x, half) * sin (rotate_half(x) == roll(x, half) * sign)."""
        dim = self.config.head_dim
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos().to(self.dtype)[:, None, :]
        sign = torch.ones(dim, device=positions.device, dtype=self.dtype)
        sign[:dim // 2] = -1
        sin = (emb.sin().to(self.dtype) * sign)[:, None, :]
        return cos, sin

    def layer_in(self, cache: PagedKVCache, layer: int, h: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Layer ``layer`` up to attention: norm, QKV, rotation; K and V written to the
        cache at ``slots``. Returns the rotated queries, ``[tokens, heads, head_dim]``."""
        config = self.config
        attn = self.model.layers[layer].self_attn
        x = self.model.layers[layer].input_layernorm(h)
        qkv = F.linear(x, attn.qkv_weight).view(h.shape[0], -1, config.head_dim)
        num_q = config.num_heads
        qk = qkv[:, :num_q + config.num_kv_heads]
        # q and k rotated together, in place: K and V then lie side by side in qkv and
        # go into the cache in one write (fewer ops: the forward of a short tail over a
        # long cached prefix is bound by the host's launching them).
        torch.addcmul(qk * cos, qk.roll(config.head_dim // 2, dims=-1), sin, out=qk)
        cache.write(layer, slots, qkv[:, num_q:])
        return qkv[:, :num_q]

    def layer_out(self, layer: int, h: torch.Tensor, attention: torch.Tensor
                  ) -> torch.Tensor:
        """Layer ``layer`` after attention (``[tokens, heads, head_dim]``): the output
        projection and the MLP, each with its residual add fused into its last GEMM."""
        block = self.model.layers[layer]
        h = torch.addmm(h, attention.reshape(h.shape[0], -1),
                        block.self_attn.o_proj.weight.t())
        return block.mlp(block.post_attention_layernorm(h), residual=h)

    def _attend(self, cache: PagedKVCache, layer: int, seq: SequenceKV,
                plan: slice | torch.Tensor, mask: Any, q: torch.Tensor) -> torch.Tensor:
        """Attention of ``q`` (``[n, heads, dim]``, the tokens after ``seq.num_tokens``)
        over the sequence's cached K/V, causal. ``mask`` is `causal_mask`'s: a lower-right
        causal bias (not a materialized mask), so SDPA keeps its fused kernels, which
        handle grouped-query heads without copying each KV head per query head."""
        n, start = q.shape[0], seq.num_tokens
        k, v = cache.gather(layer, plan, start + n)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
            attn_mask=mask, is_causal=n > 1 and start == 0, enable_gqa=True)
        return out[0].transpose(0, 1)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            return F.linear(h, self.model.embed_tokens.weight)
        return self.lm_head(h)

    def generate(self, tokens: Sequence[int], max_new_tokens: int | None = None, *,
                 sampling: SamplingParams | None = None, page_tokens: int = 16) -> list[int]:
        """The reference: prefill the prompt and decode in one place, with no store."""
        if sampling is None:
            sampling = SamplingParams(max_new_tokens=max_new_tokens or 32)
        elif max_new_tokens is not None:
            raise ValueError("give max_new_tokens or sampling, not both")
        tokens = list(tokens)
        if not tokens:
            raise ValueError("generate needs at least one prompt token")
        total = len(tokens) + sampling.max_new_tokens
        cache = self.new_cache(num_pages=-(-total // page_tokens), page_tokens=page_tokens)
        seq = SequenceKV()
        cache.reserve(seq, total)
        sampling = sampling.with_seed()
        logits = self.forward(cache, [(seq, tokens)])[0]
        out: list[int] = []
        while True:
            token = sample(logits, sampling, len(out))
            out.append(token)
            if len(out) >= sampling.max_new_tokens or token in sampling.stop_token_ids:
                return out
            logits = self.forward(cache, [(seq, [token])])[0]


def weights_digest(weights: dict[str, torch.Tensor]) -> str:
    """A short fingerprint of a model's weights: its names, shapes and the first and last
    elements of each tensor. Two processes loading the same checkpoint agree; models that
    differ anywhere but in rare interior elements do not (what the KV namespace needs)."""
    h = hashlib.blake2b(digest_size=8)
    for name in sorted(weights):
        t = weights[name].detach().reshape(-1)
        h.update(f"{name}:{tuple(weights[name].shape)}:{t.dtype}".encode())
        ends = torch.cat([t[:64], t[-64:]]).float().cpu()
        h.update(ends.numpy().tobytes())
    return h.hexdigest()

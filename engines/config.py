"""The shape of a Llama-family model: one frozen dataclass shared by the model, the
loaders (GGUF, Hugging Face checkpoint directories, presets) and the engines.

Weights are always handed around under Hugging Face's `LlamaForCausalLM` names
(``model.embed_tokens.weight``, ``model.layers.{i}.self_attn.q_proj.weight``, ...,
``model.norm.weight``, ``lm_head.weight``), with HF's rotary convention (rotate-half, not
interleaved pairs): loaders of other formats convert to that.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from kvstore.errors import KVStoreError
from kvstore.layout import KVLayout

# The named models of `engines.presets` (listed here, where no torch import is needed).
PRESET_NAMES = ("tiny", "smollm2-135m", "llama3-8b")


class ModelLoadError(KVStoreError):
    """A model file or checkpoint that cannot be loaded (missing, unsupported, malformed)."""


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3's rotary frequency scaling (``rope_scaling.rope_type == "llama3"``)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_tokens: int

    def __post_init__(self) -> None:
        if self.factor <= 0 or self.low_freq_factor <= 0 or self.original_max_position_tokens <= 0:
            raise ValueError(f"RopeScaling values must be positive: {self}")
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError("RopeScaling.high_freq_factor must exceed low_freq_factor")


@dataclass(frozen=True)
class ModelConfig:
    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    max_position_tokens: int = 8192
    rope_scaling: RopeScaling | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.rope_theta <= 0 or self.rms_norm_eps <= 0:
            raise ValueError("rope_theta and rms_norm_eps must be positive")
        object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def kv_layout(self, block_tokens: int, dtype: object) -> KVLayout:
        """The layout of this model's KV blocks in the store; ``dtype`` a name
        ("bfloat16") or a torch dtype (KVLayout reads either from its ``str``)."""
        return KVLayout(num_layers=self.num_layers, num_kv_heads=self.num_kv_heads,
                        head_dim=self.head_dim, block_tokens=block_tokens, dtype=str(dtype))

    def with_name(self, name: str) -> ModelConfig:
        return replace(self, name=name)

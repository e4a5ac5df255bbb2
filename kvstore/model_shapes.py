"""KV shapes of the models the tools know by name, for sizing arithmetic.

The engines' presets (engines/presets.py) are copied here because the library never
imports the engines; Llama-3-70B is added as the usual sizing example. KV is fp16/bf16
unless a tool is told another dtype.
"""

from __future__ import annotations

from kvstore.layout import KVLayout


def kv_layout(name: str, *, dtype: str = "float16", block_tokens: int = 16) -> KVLayout:
    """The KV layout of a named model; KeyError (listing the names) if unknown."""
    if name not in MODEL_SHAPES:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(MODEL_SHAPES)}")
    layers, kv_heads, head_dim = MODEL_SHAPES[name]
    return KVLayout(num_layers=layers, num_kv_heads=kv_heads, head_dim=head_dim,
                    block_tokens=block_tokens, dtype=dtype)


# name -> (layers, KV heads, head dim)
MODEL_SHAPES: dict[str, tuple[int, int, int]] = {
    "tiny": (4, 2, 32),
    "smollm2-135m": (30, 3, 64),
    "llama3-8b": (32, 8, 128),
    "llama3-70b": (80, 8, 128),
}

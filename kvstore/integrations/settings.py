"""`ConnectorSettings`: the vLLM connector's ``kv_connector_extra_config``, checked.

Kept apart from `kvstore.integrations.vllm` so it is importable (and tested) without vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvstore.errors import ConfigError
from kvstore.units import parse_size

_SETTINGS = {"url", "token", "dram", "nvme_path", "nvme", "max_value", "model_id",
             "timeout_s", "retry_after_s", "on_load_error", "kv_cache_layout"}


@dataclass(frozen=True)
class ConnectorSettings:
    """``kv_connector_extra_config``, checked."""

    url: str | None = None
    token: str | None = None
    dram_bytes: int = 0
    nvme_path: str | None = None
    nvme_bytes: int = 0
    max_value_bytes: int = 32 << 20
    model_id: str | None = None
    timeout_s: float = 5.0
    retry_after_s: float = 5.0
    on_load_error: str = "recompute"
    kv_cache_layout: str | None = None  # a vLLM KVCacheLayout name to ask vLLM for

    @classmethod
    def parse(cls, extra: dict[str, Any] | None) -> ConnectorSettings:
        extra = dict(extra or {})
        unknown = sorted(set(extra) - _SETTINGS)
        if unknown:
            raise ConfigError(f"KVStoreConnector: unknown kv_connector_extra_config keys "
                              f"{unknown}; known: {sorted(_SETTINGS)}")
        url = extra.get("url")
        dram = parse_size(extra.get("dram", 0), what="dram")
        nvme = parse_size(extra.get("nvme", 0), what="nvme")
        nvme_path = extra.get("nvme_path")
        if url is not None and (dram or nvme_path):
            raise ConfigError("KVStoreConnector: give either url (a kvstored daemon) or "
                              "dram / nvme_path (an embedded store), not both")
        if url is None and not dram and not nvme_path:
            raise ConfigError('KVStoreConnector: kv_connector_extra_config needs "url": '
                              '"kvstore://HOST:PORT" or an embedded store ("dram": "4GiB", '
                              'and/or "nvme_path" with "nvme")')
        if nvme_path and not nvme:
            raise ConfigError('KVStoreConnector: "nvme_path" needs "nvme" (its size)')
        if url is not None and not (isinstance(url, str) and url.startswith("kvstore://")):
            raise ConfigError(f"KVStoreConnector: url must look like kvstore://HOST:PORT, "
                              f"got {url!r}")
        on_load_error = extra.get("on_load_error", "recompute")
        if on_load_error not in ("recompute", "fail"):
            raise ConfigError(f'KVStoreConnector: on_load_error is "recompute" or "fail", '
                              f"got {on_load_error!r}")
        layout = extra.get("kv_cache_layout")
        if layout is not None and not (isinstance(layout, str) and layout.isalpha()):
            raise ConfigError(f"KVStoreConnector: kv_cache_layout is the name of one of "
                              f"vLLM's KV cache layouts (e.g. BLHNC), got {layout!r}")
        timeouts = {}
        for name in ("timeout_s", "retry_after_s"):
            value = extra.get(name, getattr(cls, name))
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ConfigError(f"KVStoreConnector: {name} must be a positive number, "
                                  f"got {value!r}")
            timeouts[name] = float(value)
        return cls(url=url, token=extra.get("token"), dram_bytes=dram, nvme_path=nvme_path,
                   nvme_bytes=nvme,
                   max_value_bytes=parse_size(extra.get("max_value", cls.max_value_bytes),
                                              what="max_value"),
                   model_id=extra.get("model_id"), on_load_error=on_load_error,
                   kv_cache_layout=layout, **timeouts)

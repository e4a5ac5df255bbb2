"""kvstore: a multi-tier KV-cache store for LLM serving (HBM, DRAM, NVMe)."""

from __future__ import annotations

from kvstore.config import Compression, StoreConfig
from kvstore.errors import (
    AuthError,
    BufferSizeError,
    ConfigError,
    DeadlineExceededError,
    InvalidKeyError,
    InvalidValueError,
    KVStoreError,
    LeaseExpiredError,
    ProtocolError,
    StorageError,
    StoreClosedError,
    StoreConnectionError,
)
from kvstore.layout import KVLayout
from kvstore.placement.rules import Admission, EvictionPolicy

__version__ = "0.1.0"

__all__ = [
    "KEY_BYTES", "Admission", "AuthError", "BlockKey", "BufferSizeError", "Compression",
    "ConfigError", "DeadlineExceededError", "EvictionPolicy", "InvalidKeyError",
    "InvalidValueError", "KVLayout", "KVStoreError", "LeaseExpiredError", "ProtocolError",
    "StorageError", "Store", "StoreClosedError", "StoreConfig", "StoreConnectionError",
    "aconnect", "connect", "prefix_hashes",
]


# Loaded when first asked for: the Store and the keys bring numpy, the client sockets and
# msgpack; a command that needs neither (kvstore hitrate) starts without them.
_LAZY = {"Store": "kvstore.store", "KEY_BYTES": "kvstore.keys", "BlockKey": "kvstore.keys",
         "prefix_hashes": "kvstore.keys", "connect": "kvstore.connecting",
         "aconnect": "kvstore.client"}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kvstore' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value

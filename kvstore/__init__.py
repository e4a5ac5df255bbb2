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
from kvstore.keys import KEY_BYTES, BlockKey, prefix_hashes
from kvstore.layout import KVLayout
from kvstore.placement.rules import Admission, EvictionPolicy
from kvstore.store import Store

__version__ = "0.1.0"

__all__ = [
    "KEY_BYTES", "Admission", "AuthError", "BlockKey", "BufferSizeError", "Compression",
    "ConfigError", "DeadlineExceededError", "EvictionPolicy", "InvalidKeyError",
    "InvalidValueError", "KVLayout", "KVStoreError", "LeaseExpiredError", "ProtocolError",
    "StorageError", "Store", "StoreClosedError", "StoreConfig", "StoreConnectionError",
    "aconnect", "connect", "prefix_hashes",
]


def __getattr__(name: str) -> object:
    # The client (sockets, msgpack) loads only when asked for.
    if name in ("connect", "aconnect"):
        from kvstore import client

        return getattr(client, name)
    raise AttributeError(f"module 'kvstore' has no attribute {name!r}")

"""kvstore: a multi-tier KV-cache store for LLM serving (HBM, DRAM, NVMe)."""

from __future__ import annotations

from kvstore.config import Compression, StoreConfig
from kvstore.errors import (
    BufferSizeError,
    ConfigError,
    InvalidKeyError,
    InvalidValueError,
    KVStoreError,
    StorageError,
    StoreClosedError,
)
from kvstore.keys import KEY_BYTES, BlockKey, prefix_hashes
from kvstore.layout import KVLayout
from kvstore.policy import Admission, EvictionPolicy
from kvstore.store import Store

__version__ = "0.1.0"

__all__ = [
    "KEY_BYTES", "Admission", "BlockKey", "BufferSizeError", "Compression", "ConfigError",
    "EvictionPolicy", "InvalidKeyError", "InvalidValueError", "KVLayout", "KVStoreError",
    "StorageError", "Store", "StoreClosedError", "StoreConfig", "prefix_hashes",
]

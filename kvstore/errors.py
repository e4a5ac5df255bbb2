"""The error hierarchy: one root, `KVStoreError`, and a few subclasses.

An expected miss is not an error (it returns `None` or `False`); these are raised for
caller mistakes and for failures the caller must know about.
"""

from __future__ import annotations


class KVStoreError(Exception):
    """Root of every error kvstore raises."""


class InvalidKeyError(KVStoreError, ValueError):
    """A key is not 16 bytes, or not bytes-like at all."""


class InvalidValueError(KVStoreError, ValueError):
    """A value is of an unsupported type, not contiguous, or larger than `max_value_bytes`."""


class BufferSizeError(KVStoreError, ValueError):
    """A `get_into` output buffer does not have the stored value's exact size."""


class StoreClosedError(KVStoreError):
    """The store (or tier) was closed; open a new one."""


class ConfigError(KVStoreError, ValueError):
    """A configuration value is out of range or inconsistent."""


class StorageError(KVStoreError, OSError):
    """The NVMe directory cannot be created, written or read."""


class StoreConnectionError(KVStoreError, ConnectionError):
    """A daemon cannot be reached, or the connection broke mid-call; names the URL."""


class AuthError(KVStoreError, PermissionError):
    """The daemon refused the token, or the token does not grant that namespace."""


class ProtocolError(KVStoreError):
    """A peer sent a frame this side cannot accept (bad framing, version mismatch)."""


class LeaseExpiredError(KVStoreError):
    """A shared-memory put held its reserved slot past the daemon's lease (the client was
    paused, say): the daemon refused the commit and nothing was stored. Not a broken
    connection: put again."""


class DeadlineExceededError(KVStoreError, TimeoutError):
    """A call did not finish within its timeout; it may or may not have taken effect."""

"""The daemon's scope key: the secret that keeps tenants' keys apart.

A block is stored under ``scoped_key(namespace_secret(namespace, scope key), key)``
(`kvstore.keys`): keyed hashes all the way, so a tenant that knows a namespace's name and
every key of its blocks still cannot compute where another namespace's blocks are stored,
nor write a value (or plant an on-disk record) under one of them. Shared-memory clients get
their own namespace's secret at hello, to look keys up in the pool's directory; nobody gets
the scope key itself.

The key must live as long as the blocks stored under it, so it lives in a file made at the
first start (32 random bytes, mode 0600): ``--key-file``, by default ``kvstored.key`` in
the NVMe directory. A daemon with no NVMe tier keeps no block across a restart and takes a
fresh key at each start. Daemons that are to share blocks (a cluster) share the file.
"""

from __future__ import annotations

import secrets

from kvstore.durable_file import DamagedKeyError, key_file
from kvstore.errors import ConfigError

KEY_BYTES = 32
DEFAULT_FILE_NAME = "kvstored.key"


def load_scope_key(path: str | None) -> bytes:
    """The key in ``path``, made there if the file does not exist; a fresh one (kept
    nowhere) if ``path`` is None."""
    if path is None:
        return secrets.token_bytes(KEY_BYTES)
    try:
        return key_file(path, KEY_BYTES)[0]
    except DamagedKeyError as e:
        raise ConfigError(f"--key-file {e}: it is damaged or not a kvstored key file") from e
    except OSError as e:
        raise ConfigError(f"--key-file {path}: cannot use it: {e.strerror or e}") from e

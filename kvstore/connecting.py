"""`kvstore.connect`: the client a URL names.

- ``kvstore://HOST:PORT`` (or ``HOST:PORT``), ``kvstore+ucx://HOST:PORT``: one daemon
  (`kvstore.client.Client`); a node of a pool serves the whole pool through it.
- ``kvstore+cluster://REDIS_HOST:PORT/DB?cluster=NAME``: a whole pool, each block read
  from the node that holds it (`kvstore.cluster.client.ClusterClient`).
"""

from __future__ import annotations

from typing import Any

from kvstore.client import sync
from kvstore.cluster.client import SCHEME, ClusterClient


def connect(url: str, token: str | None = None, *, namespace: str | None = None,
            timeout_s: float = 30.0, shared_memory: bool = True) -> Any:
    """A client of the daemon or the pool at ``url`` with the Store's methods.

    ``namespace`` scopes the keys (the token must grant it; default: the token's only
    namespace, or "default"). ``shared_memory``: copy values through a daemon's DRAM pool
    when it is on this host.
    """
    if url.startswith(SCHEME):
        return ClusterClient(url, token, namespace=namespace, timeout_s=timeout_s,
                             shared_memory=shared_memory)
    return sync.connect(url, token, namespace=namespace, timeout_s=timeout_s,
                        shared_memory=shared_memory)

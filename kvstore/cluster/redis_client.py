"""The Redis a pool lives in: one server (``redis://``, ``rediss://``, ``unix://``) or a
Redis Cluster (``redis+cluster://HOST:PORT``, ``rediss+cluster://``: any node of it;
the client finds the others and follows the slots).

`detected_client` also finds out from a plain URL whether the server is a cluster node.

Every client made here gives up at once on a failure (no retries inside redis-py): the
pool's callers treat a failed call as a miss, or retry on their own schedule.
"""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster

_CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


def is_cluster_url(url: str) -> bool:
    return url.partition("://")[0] in _CLUSTER_SCHEMES


def plain_url(url: str) -> str:
    """``url`` with a cluster scheme as the plain one redis-py parses."""
    scheme, sep, rest = url.partition("://")
    return f"{_CLUSTER_SCHEMES[scheme]}{sep}{rest}" if scheme in _CLUSTER_SCHEMES else url


def sync_client(url: str, *, timeout_s: float) -> Any:
    """A `redis.Redis`, or a `RedisCluster` for a cluster URL."""
    if is_cluster_url(url):
        return RedisCluster.from_url(plain_url(url), socket_timeout=timeout_s,
                                     socket_connect_timeout=timeout_s,
                                     retry=redis.retry.Retry(NoBackoff(), 0))
    return redis.Redis.from_url(url, socket_timeout=timeout_s,
                                socket_connect_timeout=timeout_s,
                                retry=redis.retry.Retry(NoBackoff(), 0))


def detected_client(url: str, *, timeout_s: float) -> Any:
    """`sync_client`, made a `RedisCluster` when the server at a plain URL says it is a
    node of a Redis Cluster (for clients, which need Redis up to work at all)."""
    client = sync_client(url, timeout_s=timeout_s)
    if isinstance(client, RedisCluster):
        return client
    try:
        enabled = client.info("cluster").get("cluster_enabled")
    except redis.RedisError:
        return client  # (its first real call says what is wrong)
    if not enabled:
        return client
    client.close()
    scheme, sep, rest = url.partition("://")
    return sync_client(f"{scheme}+cluster{sep}{rest}", timeout_s=timeout_s)


def async_client(url: str, *, timeout_s: float) -> Any:
    """A `redis.asyncio.Redis`, or a `redis.asyncio.RedisCluster` for a cluster URL."""
    from redis.asyncio.retry import Retry

    if is_cluster_url(url):
        return aioredis.RedisCluster.from_url(plain_url(url), socket_timeout=timeout_s,
                                              socket_connect_timeout=timeout_s,
                                              retry=Retry(NoBackoff(), 0))
    return aioredis.Redis.from_url(url, socket_timeout=timeout_s,
                                   socket_connect_timeout=timeout_s,
                                   retry=Retry(NoBackoff(), 0))


def run_id(client: Any) -> str:
    """Who the server is this run: it changes when Redis restarts (on a cluster, when any
    primary does), so a node knows to publish what it holds again."""
    if isinstance(client, RedisCluster):
        info = client.info("server", target_nodes=RedisCluster.PRIMARIES)
        return ",".join(sorted(str(node.get("run_id")) for node in info.values()))
    return str(client.info("server").get("run_id"))

"""The daemon's node registry in Redis: which daemons are alive, how to reach them, what they hold.

A daemon started with ``--redis URL`` owns one `NodeRegistry` on its event loop. `start()`
writes the node's entry, a background task rewrites it every ``interval_s`` with a fresh TTL,
and `stop()` deletes it. The cluster index builds on this: a node is a peer exactly while its
entry exists.

Redis layout (``P`` is ``key_prefix``, ``kvstore`` by default)::

    P:node:<node_id>  STRING holding one JSON object, expiring ttl_s after the last heartbeat
                      {"v": 1, "node_id": "host-a:7400",
                       "addresses": {"control": "10.0.0.5:7400", "metrics": "10.0.0.5:9400"},
                       "tiers": {"dram": 8589934592, "nvme": 107374182400},   # capacity bytes
                       "started_at": 1718000000.0, "updated_at": 1718000003.3,  # Unix seconds
                       "status": {...}}        # the daemon's live stats, e.g. used bytes per tier
    P:nodes           SET of node ids, no TTL. A member whose P:node:<id> has expired is stale:
                      readers skip it, and `nodes()` removes it.
    P:events          pub/sub channel of JSON messages
                      {"v": 1, "event": "join" | "leave", "node_id": "host-a:7400", "at": 1718...}

Invariants:

- A node is live iff its ``P:node:<id>`` key exists. A node that stops heartbeating (crash,
  partition, Redis restarted without persistence) disappears within ``ttl_s``; membership of
  ``P:nodes`` alone means nothing.
- Each heartbeat is one pipelined round trip (GET old entry, SET new entry with PX, SADD id). It
  is not a MULTI transaction, so it also runs key by key on Redis Cluster. Because every
  heartbeat re-adds the id, a node pruned from ``P:nodes`` by a reader racing with its
  re-registration is back in the set within one interval.
- "join" is published whenever a heartbeat finds no previous entry (first start, or after the
  entry expired or Redis lost it); "leave" only on a clean `stop()`. A crash publishes
  nothing: readers learn of it from the expiry.
- Readers accept any ``v >= 1`` and ignore fields they do not know, so later versions can add.
- The heartbeat task never raises. Redis errors are retried with jittered exponential backoff
  capped at ``_BACKOFF_CAP_S``; an outage logs one WARNING when it starts and one INFO when it
  ends, retries log at DEBUG. Every Redis await is bounded by ``timeout_s``.
- Times in Redis are wall-clock Unix seconds (other hosts read them); local delays are relative.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import json
import logging
import math
import random
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.connection import parse_url
from redis.exceptions import RedisError

from kvstore.cluster.redis_client import async_client, plain_url
from kvstore.errors import ConfigError, KVStoreError

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

ENTRY_VERSION = 1
_BACKOFF_BASE_S = 0.1
_BACKOFF_CAP_S = 2.0
_DEFAULT_TIMEOUT_CAP_S = 2.0

# What a Redis call can fail with: redis-py's own errors, socket errors (TimeoutError from
# `_bounded` among them), and asyncio.TimeoutError, which is no OSError before Python 3.11.
_REDIS_FAILURES = (RedisError, OSError, asyncio.TimeoutError)


class RegistryUnavailableError(KVStoreError, ConnectionError):
    """Redis could not be reached, or failed, while reading the node registry."""


@dataclass(frozen=True)
class NodeInfo:
    """One daemon as the registry describes it.

    ``tiers`` maps a tier name to its capacity in bytes; ``status`` holds the daemon's live
    stats as of ``updated_at`` (both set by the registry at each heartbeat).
    """

    node_id: str
    addresses: dict[str, str]
    tiers: dict[str, int]
    started_at: float
    updated_at: float = 0.0
    status: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.node_id, str) or not self.node_id.isprintable() \
                or not self.node_id or any(c.isspace() for c in self.node_id):
            raise ValueError(f"node_id must be a non-empty string without spaces, "
                             f"got {self.node_id!r}")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.addresses.items()):
            raise ValueError(f"addresses must map names to 'host:port' strings, "
                             f"got {self.addresses!r}")
        for name, capacity_bytes in self.tiers.items():
            if not isinstance(name, str) or isinstance(capacity_bytes, bool) \
                    or not isinstance(capacity_bytes, int) or capacity_bytes < 0:
                raise ValueError(f"tiers must map tier names to capacities in bytes (int >= 0), "
                                 f"got {name!r}: {capacity_bytes!r}")
        for name in ("started_at", "updated_at"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value):
                raise ValueError(f"{name} must be Unix seconds, got {value!r}")

    def to_json(self) -> str:
        return json.dumps({"v": ENTRY_VERSION, **dataclasses.asdict(self)},
                          separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, raw: str | bytes) -> NodeInfo:
        """Parse a registry entry; raises `ValueError` if it is not one."""
        try:
            obj = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"registry entry is not JSON: {e}") from e
        if not isinstance(obj, dict):
            raise ValueError("registry entry is not a JSON object")
        version = obj.get("v")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ValueError(f"registry entry has no valid version 'v': {version!r}")
        try:
            return cls(node_id=obj["node_id"], addresses=dict(obj["addresses"]),
                       tiers=dict(obj["tiers"]), started_at=obj["started_at"],
                       updated_at=obj.get("updated_at", 0.0),
                       status=dict(obj.get("status") or {}))
        except (KeyError, TypeError) as e:
            raise ValueError(f"registry entry lacks or mistypes a field: {e!r}") from e


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with equal jitter: half of each step fixed, half random.

    The fixed half keeps a flapping Redis from being hammered at near-zero delays; the random
    half keeps many daemons from retrying in lockstep after a shared outage.
    """

    base_s: float = _BACKOFF_BASE_S
    cap_s: float = _BACKOFF_CAP_S

    def delay_s(self, num_failures: int, rng: random.Random) -> float:
        step_s = min(self.cap_s, self.base_s * 2.0 ** min(max(num_failures - 1, 0), 30))
        return step_s / 2 + rng.uniform(0.0, step_s / 2)


class RegistryState(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPED = "stopped"


class RegistryEvent(enum.Enum):
    """The ``event`` field of a message on ``P:events``."""

    JOIN = "join"
    LEAVE = "leave"


def default_node_id(listen: str) -> str:
    """``<hostname>:<port>`` for a daemon listening on ``listen`` (``HOST:PORT``).

    Unique per host and port: two daemons on one host cannot bind the same port.
    """
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"listen address {listen!r} is not HOST:PORT (e.g. 127.0.0.1:7400)")
    return f"{socket.gethostname()}:{int(port)}"


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***``, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    userinfo = f"{parts.username or ''}:***"
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{userinfo}@{host}"))


def _describe(error: BaseException) -> str:
    """``Type: message`` for logs (redis-py 8's repr of its errors omits the message)."""
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _check_url(url: str) -> None:
    if not isinstance(url, str) or not url:
        raise ConfigError(f"Redis URL must be a non-empty string like redis://HOST:6379/0, "
                          f"got {url!r}")
    try:
        parse_url(plain_url(url))
        parts = urlsplit(plain_url(url))
        port = parts.port  # raises ValueError on a non-numeric or out-of-range port
    except ValueError as e:
        raise ConfigError(f"bad Redis URL {redact_url(url)!r}: {e} "
                          f"(expected redis://[:PASSWORD@]HOST[:PORT][/DB], rediss://... "
                          f"or unix:///PATH)") from e
    if parts.scheme in ("redis", "rediss") and not parts.hostname:
        raise ConfigError(f"bad Redis URL {redact_url(url)!r}: no host "
                          f"(expected redis://HOST[:PORT][/DB])")
    if port == 0:
        raise ConfigError(f"bad Redis URL {redact_url(url)!r}: port 0")


class NodeRegistry:
    """Keeps this daemon's entry in the Redis node registry fresh; see the module docstring.

    Owned by the daemon's event loop: `start()` once, `stop()` at shutdown. Redis being down
    never raises out of either; the daemon keeps serving locally and the registry re-registers
    when Redis returns.
    """

    def __init__(self, url: str, node: NodeInfo, *, ttl_s: float = 10.0,
                 interval_s: float | None = None, key_prefix: str = "kvstore",
                 status: Callable[[], Mapping[str, Any]] | None = None,
                 timeout_s: float | None = None) -> None:
        _check_url(url)
        if not (math.isfinite(ttl_s) and ttl_s > 0):
            raise ConfigError(f"ttl_s must be > 0, got {ttl_s!r}")
        if interval_s is None:
            interval_s = ttl_s / 3
        if not (math.isfinite(interval_s) and 0 < interval_s < ttl_s):
            raise ConfigError(f"interval_s must be in (0, ttl_s={ttl_s}) so the entry is "
                              f"refreshed before it expires, got {interval_s!r}")
        if timeout_s is None:
            timeout_s = min(_DEFAULT_TIMEOUT_CAP_S, ttl_s / 2)
        if not (math.isfinite(timeout_s) and timeout_s > 0):
            raise ConfigError(f"timeout_s must be > 0, got {timeout_s!r}")
        if not key_prefix or any(c.isspace() for c in key_prefix):
            raise ConfigError(f"key_prefix must be a non-empty word, got {key_prefix!r}")
        self._url = url
        self._node = node
        self._ttl_ms = max(1, round(ttl_s * 1000))
        self._ttl_s = ttl_s
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._key_prefix = key_prefix
        self._status = status
        self._backoff = Backoff()
        self._rng = random.Random()
        self._state = RegistryState.NEW
        self._client: aioredis.Redis | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._is_registered = False
        self._is_down = False
        self._is_join_pending = False
        self._is_status_broken = False
        self._num_failures = 0
        self._num_writes = 0

    # -- public API ----------------------------------------------------------------------------

    @property
    def is_registered(self) -> bool:
        """True while the last heartbeat wrote the entry; False before, during an outage, after."""
        return self._is_registered

    @property
    def node_id(self) -> str:
        return self._node.node_id

    @property
    def node_key(self) -> str:
        return self._node_key(self._node.node_id)

    @property
    def nodes_key(self) -> str:
        return f"{self._key_prefix}:nodes"

    @property
    def events_channel(self) -> str:
        return f"{self._key_prefix}:events"

    async def start(self) -> None:
        """Register (one attempt, bounded by ``timeout_s``) and start the heartbeat task.

        Does not fail when Redis is down: it logs once and the task keeps retrying.
        """
        if self._state is not RegistryState.NEW:
            raise RuntimeError(f"NodeRegistry.start() called twice (state {self._state.value})")
        # We retry ourselves, with our backoff and one warning per outage; redis-py's own
        # retries would stall each heartbeat for seconds and log nothing.
        self._client = async_client(self._url, timeout_s=self._timeout_s)
        self._state = RegistryState.RUNNING
        first_delay_s = await self._beat_once()
        if self._state is not RegistryState.RUNNING:  # stop() ran while we registered
            return
        self._task = asyncio.create_task(self._run(first_delay_s),
                                         name=f"kvstore-registry:{self._node.node_id}")

    async def stop(self) -> None:
        """Stop heartbeating, delete the entry and publish "leave" if Redis is reachable, close.

        Idempotent. When Redis is down the entry simply expires within ``ttl_s``.
        """
        if self._state is RegistryState.STOPPED:
            return
        self._state = RegistryState.STOPPED
        self._stopping.set()
        if self._task is not None:
            # Let a heartbeat in flight finish rather than cancel it: a cancelled SET already
            # written to its (then dropped) connection can reach Redis after the DEL below,
            # on another connection, and bring the entry back until its TTL. A beat is
            # bounded by the Redis timeout; past that, cancel.
            done, _ = await asyncio.wait({self._task}, timeout=self._timeout_s + 1.0)
            if not done:
                self._task.cancel()
                await asyncio.wait({self._task})
            self._task = None
        client, self._client = self._client, None
        self._is_registered = False
        if client is None:
            return
        try:
            if self._num_writes > 0:  # a node that never joined has nothing to leave
                await self._deregister(client)
        except asyncio.CancelledError:
            raise
        except _REDIS_FAILURES as e:
            logger.info("could not remove node %s from the registry at %s (%s); "
                        "its entry expires within %.1f s", self._node.node_id,
                        redact_url(self._url), _describe(e), self._ttl_s)
        finally:
            await client.aclose()

    async def nodes(self) -> list[NodeInfo]:
        """Every live node entry, sorted by node id; removes stale ids from ``P:nodes``.

        Entries that do not parse are skipped with a warning. Raises
        `RegistryUnavailableError` when Redis cannot be read.
        """
        client = self._client
        if client is None:
            raise RuntimeError("NodeRegistry.nodes() needs a running registry: call start() "
                               "first (and not after stop())")
        try:
            members = await self._bounded(client.smembers(self.nodes_key))
            node_ids = sorted(m.decode() for m in members)
            if not node_ids:
                return []
            async with client.pipeline(transaction=False) as pipe:
                for node_id in node_ids:
                    pipe.get(self._node_key(node_id))
                raw_entries = await self._bounded(pipe.execute())
            stale_ids = [i for i, raw in zip(node_ids, raw_entries, strict=True) if raw is None]
            if stale_ids:
                await self._bounded(client.srem(self.nodes_key, *stale_ids))
        except asyncio.CancelledError:
            raise
        except _REDIS_FAILURES as e:
            raise RegistryUnavailableError(
                f"cannot read the node registry at {redact_url(self._url)}: {_describe(e)}") from e
        result = []
        for node_id, raw in zip(node_ids, raw_entries, strict=True):
            if raw is None:
                continue
            try:
                result.append(NodeInfo.from_json(raw))
            except ValueError as e:
                logger.warning("skipping malformed registry entry %s: %s",
                               self._node_key(node_id), e)
        return result

    # -- heartbeat -----------------------------------------------------------------------------

    async def _bounded(self, awaitable: Awaitable[_T]) -> _T:
        """Await one Redis call, at most ``timeout_s`` (redis-py drops the connection if cut)."""
        try:
            return await asyncio.wait_for(awaitable, self._timeout_s)
        except TimeoutError:
            raise TimeoutError(f"no answer from Redis within {self._timeout_s} s") from None

    def _node_key(self, node_id: str) -> str:
        return f"{self._key_prefix}:node:{node_id}"

    async def _run(self, first_delay_s: float) -> None:
        delay_s = first_delay_s
        while self._state is RegistryState.RUNNING:
            try:
                await asyncio.wait_for(self._stopping.wait(), delay_s)
                return
            except TimeoutError:
                pass
            delay_s = await self._beat_once()

    async def _beat_once(self) -> float:
        """One heartbeat attempt; returns the delay before the next. Raises only cancellation."""
        try:
            await self._heartbeat()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the daemon must outlive anything Redis does
            self._on_failure(e)
            return self._backoff.delay_s(self._num_failures, self._rng)
        if self._is_down:
            logger.info("Redis at %s is back after %d failed attempts; node %s re-registered",
                        redact_url(self._url), self._num_failures, self._node.node_id)
        elif self._num_writes == 1:
            logger.info("registered node %s in %s (ttl %.1f s, heartbeat every %.2f s)",
                        self._node.node_id, redact_url(self._url), self._ttl_s,
                        self._interval_s)
        self._is_down = False
        self._num_failures = 0
        self._is_registered = True
        return self._interval_s

    def _on_failure(self, error: BaseException) -> None:
        self._num_failures += 1
        self._is_registered = False
        if self._is_down:
            logger.debug("registry heartbeat %d for node %s failed again: %s",
                         self._num_failures, self._node.node_id, _describe(error))
            return
        self._is_down = True
        expected = isinstance(error, _REDIS_FAILURES)
        logger.warning("Redis at %s is unreachable (%s); node %s keeps serving locally and "
                       "retries every <= %.1f s", redact_url(self._url), _describe(error),
                       self._node.node_id, self._backoff.cap_s,
                       exc_info=None if expected else error)

    async def _heartbeat(self) -> None:
        assert self._client is not None, "heartbeat without a client"
        entry = dataclasses.replace(self._node, updated_at=time.time(),
                                    status=self._read_status())
        key = self.node_key
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.get(key)
            pipe.set(key, entry.to_json(), px=self._ttl_ms)
            pipe.sadd(self.nodes_key, self._node.node_id)
            previous, _, _ = await self._bounded(pipe.execute())
        self._num_writes += 1
        if previous is None:
            self._is_join_pending = True
        elif self._num_writes == 1:
            self._warn_if_taken(previous)
        if self._is_join_pending:
            join = self._event(RegistryEvent.JOIN)
            await self._bounded(self._client.publish(self.events_channel, join))
            self._is_join_pending = False

    def _warn_if_taken(self, previous: bytes) -> None:
        """A live entry with our id but another start time: a second daemon, or our last run."""
        try:
            other = NodeInfo.from_json(previous)
        except ValueError:
            return
        if other.started_at != self._node.started_at:
            logger.warning("node id %s was already registered by a process started at %.3f "
                           "(this node's previous run, or another daemon with the same id: "
                           "give each daemon its own)", self._node.node_id, other.started_at)

    def _read_status(self) -> dict[str, Any]:
        if self._status is None:
            return {}
        try:
            status = dict(self._status())
            json.dumps(status)
        except Exception as e:  # a broken stats callback must not stop the heartbeat
            if not self._is_status_broken:
                logger.warning("status callback for node %s failed (%s); heartbeats go on "
                               "without status", self._node.node_id, _describe(e), exc_info=e)
            self._is_status_broken = True
            return {}
        self._is_status_broken = False
        return status

    async def _deregister(self, client: aioredis.Redis) -> None:
        async with client.pipeline(transaction=False) as pipe:
            pipe.delete(self.node_key)
            pipe.srem(self.nodes_key, self._node.node_id)
            await self._bounded(pipe.execute())
        # (not in the pipeline: a Redis Cluster's pipelines refuse PUBLISH)
        await self._bounded(client.publish(self.events_channel,
                                           self._event(RegistryEvent.LEAVE)))
        logger.info("node %s left the registry", self._node.node_id)

    def _event(self, event: RegistryEvent) -> str:
        return json.dumps({"v": ENTRY_VERSION, "event": event.value, "node_id": self._node.node_id,
                           "at": time.time()}, separators=(",", ":"))

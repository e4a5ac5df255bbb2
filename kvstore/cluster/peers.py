"""The other nodes of a pool: who is live (`Membership`, from the node registry in Redis),
the cluster's secret and what derives from it, and the connections that fetch blocks from
peers (`PeerLinks`).

Keys between peers are keys *as stored* (scoped to their namespace by the node the client
reached: `kvstore.keys.scoped_key`), so a peer never scopes them again and a client can
reach only what its own namespace scopes to. Peer connections authenticate with a token
derived from the cluster's secret, which every node of the pool shares, and which also
derives the scope key: nodes that share it store a namespace's blocks under the same keys.

Liveness: a node is live while its registry entry exists. `Membership.refresh` reads each
entry with its remaining TTL, so a node that stopped heartbeating leaves `live()` when its
entry expires, by this host's clock, whatever the refresh period. A node that failed a
call is skipped for ``suspect_s`` (a SIGKILLed node refuses connections at once; a hung
one times out once, not on every request).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import xxhash

from kvstore.client.settings import ClientSettings
from kvstore.client.sync import RawConnection
from kvstore.errors import KVStoreError

log = logging.getLogger(__name__)

SECRET_BYTES = 32
_PERSON_SCOPE = b"kvstore-scope"
_PERSON_PEER = b"kvstore-peer"

value_sum = xxhash.xxh3_64_intdigest  # what a peer answers beside each value


def scope_key_of(secret: bytes) -> bytes:
    """The scope key (`daemon.scope`) of every node of the pool whose secret is ``secret``."""
    return hashlib.blake2b(b"", key=secret, digest_size=32, person=_PERSON_SCOPE).digest()


def peer_token_of(secret: bytes) -> str:
    """The token a node says hello with to its peers (never a tenant's)."""
    return hashlib.blake2b(b"", key=secret, digest_size=32, person=_PERSON_PEER).hexdigest()


def registry_prefix(cluster: str, key_prefix: str = "kvstore") -> str:
    """The node registry's key prefix of a cluster (`daemon.registry`)."""
    return f"{key_prefix}:{cluster}"


@dataclass(frozen=True)
class Peer:
    node_id: str
    address: str  # HOST:PORT of its control (TCP) listener
    expires_at: float  # time.monotonic() at which its registry entry expires
    free_bytes: int = 0  # its tiers' room as of its last heartbeat (capacity - used)


class Membership:
    """The live nodes of one cluster, as of the last `refresh` (thread-safe)."""

    def __init__(self, client: Any, cluster: str, self_id: str | None, *,
                 suspect_s: float = 5.0, key_prefix: str = "kvstore") -> None:
        self.client = client
        self.prefix = registry_prefix(cluster, key_prefix)
        self.self_id = self_id
        self.suspect_s = suspect_s
        self._peers: dict[str, Peer] = {}
        self._suspects: dict[str, float] = {}  # node id -> until (monotonic)
        self._lock = threading.Lock()

    def refresh(self) -> None:
        """Read the registry: every node's entry and its remaining TTL, in two round trips.
        Raises what the Redis client raises."""
        members = sorted(m.decode() if isinstance(m, bytes) else m
                         for m in self.client.smembers(f"{self.prefix}:nodes"))
        pipe = self.client.pipeline(transaction=False)
        for node_id in members:
            pipe.get(f"{self.prefix}:node:{node_id}")
            pipe.pttl(f"{self.prefix}:node:{node_id}")
        read_at = time.monotonic()
        answers = pipe.execute() if members else []
        peers = {}
        for i, node_id in enumerate(members):
            raw, ttl_ms = answers[2 * i], answers[2 * i + 1]
            if raw is None or ttl_ms is None or ttl_ms < 0:
                continue
            try:
                entry = json.loads(raw)
                address = entry["addresses"]["control"]
                used = entry.get("status") or {}
                free_bytes = sum(max(0, int(capacity) - int(used.get(tier, 0)))
                                 for tier, capacity in (entry.get("tiers") or {}).items())
            except (ValueError, KeyError, TypeError, AttributeError):
                log.warning("skipping a malformed registry entry of node %s", node_id)
                continue
            peers[node_id] = Peer(node_id, address, read_at + ttl_ms / 1000, free_bytes)
        with self._lock:
            self._peers = peers

    def live(self, *, include_self: bool = False) -> dict[str, Peer]:
        """The nodes whose entry has not expired, but those suspected; not this node
        unless ``include_self``."""
        now = time.monotonic()
        with self._lock:
            return {node_id: peer for node_id, peer in self._peers.items()
                    if peer.expires_at > now and self._suspects.get(node_id, 0.0) <= now
                    and (include_self or node_id != self.self_id)}

    def suspect(self, node_id: str) -> None:
        """Skip ``node_id`` for ``suspect_s`` (a call to it failed)."""
        with self._lock:
            self._suspects[node_id] = time.monotonic() + self.suspect_s


class PeerLinks:
    """Connections to peers, pooled per address (thread-safe). Every call raises
    `KVStoreError` (a broken or refused connection, a deadline) when it does not get an
    answer; the caller counts that as a miss."""

    def __init__(self, token: str, *, timeout_s: float = 2.0) -> None:
        self.token = token
        self.timeout_s = timeout_s
        self._idle: dict[str, list[RawConnection]] = {}
        self._lock = threading.Lock()
        self._closed = False

    def _request(self, address: str, meta: dict[str, Any], parts: Sequence[Any] = ()
                 ) -> tuple[dict[str, Any], Any]:
        with self._lock:
            if self._closed:
                raise KVStoreError("peer links are closed")
            idle = self._idle.get(address)
            conn = idle.pop() if idle else None
        if conn is None:
            conn = RawConnection(ClientSettings(
                f"kvstore://{address}", token=self.token, timeout_s=self.timeout_s,
                connect_timeout_s=self.timeout_s, shared_memory=False))
        try:
            answer = conn.request(meta, list(parts), self.timeout_s)
        except BaseException:
            conn.close()
            raise
        assert answer is not None
        with self._lock:
            if self._closed:
                conn.close()
            else:
                self._idle.setdefault(address, []).append(conn)
        return answer

    def get(self, address: str, keys: Sequence[bytes]) -> list[memoryview | None]:
        """The values ``address`` holds of the leading ``keys`` it answered (a peer cuts
        a long answer as `get_many` does: fewer values than keys; ask again for the rest).
        None: not held there, or a value that failed the checksum the peer sent beside it
        (logged). Values are read-only views of the answer as received, not copies (the
        buffer is the answer's own: the connection does not reuse it)."""
        meta, data = self._request(address, {"op": "peer_get", "keys": list(keys)})
        answered = meta.get("answered", len(keys))
        values: list[memoryview | None] = []
        received = memoryview(data).toreadonly()
        offset = 0
        for size, expected in zip(meta["sizes"][:answered], meta["sums"][:answered],
                                  strict=True):
            if size is None:
                values.append(None)
                continue
            value: memoryview | None = received[offset:offset + size]
            offset += size
            if value_sum(value) != expected:
                log.warning("a block from peer %s failed its checksum; counted a miss",
                            address)
                value = None
            values.append(value)
        return values

    def held(self, address: str, keys: Sequence[bytes]) -> list[int]:
        """The tier bits ``address`` holds each of ``keys`` in (0: not held)."""
        meta, _ = self._request(address, {"op": "peer_held", "keys": list(keys)})
        return list(meta["held"])

    def drop(self, address: str, keys: Sequence[bytes], sums: Sequence[int] | None) -> int:
        """Have ``address`` drop ``keys`` (with ``sums``: those whose value has another
        checksum); how many it dropped."""
        meta: dict[str, Any] = {"op": "peer_drop", "keys": list(keys)}
        if sums is not None:
            meta["sums"] = list(sums)
        answer, _ = self._request(address, meta)
        return int(answer["dropped"])

    def put(self, address: str, keys: Sequence[bytes], values: Sequence[bytes]) -> list[bool]:
        """Have ``address`` store ``keys`` (blocks this node has no room for); whether
        each was stored (and published to the pool's index) there."""
        meta, _ = self._request(address, {"op": "peer_put", "keys": list(keys),
                                          "sizes": [len(v) for v in values]}, values)
        return [bool(s) for s in meta["stored"]]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()

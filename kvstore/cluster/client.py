"""The cluster-aware client: the Store API over a whole pool, for hosts that run no
daemon. ``kvstore.connect("kvstore+cluster://REDIS_HOST:PORT/DB?cluster=NAME")``.

    ClusterClient ──Redis: the registry (live nodes), the pool's index (who holds what)
        ├─ reads:  each block from a node that holds it (fastest tier first): no relay
        └─ writes: each chain to one node, chosen by rendezvous hashing of its first key

Keys are looked up in the index as the nodes store them: scoped to the client's
namespace with the namespace's secret, which a node of the pool tells a client at hello
(`kvstore.keys.scoped_key`); a client reaches only its own namespace's blocks, as it
would through one node.

Reads of its own writes: the index learns of a block within a node's publish interval
(50 ms), so the client remembers where it wrote each block for `RECENT_S` and reads it
there meanwhile. A node that fails a call is skipped while its registry entry lives
(`Membership.suspect`); its blocks are misses, as they would be through any node.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

from redis.exceptions import RedisError

from kvstore.client.api import check_keys
from kvstore.client.settings import ClientSettings
from kvstore.client.sync import Client, RawConnection
from kvstore.cluster.index import ClusterIndex, Location
from kvstore.cluster.peers import Membership, Peer
from kvstore.cluster.redis_client import detected_client
from kvstore.errors import DeadlineExceededError, KVStoreError, StoreConnectionError
from kvstore.keys import scoped_key
from kvstore.tiers.base import check_key

SCHEME = "kvstore+cluster://"
RECENT_S = 2.0  # a block written is read where it was written for this long
RECENT_KEYS = 65536
REFRESH_S = 1.0  # the live nodes are read again after this
_REDIS_FAILURES = (RedisError, OSError)


def parse_cluster_url(url: str) -> tuple[str, str]:
    """``kvstore+cluster://[:PASSWORD@]HOST:PORT/DB?cluster=NAME`` -> (the Redis URL,
    the cluster's name; default "default")."""
    if not url.startswith(SCHEME):
        raise KVStoreError(f"not a cluster URL: {url!r} (expected {SCHEME}HOST:PORT/DB"
                           "?cluster=NAME)")
    parts = urlsplit("redis://" + url.removeprefix(SCHEME))
    query = parse_qs(parts.query)
    unknown = set(query) - {"cluster"}
    if unknown or not parts.hostname:
        raise KVStoreError(f"bad cluster URL {url!r}: expected {SCHEME}HOST:PORT/DB"
                           f"?cluster=NAME{f' (unknown: {sorted(unknown)})' if unknown else ''}")
    cluster = query.get("cluster", ["default"])[-1]
    return urlunsplit(parts._replace(query="")), cluster


def _rendezvous(key: bytes, node_ids: Sequence[str]) -> list[str]:
    """``node_ids`` in the order ``key`` prefers them (highest random weight first): a
    node that leaves moves only its own keys."""
    return sorted(node_ids, key=lambda n: hashlib.blake2b(key + n.encode(),
                                                          digest_size=8).digest(),
                  reverse=True)


class ClusterClient:
    """See the module docstring. Thread-safe as `Client` is (one client per node)."""

    def __init__(self, url: str, token: str | None = None, *, namespace: str | None = None,
                 timeout_s: float = 30.0, shared_memory: bool = True) -> None:
        redis_url, self.cluster = parse_cluster_url(url)
        self.url = url
        self.token = token
        self.namespace = namespace
        self.timeout_s = timeout_s
        self.shared_memory = shared_memory
        self.redis = detected_client(redis_url, timeout_s=min(timeout_s, 5.0))
        self.index = ClusterIndex(self.redis, self.cluster)
        self.membership = Membership(self.redis, self.cluster, None)
        self._refreshed_at = 0.0
        self._clients: dict[str, Client] = {}
        self._recent: OrderedDict[bytes, tuple[str, float]] = OrderedDict()
        self._closed = False
        try:
            self._secret = self._hello()
        except BaseException:
            self.redis.close()
            raise

    # -- nodes --------------------------------------------------------------------------------

    def _peers(self) -> dict[str, Peer]:
        """The live nodes (read again from Redis every `REFRESH_S`); every call starts
        here, so a closed client raises here."""
        if self._closed:
            raise KVStoreError(f"the client of {self.url} is closed")
        if time.monotonic() - self._refreshed_at > REFRESH_S:
            try:
                self.membership.refresh()
                self._refreshed_at = time.monotonic()
            except _REDIS_FAILURES as e:
                if not self._refreshed_at:
                    raise StoreConnectionError(f"cannot read the nodes of cluster "
                                               f"{self.cluster!r} from Redis: {e}") from e
        return self.membership.live(include_self=True)

    def _hello(self) -> bytes:
        """The namespace's secret, from a node's hello (any node's is the pool's)."""
        peers = self._peers()
        if not peers:
            raise StoreConnectionError(f"no live node in cluster {self.cluster!r} "
                                       f"({self.url})")
        error: Exception | None = None
        for peer in peers.values():
            try:
                conn = RawConnection(ClientSettings(
                    f"kvstore://{peer.address}", token=self.token, namespace=self.namespace,
                    timeout_s=self.timeout_s, shared_memory=False))
            except StoreConnectionError as e:
                error = e
                continue
            conn.close()
            if not conn.session.scope:
                raise KVStoreError(f"node {peer.node_id} did not give this namespace's "
                                   "secret: it is not a node of a pool, or too old")
            return conn.session.scope
        raise StoreConnectionError(f"no node of cluster {self.cluster!r} answered: {error}")

    def _node(self, node_id: str, peers: dict[str, Peer]) -> Client:
        client = self._clients.get(node_id)
        if client is None:
            if self._closed:
                raise KVStoreError(f"the client of {self.url} is closed")
            client = Client(f"kvstore://{peers[node_id].address}", token=self.token,
                            namespace=self.namespace, timeout_s=self.timeout_s,
                            shared_memory=self.shared_memory)
            self._clients[node_id] = client
        return client

    def _call(self, node_id: str, peers: dict[str, Peer], method: str, *args: Any) -> Any:
        """``method(*args)`` on ``node_id``'s client; a node that cannot be reached, or
        does not answer within the deadline, is suspected and `StoreConnectionError`
        raised (the callers count it a miss, or try the next node)."""
        try:
            return getattr(self._node(node_id, peers), method)(*args)
        except (StoreConnectionError, DeadlineExceededError) as e:
            self.membership.suspect(node_id)
            client = self._clients.pop(node_id, None)
            if client is not None:
                client.close()
            if isinstance(e, StoreConnectionError):
                raise
            raise StoreConnectionError(f"node {node_id}: {e}") from e

    # -- where blocks are -----------------------------------------------------------------------

    def _scoped(self, keys: Sequence[bytes]) -> list[bytes]:
        return [scoped_key(self._secret, k) for k in keys]

    def _holders(self, keys: Sequence[bytes], peers: dict[str, Peer]
                 ) -> list[list[str]]:
        """For each key, the live nodes that hold it, fastest tier first (and where this
        client wrote it lately, first of all)."""
        found: dict[str, bytes] = {}
        if peers and keys:
            try:
                found = self.index.holders(self._scoped(keys), peers)
            except _REDIS_FAILURES:
                found = {}
        now = time.monotonic()
        out = []
        for i, key in enumerate(keys):
            order = sorted((bits[i] & -bits[i], node) for node, bits in found.items()
                           if bits[i])
            nodes = [node for _, node in order]
            recent = self._recent.get(key)
            if recent is not None and now - recent[1] < RECENT_S and recent[0] in peers:
                nodes = [recent[0], *(n for n in nodes if n != recent[0])]
            out.append(nodes)
        return out

    def locate(self, keys: Sequence[bytes]) -> list[Location]:
        """For the chain ``keys``, each live node that holds its first block: how many
        leading blocks it holds and in which tiers, most first; one round trip to Redis."""
        peers = self._peers()
        try:
            return self.index.locate(self._scoped(check_keys(keys)), peers)
        except _REDIS_FAILURES as e:
            raise StoreConnectionError(f"cannot read the pool's index of cluster "
                                       f"{self.cluster!r}: {e}") from e

    def _wrote(self, keys: Sequence[bytes], node_id: str) -> None:
        now = time.monotonic()
        for key in keys:
            self._recent[key] = (node_id, now)
            self._recent.move_to_end(key)
        while len(self._recent) > RECENT_KEYS:
            self._recent.popitem(last=False)

    # -- the Store API --------------------------------------------------------------------------

    def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        keys = check_keys(keys)
        peers = self._peers()
        holders = self._holders(keys, peers)
        out: list[bytes | None] = [None] * len(keys)
        for attempt in range(2):  # a holder that no longer has it: the next one
            plan: dict[str, list[int]] = {}
            for i, nodes in enumerate(holders):
                if out[i] is None and len(nodes) > attempt:
                    plan.setdefault(nodes[attempt], []).append(i)
            for node_id, wanted in plan.items():
                try:
                    values = self._call(node_id, peers, "get_many", [keys[i] for i in wanted])
                except StoreConnectionError:
                    continue
                for i, value in zip(wanted, values, strict=True):
                    out[i] = value
        return out

    def get(self, key: bytes) -> bytes | None:
        return self.get_many([key])[0]

    def get_into(self, key: bytes, out: Any) -> bool:
        key = check_key(key)
        peers = self._peers()
        for node_id in self._holders([key], peers)[0][:2]:
            try:
                if self._call(node_id, peers, "get_into", key, out):
                    return True
            except StoreConnectionError:
                continue
        return False

    def match_prefix(self, keys: Sequence[bytes], *, probe: bool = False) -> int:
        """How many leading ``keys`` the pool holds (each on any node), by the index."""
        keys = check_keys(keys)
        count = 0
        for nodes in self._holders(keys, self._peers()):
            if not nodes:
                break
            count += 1
        return count

    def contains(self, key: bytes) -> bool:
        key = check_key(key)
        peers = self._peers()
        for node_id in self._holders([key], peers)[0][:2]:
            try:
                if self._call(node_id, peers, "contains", key):
                    return True
            except StoreConnectionError:
                continue
        return False

    def tier_of(self, key: bytes) -> str | None:
        key = check_key(key)
        peers = self._peers()
        for node_id in self._holders([key], peers)[0][:2]:
            try:
                tier = self._call(node_id, peers, "tier_of", key)
            except StoreConnectionError:
                continue
            if tier is not None:
                return tier
        return None

    def _write(self, method: str, home: bytes, keys: list[bytes], *args: Any) -> Any:
        """``method`` on the first live node ``home`` prefers that answers."""
        peers = self._peers()
        error: Exception | None = None
        for node_id in _rendezvous(home, list(peers)):
            try:
                result = self._call(node_id, peers, method, *args)
            except StoreConnectionError as e:
                error = e
                continue
            self._wrote(keys, node_id)
            return result
        raise StoreConnectionError(f"no node of cluster {self.cluster!r} took the {method}"
                                   f"{f': {error}' if error else ' (none is live)'}")

    def put(self, key: bytes, value: Any) -> bool:
        return self._write("put", key, [key], key, value)

    def put_many(self, keys: Sequence[bytes], values: Sequence[Any]) -> int:
        """The chain to one node (its first key chooses which), which keeps it together."""
        keys = list(keys)
        if not keys:
            return self._write("put_many", b"", [], keys, values) if values else 0
        return self._write("put_many", keys[0], keys, keys, values)

    def delete(self, key: bytes) -> bool:
        """Through the node that holds it (any node deletes from the whole pool)."""
        key = check_key(key)
        peers = self._peers()
        nodes = self._holders([key], peers)[0] or _rendezvous(key, list(peers))
        self._recent.pop(key, None)
        for node_id in nodes:
            try:
                return self._call(node_id, peers, "delete", key)
            except StoreConnectionError:
                continue
        return False

    def flush(self) -> None:
        peers = self._peers()
        for node_id in peers:
            self._call(node_id, peers, "flush")

    def stats(self) -> dict[str, Any]:
        """The pool's figures, as one Store's (tiers and counts summed over the live
        nodes), and each node's own under ``nodes``."""
        peers = self._peers()
        nodes = {node_id: self._call(node_id, peers, "stats") for node_id in peers}
        total: dict[str, Any] = {"tiers": {}, "nodes": nodes}
        for stats in nodes.values():
            for name, tier in stats.get("tiers", {}).items():
                into = total["tiers"].setdefault(name, {})
                for field, figure in tier.items():
                    if isinstance(figure, int) and not isinstance(figure, bool):
                        into[field] = into.get(field, 0) + figure
            for field, figure in stats.items():
                if field != "tiers" and isinstance(figure, int) \
                        and not isinstance(figure, bool):
                    total[field] = total.get(field, 0) + figure
        queries = total.get("queries", 0)
        total["hit_rate"] = total.get("hits", 0) / queries if queries else 0.0
        return total

    def close(self) -> None:
        self._closed = True
        clients, self._clients = self._clients, {}
        for client in clients.values():
            client.close()
        self.redis.close()

    def __enter__(self) -> ClusterClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

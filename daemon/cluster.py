"""This daemon as a node of a pool (docs/CLUSTER.md): it publishes what it holds to the
pool's index in Redis, serves its blocks to peers, reads the pool's blocks for its own
clients (the remote tier), and hands what it evicts to peers with room (`daemon.spill`).

    Store ──change feed──> publisher task ──pipelined batches──> Redis (index, events)
    client get, miss here ──> index.holders (one round trip) ──> peer_get to the holder
                              (checksum checked) ──> the answer (no copy kept here)
    client put/delete ──> peer_drop to the other holders (an overwrite with other bytes,
                          or a delete, leaves no old value in the pool)
    eviction of a last copy ──> the spiller ──> peer_put to a peer with room

What it publishes: on start, and again whenever Redis may have lost it (a failed call, or
a Redis whose run id changed: restarted), the whole inventory (`Store.inventory`, which
starts the change feed in the same instant: nothing falls between the two); then every
``publish_interval_s`` the keys whose tiers changed since (`Store.take_changes`), and
keys a peer asked for that this node does not hold (a stale entry: published as gone, so
the index heals). What a peer stored or dropped at another's request is published before
the answer, so the asker sees the index changed when its call returns.

Failures are misses, never errors: Redis down, a peer dead, hung or answering corrupt
bytes, a stale entry. Every peer call is bounded by ``peer_timeout_s``; a peer that failed
one is skipped for a while (`kvstore.cluster.peers.Membership.suspect`).

A connection that says hello with the cluster's peer token (`kvstore.cluster.peers`) is a
peer: it may send the peer operations, on keys as stored, and nothing else; no tenant's
connection may send them.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import random
import secrets
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from redis.exceptions import RedisError

from daemon.connection import Connection
from daemon.frame_memory import LogThrottle
from daemon.registry import Backoff, redact_url
from daemon.spill import Spiller
from kvstore.cluster.index import ClusterIndex
from kvstore.cluster.peers import (
    SECRET_BYTES,
    Membership,
    PeerLinks,
    peer_token_of,
    registry_prefix,
    value_sum,
)
from kvstore.cluster.redis_client import run_id, sync_client
from kvstore.durable_file import DamagedKeyError, key_file
from kvstore.errors import ConfigError, KVStoreError, StoreClosedError
from kvstore.store import Store
from kvstore.tiers.base import TIER_BIT, TierKind
from kvstore.wire.error_codes import ErrorCode, RequestError

log = logging.getLogger(__name__)

PUBLISH_BATCH = 10_000  # block changes per pipelined batch
_REDIS_FAILURES = (RedisError, OSError)
_RNG = random.Random()  # the publisher's backoff jitter


def load_cluster_secret(config: Any) -> bytes:
    """The pool's secret: from ``--cluster-secret`` (made there, 32 random bytes, if the
    file does not exist: copy it to every node), else the one the cluster's first node
    left in Redis (`ConfigError` if Redis cannot be read: the node cannot join)."""
    if config.cluster_secret is not None:
        try:
            secret, made = key_file(config.cluster_secret, SECRET_BYTES)
        except DamagedKeyError as e:
            raise ConfigError(f"--cluster-secret {e}: it is damaged or not a secret file "
                              f"({SECRET_BYTES} bytes)") from e
        except OSError as e:
            raise ConfigError(f"--cluster-secret {config.cluster_secret}: cannot use it: "
                              f"{e.strerror or e}") from e
        if made:
            log.info("made a new cluster secret in %s: give every node of cluster %s a copy",
                     config.cluster_secret, config.cluster)
        return secret
    key = f"{registry_prefix(config.cluster)}:secret"
    client = sync_client(config.redis_url, timeout_s=5.0)
    try:
        client.set(key, secrets.token_bytes(SECRET_BYTES), nx=True)
        secret = client.get(key)
    except _REDIS_FAILURES as e:
        raise ConfigError(f"--redis {redact_url(config.redis_url)}: cannot read the secret "
                          f"of cluster {config.cluster!r} ({e}); start when Redis is up, or "
                          "give every node the same --cluster-secret FILE") from e
    finally:
        client.close()
    if not isinstance(secret, bytes) or len(secret) != SECRET_BYTES:
        raise ConfigError(f"Redis key {key} does not hold a {SECRET_BYTES}-byte secret")
    return secret


class ClusterMember:
    """One node's part in the pool; `start` on the daemon's loop, `stop` at shutdown."""

    def __init__(self, store: Store, *, redis_url: str, cluster: str, node_id: str,
                 secret: bytes, max_answer_data_bytes: int, secret_in_redis: bool = False,
                 ttl_s: float = 10.0,
                 publish_interval_s: float = 0.05, peer_timeout_s: float = 2.0,
                 redis_timeout_s: float = 2.0) -> None:
        self.store = store
        self.cluster = cluster
        self.node_id = node_id
        self.peer_token = peer_token_of(secret)
        # The secret kept in Redis (no --cluster-secret file), put back after a restart.
        self.shared_secret = secret if secret_in_redis else None
        self.max_answer_data_bytes = max_answer_data_bytes
        self.publish_interval_s = publish_interval_s
        self.refresh_s = min(1.0, ttl_s / 4)
        # No retries inside redis-py: a failed call is a miss here, at once.
        self.redis = sync_client(redis_url, timeout_s=redis_timeout_s)
        self.index = ClusterIndex(self.redis, cluster)
        self.membership = Membership(self.redis, cluster, node_id, suspect_s=ttl_s)
        self.links = PeerLinks(self.peer_token, timeout_s=peer_timeout_s)
        # One thread for the publisher's Redis work: batches go out in order.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="kvstored-cluster")
        # And one for what follows clients' writes (`_drop_soon`), in order.
        self._drops = ThreadPoolExecutor(1, thread_name_prefix="kvstored-drops")
        self._recheck: list[bytes] = []  # keys whose tiers to publish as they are now
        self._lock = threading.Lock()  # never held while calling the Store
        self.spiller = Spiller(self.membership, self.links, count=self._count,
                               arrived=self.recheck, peer_failed=self._peer_failed)
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._is_down = False
        self._redis_log = LogThrottle()
        self.counts = {"remote_hits": 0, "remote_misses": 0, "peer_failures": 0,
                       "published": 0, "republished": 0, "dropped_elsewhere": 0,
                       "spilled": 0, "spill_dropped": 0, "received": 0}

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="kvstored-cluster")
        self.spiller.start()
        self.store.spill_to(self.spiller.spill)

    async def stop(self) -> None:
        """Stop publishing and take this node's entries out of the index (bounded by the
        Redis timeout; if Redis is down they stay until this node is found dead)."""
        self._stopping.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.spiller.stop)
        try:
            self.store.spill_to(None)
        except StoreClosedError:
            pass
        try:
            await loop.run_in_executor(self._executor, self.index.forget_node, self.node_id)
        except _REDIS_FAILURES as e:
            log.info("could not take node %s out of the pool's index (%s); peers skip it "
                     "once its registry entry expires", self.node_id, e)
        self._executor.shutdown(wait=True)
        await loop.run_in_executor(None, self._drops.shutdown)
        self.links.close()
        self.redis.close()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        backoff, failures = Backoff(), 0
        needs_all, run_id, next_refresh = True, None, 0.0
        while not self._stopping.is_set():
            delay_s = self.publish_interval_s
            try:
                if time.monotonic() >= next_refresh:
                    new_run_id = await loop.run_in_executor(self._executor, self._refresh)
                    if run_id is not None and new_run_id != run_id:
                        log.info("Redis restarted (run id changed); node %s re-publishes "
                                 "what it holds", self.node_id)
                        needs_all = True
                    run_id, next_refresh = new_run_id, time.monotonic() + self.refresh_s
                if needs_all:
                    await loop.run_in_executor(self._executor, self._publish_all)
                    needs_all = False
                else:
                    await loop.run_in_executor(self._executor, self._publish_changes)
                if self._is_down:
                    log.info("Redis is back for the pool; node %s published its inventory "
                             "again", self.node_id)
                self._is_down, failures = False, 0
            except StoreClosedError:
                return
            except _REDIS_FAILURES as e:
                failures += 1
                needs_all = True  # what was taken from the change feed is lost with it
                if not self._is_down:
                    log.warning("Redis unreachable for the pool (%s); node %s serves its own "
                                "blocks and re-publishes them when Redis is back",
                                e, self.node_id)
                self._is_down = True
                delay_s = backoff.delay_s(failures, _RNG)
            try:
                await asyncio.wait_for(self._stopping.wait(), delay_s)
            except TimeoutError:
                pass

    def _refresh(self) -> str:
        """Read the live nodes; Redis's run id (it changes when Redis restarts)."""
        self.membership.refresh()
        self.spiller.room_read()
        return run_id(self.redis)

    def _publish_all(self) -> None:
        if self.shared_secret is not None:  # a Redis restarted empty: the secret goes back
            self.redis.set(f"{registry_prefix(self.cluster)}:secret", self.shared_secret,
                           nx=True)
        held = self.store.inventory(track=True)
        on_the_way = set(self.spiller.listed()) - {key for key, _ in held}
        held += [(key, TIER_BIT[TierKind.DRAM]) for key in on_the_way]  # (in its queue)
        with self._lock:
            self._recheck.clear()
        self.index.forget_node(self.node_id)
        for at in range(0, len(held), PUBLISH_BATCH):
            self.index.publish(self.node_id, held[at:at + PUBLISH_BATCH])
        self._count("republished", 1)
        self._count("published", len(held))
        log.info("node %s published its inventory to the pool: %d blocks", self.node_id,
                 len(held))

    def _publish_changes(self) -> None:
        changes = self.store.take_changes()
        with self._lock:
            recheck, self._recheck = self._recheck, []
        # A block on its way to a peer is listed here (served from the queue, and a drop
        # must reach this node) until it is there, even one evicted before it was ever
        # published: its removal is published then (the spiller's ``arrived``).
        listed = set(self.spiller.listed()) if any(not b for _, b in changes) else set()
        queued = TIER_BIT[TierKind.DRAM]
        changes = [(k, queued) if not b and k in listed else (k, b) for k, b in changes]
        self.spiller.owned([k for k, b in changes if not b])  # gone from here
        if recheck:
            recheck = list(dict.fromkeys(recheck))
            changes += zip(recheck, self.store.tier_bits(recheck), strict=True)
        for at in range(0, len(changes), PUBLISH_BATCH):
            self.index.publish(self.node_id, changes[at:at + PUBLISH_BATCH])
        self._count("published", len(changes))

    def _count(self, name: str, n: int) -> None:
        with self._lock:
            self.counts[name] += n

    def recheck(self, keys: Sequence[bytes]) -> None:
        """Publish the tiers of ``keys`` as they are now (a peer found them missing here)."""
        with self._lock:
            self._recheck.extend(keys)

    # -- the remote tier: the pool, for this node's clients (worker threads) ---------------

    def _holders(self, keys: Sequence[bytes]) -> tuple[dict[str, Any], dict[str, bytes]]:
        """The live peers, and which of them hold each key (node -> a tier byte per key)."""
        peers = self.membership.live()
        if not peers or not keys:
            return peers, {}
        try:
            return peers, self.index.holders(keys, peers)
        except _REDIS_FAILURES as e:
            count = self._redis_log.count()
            if count:
                log.warning("pool lookups fail (%s): remote blocks are misses; %d since the "
                            "last such line", e, count)
            return peers, {}

    def fetch(self, keys: Sequence[bytes]) -> list[bytes | memoryview | None]:
        """The values of ``keys`` from the peers that hold them (None: no live peer has
        it, or every holder asked failed): bytes from this node's spill queue, read-only
        views of a peer's answer otherwise. No copy is kept here: a copy would push out a
        block of this node's own, which has no other home (requests for a prefix are
        routed to where it lives instead: `locate`)."""
        out: list[Any] = list(self.spiller.queued(keys))  # evicted here, not at a peer yet
        asked = [i for i, v in enumerate(out) if v is None]
        peers, holders = self._holders([keys[i] for i in asked])
        if not holders:
            self._count("remote_misses", len(asked))
            return out
        # Each key's holders, fastest copy first (the lowest tier bit: HBM, DRAM, NVMe).
        choices = {i: sorted((bits[n] & -bits[n], node) for node, bits in holders.items()
                             if bits[n]) for n, i in enumerate(asked)}
        for attempt in range(2):  # a stale holder: the next one
            plan: dict[str, list[int]] = {}
            for i, options in choices.items():
                if out[i] is None and len(options) > attempt:
                    plan.setdefault(options[attempt][1], []).append(i)
            for node, wanted in plan.items():
                self._fetch_from(peers[node], [keys[i] for i in wanted], wanted, out)
        fetched = [i for i in asked if out[i] is not None]
        self._count("remote_hits", len(fetched))
        self._count("remote_misses", len(asked) - len(fetched))
        return out

    def _fetch_from(self, peer: Any, keys: list[bytes], where: list[int],
                    out: list[Any]) -> None:
        done = 0
        while done < len(keys):
            try:
                values = self.links.get(peer.address, keys[done:])
            except KVStoreError as e:
                self._peer_failed(peer, e)
                return
            if not values:
                return
            for i, value in zip(where[done:done + len(values)], values, strict=True):
                out[i] = value
            done += len(values)

    def _peer_failed(self, peer: Any, error: Exception) -> None:
        self._count("peer_failures", 1)
        self.membership.suspect(peer.node_id)
        log.warning("peer %s at %s failed (%s); its blocks are misses for now",
                    peer.node_id, peer.address, error)

    def leading(self, keys: Sequence[bytes]) -> int:
        """How many leading ``keys`` some live peer holds (each by any one of them)."""
        held = self.held_by_peers(keys)
        return next((i for i, is_held in enumerate(held) if not is_held), len(keys))

    def held_by_peers(self, keys: Sequence[bytes]) -> list[bool]:
        """For each of ``keys``, whether the pool holds it elsewhere: a live peer, by the
        index, or this node's queue of blocks on their way to one."""
        _, holders = self._holders(keys)
        spilling = self.spiller.queued(keys)
        return [spilling[i] is not None or any(bits[i] for bits in holders.values())
                for i in range(len(keys))]

    def contains(self, key: bytes) -> bool:
        """Whether a live peer holds ``key``, as that peer says (the index may be stale)."""
        peers, holders = self._holders([key])
        for node in sorted(holders, key=lambda n: holders[n][0] & -holders[n][0]):
            try:
                if self.links.held(peers[node].address, [key])[0]:
                    return True
            except KVStoreError as e:
                self._peer_failed(peers[node], e)
        return False

    def drop_elsewhere(self, keys: Sequence[bytes], sums: Sequence[int] | None) -> None:
        """Have every other holder of ``keys`` drop them (``sums``: those whose value has
        other bytes than these): after an overwrite or a delete here, no node serves the
        old value. An older value on its way to a peer (spilled) goes first; one a
        peer_put carries now is waited for (it is in the index when that returns)."""
        self.spiller.cancel(keys, sums)
        peers, holders = self._holders(keys)
        for node, bits in holders.items():
            held = [i for i in range(len(keys)) if bits[i]]
            try:
                self._count("dropped_elsewhere", self.links.drop(
                    peers[node].address, [keys[i] for i in held],
                    None if sums is None else [sums[i] for i in held]))
            except KVStoreError as e:
                self._peer_failed(peers[node], e)

    def stats(self) -> dict[str, Any]:
        return {"name": self.cluster, "node_id": self.node_id,
                "peers": sorted(self.membership.live()), "redis_ok": not self._is_down,
                "spill_queued": len(self.spiller.listed()),
                **dict(self.counts)}

    # -- the peer operations: what this node serves to its peers (on the loop) --------------

    def is_peer_token(self, token: str | None) -> bool:
        return token is not None and hmac.compare_digest(token.encode(),
                                                         self.peer_token.encode())

    @staticmethod
    def _check_peer(conn: Connection) -> None:
        if not conn.is_peer:
            raise RequestError(ErrorCode.FORBIDDEN, "peer operations are for the nodes of "
                               "the cluster (hello with the cluster's peer token)")

    def _peer_get(self, keys: list[bytes]) -> tuple[list[bytes | None], list[int]]:
        """The leading values that fit an answer, and their checksums (computed here, on
        a worker thread: 4 MiB of xxh3 would hold the event loop for a quarter of a ms)."""
        values = self.store.get_many(keys, max_bytes=self.max_answer_data_bytes)
        if None in values:  # listed here while on its way to a peer
            queued = self.spiller.queued(keys[:len(values)])
            values = [q if v is None else v for v, q in zip(values, queued, strict=True)]
        missing = [k for k, v in zip(keys, values, strict=False) if v is None]
        if missing:
            self.recheck(missing)
        return values, [0 if v is None else value_sum(v) for v in values]

    async def peer_get(self, calls: Any, conn: Connection, meta: dict[str, Any]) -> Any:
        self._check_peer(conn)
        keys = meta["keys"]
        values, sums = await calls.run(self._peer_get, keys)
        fields: dict[str, Any] = {
            "sizes": [None if v is None else len(v) for v in values], "sums": sums}
        if len(values) < len(keys):
            fields["answered"] = len(values)
        return fields, [v for v in values if v]

    async def peer_held(self, calls: Any, conn: Connection, meta: dict[str, Any]) -> Any:
        self._check_peer(conn)
        bits = await calls.run_short(self.store.tier_bits, meta["keys"])
        missing = [k for k, b in zip(meta["keys"], bits, strict=True) if not b]
        if missing:
            self.recheck(missing)
        return {"held": bits}, []

    def _peer_drop(self, keys: list[bytes], sums: list[int] | None) -> int:
        dropped: list[bytes] = []
        for i, key in enumerate(keys):
            if sums is not None:
                value = self.store.get(key)
                if value is None or value_sum(value) == sums[i]:
                    continue
            if self.store.delete(key):
                dropped.append(key)
        self.spiller.cancel(keys, sums)
        self._publish_now(dropped)
        return len(dropped)

    def deleted(self, keys: list[bytes]) -> None:
        """``keys`` were deleted here by a client: publish that now (a client that deleted
        through this node finds the index without them at once), then have every other
        holder drop them."""
        self._publish_now(keys)
        self.drop_elsewhere(keys, None)

    def _publish_now(self, keys: list[bytes]) -> None:
        """Publish ``keys``' tiers now, not at the next batch: the peer that asked sees
        the index changed when its call returns (the change feed publishes them again)."""
        if not keys:
            return
        try:
            self.index.publish(self.node_id, list(zip(keys, self.store.tier_bits(keys),
                                                      strict=True)))
        except _REDIS_FAILURES as e:
            log.debug("publishing at once failed (%s); the next batch carries it", e)

    def _peer_put(self, keys: list[bytes], values: list[Any]) -> list[bool]:
        """Store blocks a peer has no room for; never in place of a value held here (a
        client's, written meanwhile). Whether the pool now holds each here."""
        stored = [self.store.put(key, value, replace=False)
                  for key, value in zip(keys, values, strict=True)]
        received = [k for k, ok in zip(keys, stored, strict=True) if ok]
        self.spiller.received(received)
        self._publish_now(received)
        self._count("received", len(received))
        held = self.store.tier_bits(keys)
        return [bool(bits) for bits in held]

    async def peer_put(self, calls: Any, conn: Connection, meta: dict[str, Any],
                       data: Any) -> Any:
        self._check_peer(conn)
        view, values, offset = memoryview(data), [], 0
        for size in meta["sizes"]:
            values.append(view[offset:offset + size])
            offset += size
        return {"stored": await calls.run(self._peer_put, meta["keys"], values)}, []

    def after_put(self, keys: list[bytes], values: list[Any], stored: int) -> int:
        """A client's put of ``keys`` stored the leading ``stored`` of them here; the
        others found no room here and go to peers with room now (and an older value of
        them here goes). How many leading keys the pool now holds. Other nodes' older
        copies of them are dropped right after the answer (`_drop_soon`), as after a
        shared-memory commit: a lookup in Redis on every put would double its time."""
        sums = [value_sum(v) for v in values]
        self.spiller.owned(keys[:stored])  # a client's now: this node's to hand on
        if stored < len(keys):
            rest = [bytes(v) for v in values[stored:]]
            placed = self.spiller.place(keys[stored:], rest, need_room=False)
            count = next((i for i, node in enumerate(placed) if node is None), len(placed))
            self._count("spilled", count)
            for key in keys[stored:stored + count]:
                self.store.delete(key)
            stored += count
        if stored:
            self._drop_soon(keys[:stored], sums[:stored])
        return stored

    def after_commit(self, keys: list[bytes]) -> None:
        """A same-host client committed ``keys`` through the shared pool: as `after_put`,
        other nodes' older copies of them are dropped right after the answer."""
        def sums() -> tuple[list[bytes], list[int]]:
            values = [self.store.get(key) for key in keys]
            held = [(k, v) for k, v in zip(keys, values, strict=True) if v is not None]
            self.spiller.owned([k for k, _ in held])
            return [k for k, _ in held], [value_sum(v) for _, v in held]

        self._drop_soon(keys, None, sums)

    def _drop_soon(self, keys: list[bytes], sums: list[int] | None,
                   read_sums: Any = None) -> None:
        """`drop_elsewhere` on a thread of its own, in the order asked (``read_sums``:
        reads the keys and sums there first). Never raises."""
        def drop() -> None:
            try:
                held, checks = (keys, sums) if read_sums is None else read_sums()
                if held:
                    self.drop_elsewhere(held, checks)
            except StoreClosedError:
                pass
            except Exception as e:  # (a background step: logged, never raised)
                log.warning("dropping other nodes' copies after a write failed: %s", e,
                            exc_info=e)

        try:
            self._drops.submit(drop)
        except RuntimeError:  # stopping: the node's entries leave the index anyway
            pass

    async def peer_drop(self, calls: Any, conn: Connection, meta: dict[str, Any]) -> Any:
        self._check_peer(conn)
        return {"dropped": await calls.run(self._peer_drop, meta["keys"],
                                           meta.get("sums"))}, []

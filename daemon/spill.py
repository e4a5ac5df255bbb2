"""Pooled capacity: a block whose last copy an eviction drops here goes to a peer with
room instead of being lost (`Spiller`, owned by `daemon.cluster.ClusterMember`).

    eviction (store lock held) ──spill()──> queue ──spill thread──> peer_put to the peer
        with the most room (registry status, less what was sent since) ──> it publishes

Invariants (no reader gets an older value than the last one written for its key):

- A block stays listed at this node in the pool's index from its eviction until it is
  stored at the peer (which publishes it before answering); meanwhile this node serves it
  from the queue. So a drop (a delete or an overwrite elsewhere) always reaches a node
  that can act on it: this one, which cancels a queued block, waits for one in flight,
  and forwards the drop to where a block went lately (`cancel`).
- A block received from a peer never replaces a value held here (`Store.put(replace=
  False)`), and is never handed on again when evicted here: no block travels twice, so
  victims cannot ping-pong between full nodes.
- Victims go only where room is free: a full pool drops its victims as one node does,
  rather than push out its peers' newer blocks. A client's new block that finds no room
  here goes to a peer that makes room (`place(need_room=False)`).
- The queue is bounded (`QUEUE_BYTES`); past it a victim is dropped, as without a pool.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from kvstore.cluster.peers import Membership, Peer, PeerLinks, value_sum
from kvstore.errors import KVStoreError

log = logging.getLogger(__name__)

QUEUE_BYTES = 256 << 20  # evicted blocks waiting for a peer; past it they are dropped
BATCH_BYTES = 16 << 20  # per peer_put
SPILLED_TO_S = 30.0  # how long a drop of a block spilled is forwarded to where it went
SPILLED_TO_KEYS = 1 << 18


class Spiller:
    """See the module docstring. Thread-safe; its lock is never held while it calls a
    peer or the Store."""

    def __init__(self, membership: Membership, links: PeerLinks, *,
                 count: Callable[[str, int], None],
                 arrived: Callable[[list[bytes]], None],
                 peer_failed: Callable[[Peer, Exception], None]) -> None:
        """``count(name, n)`` counts spilled, spill_dropped, dropped_elsewhere;
        ``arrived(keys)``: blocks no longer listed here (publish their tiers);
        ``peer_failed(peer, error)``: a peer call failed."""
        self.membership = membership
        self.links = links
        self._count = count
        self._arrived = arrived
        self._peer_failed = peer_failed
        self._queued: dict[bytes, bytes] = {}  # key -> value, oldest eviction first
        self._queued_bytes = 0
        self._sending: set[bytes] = set()  # keys a peer_put carries now
        self._spilled_to: OrderedDict[bytes, tuple[str, float]] = OrderedDict()
        self._foreign: set[bytes] = set()  # held here, received from a peer
        self._sent_bytes: dict[str, int] = {}  # to each peer since its room was read
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="kvstored-spill", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread (after the peer_put in flight, if any); the queue is dropped."""
        with self._lock:
            self._stopped = True
            self._cv.notify_all()
        if self._thread.is_alive():
            self._thread.join()

    # -- what the rest of the node asks -----------------------------------------------------

    def spill(self, key: bytes, value: bytes) -> None:
        """An eviction drops the last copy of ``key`` here: queue it (the Store's
        ``spill_to`` hook: called with the store lock held, it only queues)."""
        with self._lock:
            if key in self._foreign:  # a peer's block: not this node's to hand on
                self._foreign.discard(key)
                return
            old = self._queued.pop(key, None)
            if old is not None:
                self._queued_bytes -= len(old)
            if self._stopped or self._queued_bytes + len(value) > QUEUE_BYTES:
                self._count("spill_dropped", 1)  # (its own lock: never waits on ours)
                return
            self._queued[key] = value
            self._queued_bytes += len(value)
            self._cv.notify_all()

    def queued(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """The values of ``keys`` waiting here for a peer (None: not waiting)."""
        with self._lock:
            return [self._queued.get(key) for key in keys]

    def listed(self) -> list[bytes]:
        """Every key on its way to a peer (listed as this node's until it arrives)."""
        with self._lock:
            return [*self._queued, *(k for k in self._sending if k not in self._queued)]

    def received(self, keys: Sequence[bytes]) -> None:
        """``keys`` were stored here for a peer: never handed on again."""
        with self._lock:
            self._foreign.update(keys)

    def owned(self, keys: Sequence[bytes]) -> None:
        """``keys`` were written here by a client (or left): this node's own again."""
        with self._lock:
            self._foreign.difference_update(keys)

    def room_read(self) -> None:
        """The peers' room was read again from the registry."""
        with self._lock:
            self._sent_bytes.clear()

    def cancel(self, keys: Sequence[bytes], sums: Sequence[int] | None) -> None:
        """Before ``keys`` are dropped from the pool (``sums``: where their value has
        other bytes): a queued one goes; one in flight is waited for; one spilled lately
        is dropped where it went (it was listed here until it got there)."""
        forward: dict[str, list[int]] = {}
        with self._lock:
            for i, key in enumerate(keys):
                queued = self._queued.get(key)
                if queued is not None and (sums is None or value_sum(queued) != sums[i]):
                    del self._queued[key]
                    self._queued_bytes -= len(queued)
            deadline = time.monotonic() + 2 * self.links.timeout_s
            while any(key in self._sending for key in keys) and time.monotonic() < deadline:
                self._cv.wait(deadline - time.monotonic())
            now = time.monotonic()
            for i, key in enumerate(keys):
                sent = self._spilled_to.get(key)
                if sent is not None and now - sent[1] < SPILLED_TO_S:
                    forward.setdefault(sent[0], []).append(i)
        if not forward:
            return
        peers = self.membership.live()
        for node, wanted in forward.items():
            if node not in peers:  # gone: its blocks are misses
                continue
            try:
                self._count("dropped_elsewhere", self.links.drop(
                    peers[node].address, [keys[i] for i in wanted],
                    None if sums is None else [sums[i] for i in wanted]))
            except KVStoreError as e:
                self._peer_failed(peers[node], e)

    def place(self, keys: list[bytes], values: list[Any], *, need_room: bool
              ) -> list[str | None]:
        """Store ``keys`` on the live peers with the most room (as of their heartbeats,
        less what was sent to them since); the node each went to (None: none). With
        ``need_room`` (victims) only where that room is free; without (a client's new
        blocks), the peer makes room."""
        placed: list[str | None] = [None] * len(keys)
        peers = self.membership.live()
        with self._lock:
            sent = dict(self._sent_bytes)
        for peer in sorted(peers.values(), key=lambda p: sent.get(p.node_id, 0) - p.free_bytes):
            left = [i for i, node in enumerate(placed) if node is None]
            if not left:
                break
            need = sum(len(values[i]) for i in left)
            if need_room and peer.free_bytes - sent.get(peer.node_id, 0) < need:
                continue
            try:
                stored = self.links.put(peer.address, [keys[i] for i in left],
                                        [values[i] for i in left])
            except KVStoreError as e:
                self._peer_failed(peer, e)
                continue
            for i, ok in zip(left, stored, strict=True):
                placed[i] = peer.node_id if ok else None
            with self._lock:
                self._sent_bytes[peer.node_id] = self._sent_bytes.get(peer.node_id, 0) + need
        return placed

    # -- the spill thread -------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._queued and not self._stopped:
                    self._cv.wait()
                if self._stopped:
                    return
                batch: list[tuple[bytes, bytes]] = []
                nbytes = 0
                for key, value in self._queued.items():  # oldest eviction first
                    if batch and nbytes + len(value) > BATCH_BYTES:
                        break
                    batch.append((key, value))
                    nbytes += len(value)
                self._sending.update(key for key, _ in batch)
            placed: list[str | None] = [None] * len(batch)
            try:
                placed = self.place([k for k, _ in batch], [v for _, v in batch],
                                    need_room=True)
            except Exception as e:  # the spiller must outlive anything a peer does
                log.warning("handing evicted blocks to peers failed: %s", e, exc_info=e)
            finally:
                self._done(batch, placed)

    def _done(self, batch: list[tuple[bytes, bytes]], placed: list[str | None]) -> None:
        now = time.monotonic()
        num_spilled = num_dropped = 0
        with self._lock:
            for (key, value), node in zip(batch, placed, strict=True):
                self._sending.discard(key)
                if node is not None:
                    self._spilled_to[key] = (node, now)
                    self._spilled_to.move_to_end(key)
                if self._queued.get(key) is value:  # not replaced nor cancelled meanwhile
                    del self._queued[key]
                    self._queued_bytes -= len(value)
                    num_spilled += node is not None
                    num_dropped += node is None
            while len(self._spilled_to) > SPILLED_TO_KEYS:
                self._spilled_to.popitem(last=False)
            self._cv.notify_all()
        self._count("spilled", num_spilled)
        self._count("spill_dropped", num_dropped)
        self._arrived([key for key, _ in batch])  # listed here until now

"""A reference model of the placement rules, for tests: slow, plain Python, a dict of
blocks and linear scans, so that each rule reads as it is stated.

The rules (those `kvstore.placement.Placement` implements for the Store and the hit-rate
simulator; tiers numbered fastest first, ``w`` the write tier, ``last`` the slowest):

- A *block* is known while some tier holds it or a known block names it as its parent
  (a *ghost*: held nowhere, kept for its children). A block's parent is set once, the
  first time it is stored with one, and kept while the block is known.
- A *use* (a put, a hit) makes a block the most recently used: ``last`` takes the next
  tick and ``uses`` grows by one.
- *Candidates* of tier t: under LRU every block t holds; under leaf-first LRU those with
  no child held in t. The *victim* is the least recently used candidate that holds no
  live pin. A pin whose lease has run out protects nothing.
- *Room* in tier t: while a value does not fit beside what t holds, its victim is
  evicted; if there is none, or it is one of the blocks the caller protects (a
  put_many's own blocks), there is no room.
- *Eviction* from t: the block is *demoted* (stored into t + 1, making room there the
  same way, protecting nothing) if no tier from t + 1 down holds it and t + 1 admits it
  (ALWAYS; SECOND_USE: used at least twice); then t drops it.
- A *put* goes to the first tier from ``w`` that has room. In a memory tier room is made
  first and the old value dropped after; a tier that takes values whole (NVMe, the
  ``whole_tiers``) drops the old value first. put_many stores a chain parent first, each
  block the child of the one before, protecting the blocks it stored before, and stops at
  the first block that finds no room.
- A *hit* is a use of the block in its fastest tier; with ``promote_on_hit`` a hit in a
  tier below ``w`` is copied up to ``w`` (making room there, protecting nothing).
- A *delete* drops every copy; dropping a block's last copy revokes its pins.
- A *flush* copies every held block that the last tier lacks into it, least recently
  used first (as a flush makes room, it may evict blocks of the last tier).
- A *reopen* starts from the last tier alone: its blocks are found oldest written first,
  each recorded with the parent it was written with, held there with a use that does not
  count (``uses`` 0).
- The simulator's *request* (`request`): the leading held blocks are the hit, counted
  before anything changes; then each block in order is a use (and a promotion) if held,
  else stored like a put_many block into the first tier with room, protecting the
  request's own new blocks; it stops at the first block with no room.

Capacities are in the same unit as the blocks' sizes: bytes, or blocks with every block
of size 1 (the simulator's counted tiers).

- A block being copied into a tier (a put, a demotion, a promotion, a flush) is *busy*
  while room is made for it: never a victim (a promotion's cascade of demotions may reach
  the tier it is copied from), and never forgotten as a ghost (a put of a ghost whose last
  child is evicted to make room). tests/placement/test_copies.py has the cases.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from kvstore.placement import Admission, EvictionPolicy

Key = bytes

def put_chain(put: Callable[[Key, int, Key | None, set[Key]], bool], keys: list[Key],
              sizes: list[int]) -> int:
    """put_many over ``put(key, nbytes, parent, protect)``: parent first, each block the
    child of the one before, protecting the blocks stored before it; how many leading
    blocks were stored."""
    parent, chain = None, set()
    for i, (key, nbytes) in enumerate(zip(keys, sizes, strict=True)):
        if not put(key, nbytes, parent, chain):
            return i
        parent = key
        chain.add(key)
    return len(keys)


@dataclass
class Block:
    key: Key
    nbytes: int
    parent: Key | None = None
    uses: int = 0
    last: int = 0  # the tick of its last use
    tiers: set[int] = field(default_factory=set)
    pins: dict[int, bool] = field(default_factory=dict)  # pin -> lease not run out


@dataclass
class Record:
    """A copy in the last tier as a reopen finds it."""

    seq: int
    parent: Key | None
    nbytes: int


class Reference:
    """See the module docstring."""

    def __init__(self, policies: list[EvictionPolicy], capacity: list[int | float], *,
                 admissions: list[Admission] | None = None, write_tier: int = 0,
                 promote_on_hit: bool = True, whole_tiers: Collection[int] = ()) -> None:
        self.policies = list(policies)
        self.capacity = list(capacity)
        self.num_tiers = len(policies)
        self.last_tier = self.num_tiers - 1
        self.admissions = list(admissions or [Admission.ALWAYS] * self.num_tiers)
        self.write_tier = write_tier
        self.promote_on_hit = promote_on_hit
        self.whole_tiers = set(whole_tiers)
        self.blocks: dict[Key, Block] = {}
        self.records: dict[Key, Record] = {}
        self.tick = 0
        self.evictions = self.demotions = self.promotions = 0
        self.hits = self.misses = 0
        self.tier_hits = [0] * self.num_tiers
        self._next_pin = 0
        self._next_seq = 0
        self._busy: set[Key] = set()  # blocks being copied: no victims, not collected

    # -- what the tests compare ---------------------------------------------------------------

    def held(self, t: int) -> list[Key]:
        """Keys tier ``t`` holds, least recently used first."""
        return [b.key for b in sorted(self.blocks.values(), key=lambda b: b.last)
                if t in b.tiers]

    def fastest(self, key: Key) -> int | None:
        block = self.blocks.get(key)
        return min(block.tiers) if block is not None and block.tiers else None

    def children_in(self, key: Key, t: int) -> int:
        return sum(1 for b in self.blocks.values() if b.parent == key and t in b.tiers)

    def victim(self, t: int) -> Key | None:
        candidates = [b for b in self.blocks.values() if t in b.tiers
                      and (self.policies[t] is EvictionPolicy.LRU
                           or self.children_in(b.key, t) == 0)
                      and not any(b.pins.values()) and b.key not in self._busy]
        return min(candidates, key=lambda b: b.last).key if candidates else None

    def used(self, t: int) -> int:
        return sum(b.nbytes for b in self.blocks.values() if t in b.tiers)

    # -- the Store's operations ---------------------------------------------------------------

    def put(self, key: Key, nbytes: int, parent: Key | None = None,
            protect: Collection[Key] = ()) -> bool:
        for t in range(self.write_tier, self.num_tiers):
            if t in self.whole_tiers:
                if self._put_whole(t, key, nbytes, parent, protect):
                    return True
            elif self._make_room(t, nbytes, protect):
                self.forget(key)
                self._insert(key, parent, nbytes, t)
                return True
        return False

    def put_many(self, keys: list[Key], sizes: list[int]) -> int:
        return put_chain(self.put, keys, sizes)

    def get(self, key: Key) -> int | None:
        """The tier of a hit (before any promotion), or None for a miss."""
        t = self.fastest(key)
        if t is None:
            self.misses += 1
            return None
        block = self.blocks[key]
        self._use(block)
        self.hits += 1
        self.tier_hits[t] += 1
        self._promote(block, t)
        return t

    def delete(self, key: Key) -> bool:
        if self.fastest(key) is None:
            return False
        self.forget(key)
        return True

    def forget(self, key: Key) -> None:
        block = self.blocks.get(key)
        if block is None or not block.tiers:
            return
        for t in sorted(block.tiers):
            self._drop(block, t)

    def pin(self, key: Key, *, live: bool) -> int:
        """Pin a held block; ``live=False``: its lease has already run out."""
        self._next_pin += 1
        self.blocks[key].pins[self._next_pin] = live
        return self._next_pin

    def unpin(self, key: Key, pin: int) -> bool:
        """True if the pin was still held and its lease had not run out."""
        block = self.blocks.get(key)
        if block is None or pin not in block.pins:
            return False
        return block.pins.pop(pin)

    def flush(self) -> None:
        last = self.last_tier
        pending = sorted((b for b in self.blocks.values() if b.tiers and last not in b.tiers),
                         key=lambda b: b.last)
        for block in pending:
            if block.tiers and last not in block.tiers:
                self._store_in(last, block)

    def reopen(self) -> Reference:
        model = Reference(self.policies, self.capacity, admissions=self.admissions,
                          write_tier=self.write_tier, promote_on_hit=self.promote_on_hit,
                          whole_tiers=self.whole_tiers)
        model.hits, model.misses, model.tier_hits = self.hits, self.misses, self.tier_hits
        for key, record in sorted(self.records.items(), key=lambda item: item[1].seq):
            block = model._ensure(key, record.parent, record.nbytes)
            model._add(block, model.last_tier)
            model._use(block)
            block.uses = 0
        return model

    # -- the simulator's request ----------------------------------------------------------------

    def request(self, keys: list[Key], input_tokens: int, block_tokens: int
                ) -> tuple[int, list[int]]:
        """Replay one request of blocks of size 1: its hit tokens and hit tokens by tier."""
        h = 0
        while h < len(keys) and self.fastest(keys[h]) is not None:
            h += 1
        tier_tokens = [0] * self.num_tiers
        for j in range(h):
            pos = j * block_tokens
            if pos < input_tokens:
                tier_tokens[self.fastest(keys[j])] += min(block_tokens, input_tokens - pos)
        parent, new = None, set()
        for key in keys:
            t = self.fastest(key)
            if t is not None:
                block = self.blocks[key]
                self._use(block)
                self._promote(block, t)
            else:
                for t in range(self.write_tier, self.num_tiers):
                    if self._make_room(t, 1, new):
                        self._insert(key, parent, 1, t)
                        new.add(key)
                        break
                else:
                    break
            parent = key
        return min(h * block_tokens, input_tokens), tier_tokens

    # -- the rules ------------------------------------------------------------------------------

    def _ensure(self, key: Key, parent: Key | None, nbytes: int) -> Block:
        block = self.blocks.get(key)
        if block is None:
            block = self.blocks[key] = Block(key, nbytes)
        elif not block.tiers:
            block.nbytes = nbytes
        if parent is not None and parent != key and block.parent is None:
            self.blocks.setdefault(parent, Block(parent, 0))
            block.parent = parent
        return block

    def _use(self, block: Block) -> None:
        self.tick += 1
        block.last = self.tick
        block.uses += 1

    def _insert(self, key: Key, parent: Key | None, nbytes: int, t: int) -> None:
        block = self._ensure(key, parent, nbytes)
        self._use(block)
        self._add(block, t)

    def _put_whole(self, t: int, key: Key, nbytes: int, parent: Key | None,
                   protect: Collection[Key]) -> bool:
        self.forget(key)
        block = self._ensure(key, parent, nbytes)
        self._use(block)
        stored = self._store_in(t, block, protect)
        if not stored:
            self._collect()
        return stored

    def _promote(self, block: Block, t: int) -> None:
        w = self.write_tier
        if not (self.promote_on_hit and t > w):
            return
        if self._store_in(w, block, ()):
            self.promotions += 1

    def _store_in(self, t: int, block: Block, protect: Collection[Key] = ()) -> bool:
        """A copy of ``block`` into tier ``t``, making room (``block`` busy meanwhile);
        False if it finds none."""
        if block.nbytes > self.capacity[t]:
            return False
        self._busy.add(block.key)
        try:
            if not self._make_room(t, block.nbytes, protect):
                return False
        finally:
            self._busy.discard(block.key)
        assert self.blocks.get(block.key) is block, "a busy block was forgotten"
        self._add(block, t)
        return True

    def _make_room(self, t: int, nbytes: int, protect: Collection[Key]) -> bool:
        while self.used(t) + nbytes > self.capacity[t]:
            victim = self.victim(t)
            if victim is None or victim in protect:
                return False
            self._evict(self.blocks[victim], t)
        return True

    def _evict(self, block: Block, t: int) -> None:
        self.evictions += 1
        lower = t + 1
        if (lower < self.num_tiers and not any(u >= lower for u in block.tiers)
                and self._admits(lower, block) and self._store_in(lower, block)):
            self.demotions += 1
        self._drop(block, t)

    def _admits(self, t: int, block: Block) -> bool:
        return self.admissions[t] is Admission.ALWAYS or block.uses >= 2

    def _add(self, block: Block, t: int) -> None:
        block.tiers.add(t)
        if t == self.last_tier:
            self._next_seq += 1
            self.records[block.key] = Record(self._next_seq, block.parent, block.nbytes)

    def _drop(self, block: Block, t: int) -> None:
        block.tiers.discard(t)
        if t == self.last_tier:
            del self.records[block.key]
        if not block.tiers:
            block.pins.clear()  # revoked: what was read under them is suspect
            self._collect()

    def _has_children(self, key: Key) -> bool:
        return any(b.parent == key for b in self.blocks.values())

    def _collect(self) -> None:
        """Forget blocks held nowhere that no known block names as parent."""
        while True:
            unused = [key for key, b in self.blocks.items()
                      if not b.tiers and key not in self._busy
                      and not self._has_children(key)]
            if not unused:
                return
            for key in unused:
                del self.blocks[key]

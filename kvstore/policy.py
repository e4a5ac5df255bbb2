"""Eviction and admission policies, per tier (pure Python, no torch).

Eviction picks a victim among a tier's unpinned blocks:

- ``LEAF_LRU`` (default): only *leaves* of the tier (blocks with no child in the same
  tier) are candidates, least recently used first. A child is useless without its
  parent, so a chain is eaten from its tail and a shared system prompt, the root of many
  chains, stays while any conversation under it does.
- ``LRU``: every block is a candidate, least recently used first (the classic baseline).

A tier may split its blocks into *partitions* (the DRAM tier uses its slab size classes,
since evicting a 4 KiB block frees no room for a 1 MiB one); victims are chosen within
the partition that needs room. Blocks also have an *owner* (the tenant that wrote them, 0
for none): `victim` can be asked for one owner's blocks only (a tenant over its quota makes
room from its own blocks), or for any owner's (the least recently used of them all).

Implementation: one lazy min-heap of ``(tick, key)`` per partition and owner. Every candidate has
at least one item whose tick is at most its ``last_access``, so a use of a block costs
nothing here: `BlockIndex.touch` only moves its ``last_access`` forward. `victim` pops the
smallest item; one whose block is gone or no longer a candidate is dropped, one whose tick
is older than its block's ``last_access`` goes back in under that tick, and the first item
whose tick is current is the least recently used candidate (every other candidate's items
are no smaller, and none of them is older than its item). Each use is re-filed at most
once, when it reaches the top; the heap is purged to one item per candidate when it grows
past twice the tier's blocks.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

from kvstore.index import BlockEntry, BlockIndex
from kvstore.placement.rules import MAX_OWNER, OWNER_BITS, Admission, EvictionPolicy

_OWNER_BITS = OWNER_BITS  # a heap's key: partition << _OWNER_BITS | owner


class TierPolicy:
    """LRU over all of a tier's blocks; subclasses narrow the candidates."""

    kind = EvictionPolicy.LRU

    def __init__(self, index: BlockIndex, tier: int,
                 partition_of: Callable[[int], int] | None = None) -> None:
        self.index = index
        self.tier = tier
        self.partition_of = partition_of
        self._heaps: dict[int, list[tuple[int, bytes]]] = {}  # heap key -> lazy heap
        self._num_resident: dict[int, int] = {}  # heap key -> blocks resident
        self._heap_keys: dict[int, list[int]] = {}  # partition -> its heap keys, by owner

    def _heap_key(self, entry: BlockEntry) -> int:
        partition = self.partition_of(entry.nbytes) if self.partition_of is not None else 0
        return partition << _OWNER_BITS | entry.owner

    def is_candidate(self, entry: BlockEntry) -> bool:
        return bool(entry.residency >> self.tier & 1)

    def _heap(self, key: int) -> list[tuple[int, bytes]]:
        heap = self._heaps.get(key)
        if heap is None:
            heap = self._heaps[key] = []
            self._heap_keys.setdefault(key >> _OWNER_BITS, []).append(key)
        return heap

    def _push(self, entry: BlockEntry) -> None:
        partition_of = self.partition_of  # inlined `_heap_key`: the replay's hottest path
        key = (partition_of(entry.nbytes) << _OWNER_BITS if partition_of is not None
               else 0) | entry.owner
        heap = self._heaps.get(key)
        if heap is None:
            heap = self._heap(key)
        heapq.heappush(heap, (entry.last_access, entry.key))
        if len(heap) > 2 * self._num_resident.get(key, 0) + 64:
            self._purge(key)

    def _purge(self, key: int) -> None:
        entries = self.index.entries
        live = {}
        for _, block in self._heaps[key]:
            entry = entries.get(block)
            if entry is not None and self.is_candidate(entry):
                live[block] = (entry.last_access, block)
        heap = list(live.values())
        heapq.heapify(heap)
        self._heaps[key] = heap

    # -- hooks the index calls ------------------------------------------------------------------

    def on_insert(self, entry: BlockEntry) -> None:
        partition_of = self.partition_of
        key = (partition_of(entry.nbytes) << _OWNER_BITS if partition_of is not None
               else 0) | entry.owner
        num_resident = self._num_resident
        num_resident[key] = num_resident.get(key, 0) + 1
        if self.is_candidate(entry):
            heap = self._heaps.get(key)
            if heap is None:
                heap = self._heap(key)
            heapq.heappush(heap, (entry.last_access, entry.key))
            if len(heap) > 2 * num_resident[key] + 64:
                self._purge(key)

    def on_remove(self, entry: BlockEntry) -> None:
        self._num_resident[self._heap_key(entry)] -= 1

    def on_leaf(self, entry: BlockEntry) -> None:
        """``entry`` lost its last child in this tier."""

    # -- decisions ------------------------------------------------------------------------------

    def victim(self, partition: int | None = 0, owner: int | None = None
               ) -> BlockEntry | None:
        """The block to evict next, or None if none can be evicted: from ``partition``
        (None: any), of ``owner`` (None: any; then the least recently used of all)."""
        if partition is None:
            keys = [k for keys in self._heap_keys.values() for k in keys]
        else:
            keys = self._heap_keys.get(partition, ())
            if owner is None and len(keys) == 1:  # one owner: the common case
                return self._top(keys[0])
        if owner is not None:
            keys = [k for k in keys if k & MAX_OWNER == owner]
        best = None
        for key in keys:
            found = self._top(key)
            if found is not None and (best is None or found.last_access < best.last_access):
                best = found
        return best

    def _top(self, key: int) -> BlockEntry | None:
        """The least recently used candidate of heap ``key`` that is not pinned, left in it."""
        heap = self._heaps[key]
        if not heap:
            return None
        entries = self.index.entries
        pinned: list[tuple[int, bytes]] = []
        found = None
        while heap:
            item = heapq.heappop(heap)
            entry = entries.get(item[1])
            if entry is None or not self.is_candidate(entry):
                continue  # stale
            if self._heap_key(entry) != key:
                # It came back with another owner or size since it was filed here: its
                # items belong in that heap (it was pushed there when it came back).
                continue
            if entry.last_access != item[0]:  # used since it was filed: file it anew
                heapq.heappush(heap, (entry.last_access, item[1]))
                continue
            if self.index.is_pinned(entry):
                pinned.append(item)
                continue
            found = entry
            heapq.heappush(heap, item)  # stays valid until the caller removes the entry
            break
        for item in pinned:
            heapq.heappush(heap, item)
        return found

    def partitions(self) -> list[int]:
        """The partitions that hold blocks of this tier."""
        counts: dict[int, int] = {}
        for key, n in self._num_resident.items():
            counts[key >> _OWNER_BITS] = counts.get(key >> _OWNER_BITS, 0) + n
        return [p for p, n in counts.items() if n > 0]


class LeafFirstLRU(TierPolicy):
    kind = EvictionPolicy.LEAF_LRU

    def is_candidate(self, entry: BlockEntry) -> bool:
        return bool(entry.residency >> self.tier & 1) and entry.children[self.tier] == 0

    def on_leaf(self, entry: BlockEntry) -> None:
        self._push(entry)


POLICY_CLASSES: dict[EvictionPolicy, type[TierPolicy]] = {
    EvictionPolicy.LRU: TierPolicy,
    EvictionPolicy.LEAF_LRU: LeafFirstLRU,
}


def make_policy(kind: EvictionPolicy, index: BlockIndex, tier: int,
                partition_of: Callable[[int], int] | None = None) -> TierPolicy:
    return POLICY_CLASSES[kind](index, tier, partition_of)


def admits(admission: Admission, entry: BlockEntry) -> bool:
    """Whether a tier with this admission rule takes ``entry`` when it is demoted."""
    if admission is Admission.SECOND_USE:
        return entry.num_uses >= 2
    return True

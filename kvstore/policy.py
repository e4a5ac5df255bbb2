"""Eviction and admission policies, per tier (pure Python, no torch).

Eviction picks a victim among a tier's unpinned blocks:

- ``LEAF_LRU`` (default): only *leaves* of the tier (blocks with no child in the same
  tier) are candidates, least recently used first. A child is useless without its
  parent, so a chain is eaten from its tail and a shared system prompt, the root of many
  chains, stays while any conversation under it does.
- ``LRU``: every block is a candidate, least recently used first (the classic baseline).

A tier may split its blocks into *partitions* (the DRAM tier uses its slab size classes,
since evicting a 4 KiB block frees no room for a 1 MiB one); victims are chosen within
the partition that needs room.

Implementation: one lazy min-heap of ``(tick, key)`` per partition. Every candidate has
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

import enum
import heapq
from collections.abc import Callable

from kvstore.index import BlockEntry, BlockIndex


class EvictionPolicy(enum.Enum):
    LEAF_LRU = "leaf-lru"
    LRU = "lru"


class Admission(enum.Enum):
    """Which demoted blocks a tier (NVMe) accepts."""

    ALWAYS = "always"
    SECOND_USE = "second-use"  # only blocks used at least twice: saves SSD wear on one-hit blocks


class TierPolicy:
    """LRU over all of a tier's blocks; subclasses narrow the candidates."""

    kind = EvictionPolicy.LRU

    def __init__(self, index: BlockIndex, tier: int,
                 partition_of: Callable[[int], int] | None = None) -> None:
        self.index = index
        self.tier = tier
        self.partition_of = partition_of
        self._heaps: dict[int, list[tuple[int, bytes]]] = {}
        self._num_resident: dict[int, int] = {}

    def _partition(self, entry: BlockEntry) -> int:
        return self.partition_of(entry.nbytes) if self.partition_of is not None else 0

    def is_candidate(self, entry: BlockEntry) -> bool:
        return bool(entry.residency >> self.tier & 1)

    def _push(self, entry: BlockEntry) -> None:
        partition = self._partition(entry)
        heap = self._heaps.get(partition)
        if heap is None:
            heap = self._heaps[partition] = []
        heapq.heappush(heap, (entry.last_access, entry.key))
        if len(heap) > 2 * self._num_resident.get(partition, 0) + 64:
            self._purge(partition)

    def _purge(self, partition: int) -> None:
        entries = self.index.entries
        live = {}
        for _, key in self._heaps[partition]:
            entry = entries.get(key)
            if entry is not None and self.is_candidate(entry):
                live[key] = (entry.last_access, key)
        heap = list(live.values())
        heapq.heapify(heap)
        self._heaps[partition] = heap

    # -- hooks the index calls ------------------------------------------------------------------

    def on_insert(self, entry: BlockEntry) -> None:
        partition = self._partition(entry)
        num_resident = self._num_resident
        num_resident[partition] = num_resident.get(partition, 0) + 1
        if self.is_candidate(entry):
            heap = self._heaps.get(partition)
            if heap is None:
                heap = self._heaps[partition] = []
            heapq.heappush(heap, (entry.last_access, entry.key))
            if len(heap) > 2 * num_resident[partition] + 64:
                self._purge(partition)

    def on_remove(self, entry: BlockEntry) -> None:
        self._num_resident[self._partition(entry)] -= 1

    def on_leaf(self, entry: BlockEntry) -> None:
        """``entry`` lost its last child in this tier."""

    # -- decisions ------------------------------------------------------------------------------

    def victim(self, partition: int = 0) -> BlockEntry | None:
        """The block to evict next from ``partition``, or None if none can be evicted."""
        heap = self._heaps.get(partition)
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
        return [p for p, n in self._num_resident.items() if n > 0]


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

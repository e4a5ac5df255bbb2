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

Implementation: one lazy min-heap of ``(last_access, key)`` per partition. A heap item is
valid only while its block is resident, still a candidate, and its ``last_access`` equals
the item's tick; stale items are skipped when popped and purged when the heap grows past
twice its live size. Every candidate always has one valid item, so a victim costs
O(log n) amortized.
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
        for tick, key in self._heaps[partition]:
            entry = entries.get(key)
            if entry is not None and entry.last_access == tick and self.is_candidate(entry):
                live[key] = (tick, key)
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

    def on_access(self, entry: BlockEntry) -> None:
        if self.is_candidate(entry):
            self._push(entry)

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
            if entry is None or entry.last_access != item[0] or not self.is_candidate(entry):
                continue  # stale
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

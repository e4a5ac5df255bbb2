"""The block index: which keys exist, their prefix tree, and which tiers hold them.

Pure Python, no torch: the hit-rate simulator replays traces through this same code.

Invariants:
- ``entry.residency`` is a bit set of tier ids (0 = fastest) holding a committed copy.
- ``entry.children[t]`` is the number of child entries resident in tier ``t``; a block
  is a *leaf* of tier ``t`` when that count is 0. Leaf-first eviction relies on it.
- An entry with no residency lives on as a *ghost* while it has child entries, so a
  parent that comes back later finds its children counted. A ghost with no children is
  removed, and so on up the chain.
- Pins are ``{pin_id: deadline}``; an expired pin no longer protects its block, and a
  revoked pin (block evicted, deleted or overwritten) tells its holder the copy it made
  may be torn, so the holder must treat it as a miss.
- ``entry.owner`` is the tenant that wrote the block (0: none; set while it has no copy).
  ``usage(owner)`` is the sum of ``nbytes`` and the count of that owner's blocks per tier,
  kept as copies come and go: what per-tenant quotas are checked against.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvstore.policy import TierPolicy


class BlockEntry:
    __slots__ = (
        "children",
        "key",
        "last_access",
        "nbytes",
        "num_child_entries",
        "num_uses",
        "owner",
        "parent",
        "pins",
        "residency",
    )

    def __init__(self, key: bytes, parent: bytes | None, nbytes: int, num_tiers: int) -> None:
        self.key = key
        self.parent = parent
        self.nbytes = nbytes
        self.residency = 0
        self.children = [0] * num_tiers
        self.num_child_entries = 0
        self.last_access = 0
        self.num_uses = 0
        self.owner = 0
        self.pins: dict[int, float] | None = None

    def is_in(self, tier: int) -> bool:
        return bool(self.residency >> tier & 1)

    @property
    def fastest_tier(self) -> int | None:
        residency = self.residency
        return (residency & -residency).bit_length() - 1 if residency else None

    def __repr__(self) -> str:
        return (f"BlockEntry({self.key.hex()[:8]}, tiers={self.residency:b}, "
                f"children={self.children}, t={self.last_access})")


class Usage:
    """One owner's blocks per tier: value bytes and counts."""

    __slots__ = ("nbytes", "num_blocks")

    def __init__(self, num_tiers: int) -> None:
        self.nbytes = [0] * num_tiers
        self.num_blocks = [0] * num_tiers


class BlockIndex:
    """Keys, parents and tier residency of every block; the policies see it through hooks."""

    def __init__(self, num_tiers: int) -> None:
        self.num_tiers = num_tiers
        self.entries: dict[bytes, BlockEntry] = {}
        self.policies: list[TierPolicy] = []
        self.tick = 0
        self._pin_ids = itertools.count(1)
        self._usage: dict[int, Usage] = {}  # owner (not 0) -> bytes and blocks per tier

    def attach(self, policies: list[TierPolicy]) -> None:
        if len(policies) != self.num_tiers:
            raise ValueError(f"need one policy per tier ({self.num_tiers}), got {len(policies)}")
        self.policies = policies

    # -- lookups ------------------------------------------------------------------------------

    def get(self, key: bytes) -> BlockEntry | None:
        """The entry of a key held in at least one tier (ghosts are not found)."""
        entry = self.entries.get(key)
        return entry if entry is not None and entry.residency else None

    def match_prefix(self, keys: Iterable[bytes]) -> int:
        entries = self.entries
        count = 0
        for key in keys:
            entry = entries.get(key)
            if entry is None or not entry.residency:
                break
            count += 1
        return count

    def __len__(self) -> int:
        return sum(1 for e in self.entries.values() if e.residency)

    # -- structure ----------------------------------------------------------------------------

    def ensure(self, key: bytes, parent: bytes | None, nbytes: int,
               owner: int = 0) -> BlockEntry:
        """The entry of ``key``, created as a ghost if new (of ``owner``); links ``parent``
        if it had none. A ghost takes the new size and owner."""
        entry = self.entries.get(key)
        if entry is None:
            entry = BlockEntry(key, None, nbytes, self.num_tiers)
            entry.owner = owner
            self.entries[key] = entry
        elif not entry.residency:
            entry.nbytes = nbytes
            entry.owner = owner
        if parent is not None and entry.parent is None and parent != key:
            self._link(entry, parent)
        return entry

    def insert(self, key: bytes, parent: bytes | None, nbytes: int, tier: int,
               owner: int = 0) -> BlockEntry:
        """A committed copy of ``key`` (written by ``owner``) now lies in ``tier`` and
        counts as a use.

        Same effect as ``ensure``, ``touch``, ``add`` in that order (the order the Store
        needs, so ``add`` files the entry under its new tick); the brand-new key, the
        common case of a put, takes a short path.
        """
        entries = self.entries
        entry = entries.get(key)
        if entry is not None:
            entry = self.ensure(key, parent, nbytes, owner)
            self.touch(entry)
            self.add(entry, tier)
            return entry
        entry = BlockEntry(key, None, nbytes, self.num_tiers)
        if owner:
            entry.owner = owner
            self._charge(entry, tier, 1)
        entries[key] = entry
        self.tick += 1
        entry.last_access = self.tick
        entry.num_uses = 1
        entry.residency = 1 << tier
        if parent is not None and parent != key:
            parent_entry = entries.get(parent)
            if parent_entry is None:
                parent_entry = BlockEntry(parent, None, 0, self.num_tiers)
                entries[parent] = parent_entry
            entry.parent = parent
            parent_entry.num_child_entries += 1
            parent_entry.children[tier] += 1
        self.policies[tier].on_insert(entry)
        return entry

    def _link(self, entry: BlockEntry, parent_key: bytes) -> None:
        parent = self.entries.get(parent_key)
        if parent is None:
            parent = BlockEntry(parent_key, None, 0, self.num_tiers)
            self.entries[parent_key] = parent
        entry.parent = parent_key
        parent.num_child_entries += 1
        residency, tier = entry.residency, 0
        while residency:
            if residency & 1:
                self._child_added(parent, tier)
            residency >>= 1
            tier += 1

    def add(self, entry: BlockEntry, tier: int) -> None:
        """``entry`` now has a committed copy in ``tier``."""
        if entry.residency >> tier & 1:
            return
        entry.residency |= 1 << tier
        if entry.owner:
            self._charge(entry, tier, 1)
        if entry.parent is not None:
            self._child_added(self.entries[entry.parent], tier)
        self.policies[tier].on_insert(entry)

    def remove(self, entry: BlockEntry, tier: int) -> None:
        """``entry`` no longer has a copy in ``tier``; drop it if nothing refers to it."""
        if not entry.residency >> tier & 1:
            return
        entry.residency &= ~(1 << tier)
        if entry.owner:
            self._charge(entry, tier, -1)
        self.policies[tier].on_remove(entry)
        parent = self.entries[entry.parent] if entry.parent is not None else None
        if parent is not None:
            parent.children[tier] -= 1
            assert parent.children[tier] >= 0, f"child count below zero for {parent!r}"
            if parent.children[tier] == 0 and parent.residency >> tier & 1:
                self.policies[tier].on_leaf(parent)
        if not entry.residency:
            entry.pins = None
            self.drop_if_unused(entry)

    def _charge(self, entry: BlockEntry, tier: int, sign: int) -> None:
        usage = self._usage.get(entry.owner)
        if usage is None:
            usage = self._usage[entry.owner] = Usage(self.num_tiers)
        usage.nbytes[tier] += sign * entry.nbytes
        usage.num_blocks[tier] += sign
        assert usage.nbytes[tier] >= 0, f"owner {entry.owner} uses less than nothing"

    def usage(self, owner: int) -> Usage:
        """What ``owner``'s blocks take in each tier (a copy)."""
        usage = self._usage.get(owner)
        copy = Usage(self.num_tiers)
        if usage is not None:
            copy.nbytes[:], copy.num_blocks[:] = usage.nbytes, usage.num_blocks
        return copy

    def used_by(self, owner: int, tier: int) -> int:
        """Bytes of ``owner``'s values in ``tier`` (0 for owner 0: nobody's, not counted)."""
        usage = self._usage.get(owner)
        return 0 if usage is None else usage.nbytes[tier]

    def _child_added(self, parent: BlockEntry, tier: int) -> None:
        parent.children[tier] += 1

    def drop_if_unused(self, entry: BlockEntry) -> None:
        """Delete ``entry`` (and ghost ancestors) if no tier holds it and no child names it."""
        while entry is not None and not entry.residency and not entry.num_child_entries:
            del self.entries[entry.key]
            if entry.parent is None:
                return
            parent = self.entries[entry.parent]
            parent.num_child_entries -= 1
            entry = parent

    def touch(self, entry: BlockEntry) -> None:
        """Record a use: the entry becomes the most recently used in every tier holding it
        (the policies read ``last_access`` lazily, when they look for a victim)."""
        self.tick += 1
        entry.last_access = self.tick
        entry.num_uses += 1

    # -- pins ---------------------------------------------------------------------------------

    def pin(self, entry: BlockEntry, lease_s: float) -> int:
        pin_id = next(self._pin_ids)
        if entry.pins is None:
            entry.pins = {}
        entry.pins[pin_id] = time.monotonic() + lease_s
        return pin_id

    def unpin(self, entry: BlockEntry, pin_id: int) -> bool:
        """Release a pin; False if it had been revoked or had expired (the copy is suspect)."""
        pins = entry.pins
        if not pins or pin_id not in pins:
            return False
        deadline = pins.pop(pin_id)
        if not pins:
            entry.pins = None
        return deadline >= time.monotonic()

    def is_pinned(self, entry: BlockEntry) -> bool:
        pins = entry.pins
        if not pins:
            return False
        now = time.monotonic()
        for pin_id in [p for p, deadline in pins.items() if deadline < now]:
            del pins[pin_id]
        if not pins:
            entry.pins = None
            return False
        return True

    def live_pins(self, entry: BlockEntry) -> list[int]:
        """Ids of the pins on ``entry`` whose lease has not run out."""
        return list(entry.pins or ()) if self.is_pinned(entry) else []

    @staticmethod
    def revoke_pins(entry: BlockEntry) -> None:
        entry.pins = None

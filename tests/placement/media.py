"""A small in-memory media for the placement core's tests: tiers with byte capacities and
no bytes.

It implements the media protocol of `kvstore.placement` (``reserve``, ``fits``,
``write``, ``source``, ``drop``, ``retire``, ``reclaim``) plus ``commit`` for the
Store's memory write path (a reserved slot filled by the caller, then committed as a
key's value). A slot is a number; a committed slot holds a `Copy`.

What it checks as it goes (the core must never ask otherwise):

- a tier's reserved and committed bytes stay within its capacity (``reserve`` says no);
- a slot is committed once, by the tier that reserved it, and a tier holds one copy of a
  key at a time;
- a copy is written from a source that is still committed: a demotion, promotion or
  flush whose source copy was dropped before the write would copy freed (in a real
  tier, reused) bytes. Such writes are recorded in ``torn`` rather than raised, so a test
  can report them.

``write_seq`` orders the copies of the last tier by when they were written, the order
in which a restart finds them (the NVMe tier's log order).
"""

from __future__ import annotations

from dataclasses import dataclass

Key = bytes


@dataclass(eq=False)
class Copy:
    """A committed copy of ``key`` in tier ``t``'s ``slot``."""

    key: Key
    parent: Key | None
    nbytes: int
    t: int
    slot: int
    write_seq: int


@dataclass(frozen=True)
class Value:
    """What a put writes: a new value of ``key``, not a copy of another tier's."""

    key: Key


class MemoryMedia:
    """See the module docstring."""

    def __init__(self, capacity_bytes: list[int]) -> None:
        self.capacity_bytes = list(capacity_bytes)
        self.num_tiers = len(capacity_bytes)
        self.used_bytes = [0] * self.num_tiers
        self.reserved: list[dict[int, int]] = [{} for _ in capacity_bytes]  # slot -> bytes
        self.copies: list[dict[Key, Copy]] = [{} for _ in capacity_bytes]
        self.torn: list[tuple[Key, int]] = []  # (key, tier written) of torn writes
        self._next_slot = 0
        self._next_seq = 0

    # -- the media protocol -----------------------------------------------------------------

    def reserve(self, t: int, nbytes: int) -> int | None:
        if self.used_bytes[t] + nbytes > self.capacity_bytes[t]:
            return None
        self._next_slot += 1
        self.used_bytes[t] += nbytes
        self.reserved[t][self._next_slot] = nbytes
        return self._next_slot

    def fits(self, t: int, nbytes: int) -> bool:
        return nbytes <= self.capacity_bytes[t]

    def write(self, t: int, slot: int, key: Key, parent: Key | None, nbytes: int,
              src: Copy | Value | None) -> bool:
        if isinstance(src, Copy) and self.copies[src.t].get(src.key) is not src:
            self.torn.append((key, t))
        self.commit(t, slot, key, parent, nbytes)
        return True

    def source(self, t: int, key: Key) -> Copy:
        return self.copies[t][key]

    def drop(self, t: int, key: Key, how: int) -> None:
        copy = self.copies[t].pop(key)
        self.used_bytes[t] -= copy.nbytes

    def retire(self, t: int, key: Key, pins: list[int]) -> bool:
        return False  # no readers copy from these slots: a dropped copy is gone at once

    def reclaim(self, t: int, nbytes: int, can_free: object) -> list[Key] | None:
        return None  # no pool to defragment: room comes only from victims

    # -- the Store's memory write path ------------------------------------------------------

    def commit(self, t: int, slot: int, key: Key, parent: Key | None, nbytes: int) -> None:
        reserved = self.reserved[t].pop(slot, None)
        assert reserved == nbytes, f"slot {slot} of tier {t} was not reserved for {nbytes} bytes"
        assert key not in self.copies[t], f"tier {t} already holds a copy of {key!r}"
        self._next_seq += 1
        self.copies[t][key] = Copy(key, parent, nbytes, t, slot, self._next_seq)

    # -- what the tests read ----------------------------------------------------------------

    def keys_in(self, t: int) -> set[Key]:
        return set(self.copies[t])

    def survivors(self) -> tuple[MemoryMedia, list[Copy]]:
        """A restart: a new media whose last tier keeps its copies (the others are lost),
        and those copies oldest written first."""
        media = MemoryMedia(self.capacity_bytes)
        last = self.num_tiers - 1
        kept = sorted(self.copies[last].values(), key=lambda c: c.write_seq)
        media.copies[last] = {c.key: c for c in kept}
        media.used_bytes[last] = sum(c.nbytes for c in kept)
        media._next_slot, media._next_seq = self._next_slot, self._next_seq
        return media, kept

    def check(self) -> None:
        for t in range(self.num_tiers):
            held = sum(c.nbytes for c in self.copies[t].values())
            assert self.used_bytes[t] == held + sum(self.reserved[t].values()), t
            assert self.used_bytes[t] <= self.capacity_bytes[t], t

"""The NVMe tier's record index: which record of each key is live, which are stale, and what
each segment holds. In memory only: the log (`kvstore.tiers.nvme.log`) rebuilds it at open
and keeps it true as it writes and compacts; the tier makes a record it wrote live, and
forgets keys. Not thread-safe: the tier's lock guards it.

Invariants
- A key has at most one *live* record. Every other record of a key still on disk
  (overwritten, evicted, corrupt, tombstones) is *stale*; `stale_segments(key)` lists the
  segments that hold them (one entry per record).
- A key that is not live but has records in two or more segments is *pinned*: dropping its
  newest record would let an older one win at the next open, so compaction writes a
  tombstone in its place. `used_bytes` = live footprint + one tombstone per pinned key.
- Each `Segment` counts the live records, stale records and owed tombstones above that sit
  in it, and the totals here are the sums over the segments.
"""

from __future__ import annotations

from collections.abc import ItemsView

from kvstore.tiers.nvme.record import (
    TOMBSTONE_FOOTPRINT,
    ScannedRecord,
    is_detached,
    record_footprint,
)

__all__ = ["RecordIndex", "RecordLoc", "Segment"]


class Segment:
    __slots__ = ("disk_bytes", "is_stuck", "live_bytes", "num_live", "num_stale", "pinned_bytes",
                 "seq")

    def __init__(self, seq: int, disk_bytes: int = 0) -> None:
        self.seq = seq
        self.disk_bytes = disk_bytes   # file size (for the active one: once its buffer is written)
        self.live_bytes = 0
        self.num_live = 0
        self.num_stale = 0
        self.pinned_bytes = 0          # tombstones owed for pinned keys whose newest record is here
        self.is_stuck = False          # its compaction failed for a reason other than I/O

    @property
    def reclaimable_bytes(self) -> int:
        return self.disk_bytes - self.live_bytes - self.pinned_bytes


class RecordLoc:
    """Where a live record's payload is, and what its header said."""

    __slots__ = ("flags", "offset", "parent", "payload_checksum", "raw_len", "seq", "stored_len")

    def __init__(self, seq: int, offset: int, stored_len: int, raw_len: int, flags: int,
                 parent: bytes | None, payload_checksum: int) -> None:
        self.seq = seq
        self.offset = offset
        self.stored_len = stored_len
        self.raw_len = raw_len
        self.flags = flags
        self.parent = parent
        self.payload_checksum = payload_checksum

    @property
    def footprint(self) -> int:
        return record_footprint(self.stored_len)

    def is_record(self, record: ScannedRecord) -> bool:
        """Whether ``record``, scanned from this loc's segment, is this loc's record: a data
        record of the same shape at the same payload offset. The payload offset alone does
        not tell: an empty inline record (a tombstone, say) whose header ends on a 4 KiB
        boundary has the payload offset of the detached record written next."""
        return (record.offset == self.offset and not record.header.is_tombstone
                and record.header.is_detached == is_detached(self.stored_len))


class RecordIndex:
    """The live, stale and pinned records of one tier's segments; see the module docstring."""

    def __init__(self) -> None:
        self.segments: dict[int, Segment] = {}
        self._live: dict[bytes, RecordLoc] = {}
        self._stale: dict[bytes, list[int]] = {}
        self._pinned: dict[bytes, int] = {}  # key -> segment of its newest record
        self.live_bytes = self.pinned_bytes = self.disk_bytes = 0
        self.live_raw_bytes = self.live_stored_bytes = 0

    # -- reading -------------------------------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        return self.live_bytes + self.pinned_bytes

    def __len__(self) -> int:
        return len(self._live)

    def find(self, key: bytes) -> RecordLoc | None:
        """Where the live record of ``key`` is, or None."""
        return self._live.get(key)

    def has_records_of(self, key: bytes) -> bool:
        """Whether any record of ``key`` is on disk (live, stale or a tombstone)."""
        return key in self._live or key in self._stale

    def is_pinned(self, key: bytes) -> bool:
        return key in self._pinned

    def stale_segments(self, key: bytes) -> list[int] | None:
        """The segments holding the stale records of ``key`` (one entry per record)."""
        return self._stale.get(key)

    def live_items(self) -> ItemsView[bytes, RecordLoc]:
        return self._live.items()

    def keys_with_stale(self) -> list[bytes]:
        return list(self._stale)

    def keys_with_stale_in(self, seq: int) -> list[bytes]:
        return [key for key, stale in self._stale.items() if seq in stale]

    # -- segments ------------------------------------------------------------------------------

    def add_segment(self, seq: int, disk_bytes: int = 0) -> Segment:
        segment = self.segments[seq] = Segment(seq, disk_bytes)
        self.disk_bytes += disk_bytes
        return segment

    def resize_segment(self, segment: Segment, disk_bytes: int) -> None:
        """The file of ``segment`` is ``disk_bytes`` long now."""
        self.disk_bytes += disk_bytes - segment.disk_bytes
        segment.disk_bytes = disk_bytes

    def remove_segment(self, segment: Segment) -> None:
        """Its file is gone (it counted no record any more)."""
        del self.segments[segment.seq]
        self.disk_bytes -= segment.disk_bytes

    # -- records -------------------------------------------------------------------------------

    def make_live(self, key: bytes, loc: RecordLoc) -> None:
        """Make the record just written at ``loc`` the live one of ``key``."""
        if key in self._live:
            old = self.take_live(key)
            self.stale_add(key, old.seq)
        self.put_live(key, loc)
        if key in self._pinned:
            self.repin(key)

    def forget(self, key: bytes) -> None:
        """Make the live record of ``key`` stale."""
        loc = self.take_live(key)
        self.stale_add(key, loc.seq)
        self.repin(key)

    def move_live(self, loc: RecordLoc, seq: int, offset: int) -> None:
        """The live record at ``loc`` was copied to ``offset`` of segment ``seq``, and the
        copy is durable: it is the live one now (compaction)."""
        old, new = self.segments[loc.seq], self.segments[seq]
        old.live_bytes -= loc.footprint
        old.num_live -= 1
        new.live_bytes += loc.footprint
        new.num_live += 1
        loc.seq, loc.offset = seq, offset

    def put_live(self, key: bytes, loc: RecordLoc) -> None:
        self._live[key] = loc
        segment = self.segments[loc.seq]
        segment.live_bytes += loc.footprint
        segment.num_live += 1
        self.live_bytes += loc.footprint
        self.live_raw_bytes += loc.raw_len
        self.live_stored_bytes += loc.stored_len

    def take_live(self, key: bytes) -> RecordLoc:
        loc = self._live.pop(key)
        segment = self.segments[loc.seq]
        segment.live_bytes -= loc.footprint
        segment.num_live -= 1
        self.live_bytes -= loc.footprint
        self.live_raw_bytes -= loc.raw_len
        self.live_stored_bytes -= loc.stored_len
        return loc

    def stale_add(self, key: bytes, seq: int) -> None:
        self._stale.setdefault(key, []).append(seq)
        self.segments[seq].num_stale += 1

    def stale_remove(self, key: bytes, seq: int) -> None:
        stale = self._stale[key]
        stale.remove(seq)
        self.segments[seq].num_stale -= 1
        if not stale:
            del self._stale[key]

    def repin(self, key: bytes) -> None:
        """Recompute whether ``key`` is pinned (see the module docstring)."""
        old = self._pinned.pop(key, None)
        if old is not None:
            self.segments[old].pinned_bytes -= TOMBSTONE_FOOTPRINT
            self.pinned_bytes -= TOMBSTONE_FOOTPRINT
        stale = self._stale.get(key)
        if key in self._live or not stale:
            return
        newest = max(stale)
        if min(stale) != newest:
            self._pinned[key] = newest
            self.segments[newest].pinned_bytes += TOMBSTONE_FOOTPRINT
            self.pinned_bytes += TOMBSTONE_FOOTPRINT

"""The NVMe tier's log: appends, deletes, compaction, replay at open.

`SegmentLog` writes records through the writer (`kvstore.tiers.nvme.writer`) and keeps the
record index (`kvstore.tiers.nvme.record_index`: live, stale and pinned records, what each
segment holds) true to what the files hold. It knows records, not values: compression and
the Tier contract are `kvstore.tiers.nvme.tier`'s. Not thread-safe: the tier's lock guards
it.

Invariants
- Log order is (segment seqno, offset). Every write, compaction copies included, goes to
  the active segment, the one with the highest seqno, so a key's newest record is in the
  highest segment among its records. `recover()` replays the log in order: the newest
  record wins, a tombstone or a rotted record hides the older ones.
- A key that is not live but has records in two or more segments is *pinned* (see the
  record index): compaction writes a tombstone in place of its newest record.
- Compaction deletes a segment's file only once its live records, stale records and owed
  tombstones are all zero.
- `disk_bytes`, the sum of the segment file sizes once the buffer is written, never exceeds
  `disk_capacity_bytes`. Plain writes stay within `write_limit`, a segment (plus slack)
  below it: that is where compaction copies a victim's live records before it unlinks the
  victim.
- Durability: `flush()` writes the buffer, fsyncs each segment written since the last flush,
  then the directory. Compaction flushes its copies before it unlinks its victim.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from typing import Any

from kvstore.errors import StorageError
from kvstore.tiers.nvme.files import SegmentFiles
from kvstore.tiers.nvme.record import (
    IO_ALIGN,
    TOMBSTONE_FOOTPRINT,
    HeaderFor,
    ScannedRecord,
    ScanReport,
    align_up,
    record_disk_bound,
    scan_records,
    tombstone_header,
)
from kvstore.tiers.nvme.record_index import RecordIndex, RecordLoc, Segment
from kvstore.tiers.nvme.writer import SegmentWriter

__all__ = ["RecordLoc", "SegmentLog"]

log = logging.getLogger(__name__)

_SCAN_WINDOW_BYTES = 8 * 1024 * 1024


class SegmentLog:
    """The records of one tier's segments; see the module docstring."""

    def __init__(self, files: SegmentFiles, writer: SegmentWriter, *, segment_bytes: int,
                 write_limit: int, capacity_bytes: int, disk_capacity_bytes: int) -> None:
        self._files = files
        self._writer = writer
        self._segment_bytes = segment_bytes
        self._write_limit = write_limit        # disk bytes plain writes may reach
        self._capacity_bytes = capacity_bytes  # what `used_bytes` may reach
        self._disk_capacity_bytes = disk_capacity_bytes
        self.records = RecordIndex()
        self.num_compactions = self.num_checksum_failures = self.num_corrupt_skipped = 0
        self.num_read_errors = 0
        self._next_seq = 1
        self._compacting = False

    # -- what the tier asks ------------------------------------------------------------------

    @property
    def is_read_only(self) -> bool:
        """Whether a write error stopped the tier's writes (`SegmentWriter.fail`)."""
        return self._writer.failure is not None

    def read_payload(self, loc: RecordLoc) -> memoryview | None:
        """The stored payload of a live record, unchecked (a view valid until the next I/O);
        None if its file is shorter than the index says or cannot be read."""
        try:
            return self._writer.read(loc.seq, loc.offset, loc.stored_len)
        except StorageError as e:
            self._read_failed(e)
            return None

    def read_payload_into(self, loc: RecordLoc, dst: Any) -> bool:
        """Copy the stored payload of a live record into ``dst`` (1-D uint8, `stored_len`
        bytes), unchecked; False if its file is shorter than the index says or cannot be
        read."""
        try:
            return self._writer.read_into(loc.seq, loc.offset, dst)
        except StorageError as e:
            self._read_failed(e)
            return False

    def _read_failed(self, error: StorageError) -> None:
        """A read that the disk refused (EIO on a bad block, say) is a miss, not an error:
        the record's other readers and the rest of the tier go on."""
        self.num_read_errors += 1
        log.warning("%s", error)

    def write(self, header_for: HeaderFor, payload: memoryview) -> tuple[int, int]:
        """Append a record whose header is ``header_for(payload offset)``; returns (segment
        seqno, payload offset). Make it live next (`RecordIndex.make_live`)."""
        return self._append(header_for, payload, len(payload), self._write_limit)

    def forget_corrupt(self, key: bytes) -> None:
        """Forget ``key`` whose record failed its checksum: the record now hides older ones
        at reopen, and compaction keeps it so."""
        self.num_checksum_failures += 1
        self.records.forget(key)

    def delete(self, key: bytes) -> bool:
        """Forget ``key`` and write a tombstone so no record of it comes back at reopen
        (none if the tier is read only: it may come back then). True if it was live."""
        records = self.records
        was_live = records.find(key) is not None
        if was_live:
            records.forget(key)
        if records.stale_segments(key) is None or self.is_read_only:
            return was_live
        self._make_room(TOMBSTONE_FOOTPRINT, self._write_limit)
        stale = records.stale_segments(key)
        if not stale:
            return was_live
        active_seq = self._writer.seq
        assert active_seq is not None
        if (not records.is_pinned(key) and min(stale) < active_seq
                and records.used_bytes + TOMBSTONE_FOOTPRINT > self._capacity_bytes):
            # The tombstone would pin bytes the tier does not have: compact the key's
            # old records away instead (the key has records in one segment only).
            for seq in sorted(set(stale)):
                self._compact(records.segments[seq], self._disk_capacity_bytes)
            stale = records.stale_segments(key)
        if stale:
            self._write_tombstone(key, max(stale), self._write_limit)
            records.repin(key)
        return was_live

    def flush(self) -> None:
        """Make every record written so far durable; `StorageError` if it cannot be (then
        the tier is read only from now on)."""
        self._writer.write_buffer()
        try:
            self._files.sync()
        except StorageError as e:
            raise self._writer.fail(e) from e.__cause__

    # -- writing -------------------------------------------------------------------------------

    def _append(self, header_for: HeaderFor, payload: Any, stored_bytes: int,
                limit: int) -> tuple[int, int]:
        """Append one record (see `SegmentWriter.append`); returns (segment seqno, payload
        offset)."""
        self._make_room(record_disk_bound(stored_bytes), limit)
        seq = self._writer.seq
        assert seq is not None
        segment = self.records.segments[seq]
        offset = self._writer.append(header_for, payload, stored_bytes)
        self.records.resize_segment(segment, align_up(self._writer.end))
        return seq, offset

    def _write_tombstone(self, key: bytes, deleted_seq: int, limit: int) -> None:
        header = tombstone_header(key, deleted_seq)
        seq, _ = self._append(lambda _offset: header, b"", 0, limit)
        self.records.stale_add(key, seq)

    def _make_room(self, footprint: int, limit: int) -> None:
        """Make the active segment able to take ``footprint`` bytes with the files' total
        staying within ``limit``, compacting as needed."""
        records = self.records
        for _ in range(4 * len(records.segments) + 16):
            end = self._writer.end
            if self._writer.seq is not None and end + footprint <= self._segment_bytes:
                grow = align_up(end + footprint) - align_up(end)
                if records.disk_bytes + grow <= limit:
                    return
            elif records.disk_bytes + align_up(footprint) <= limit:
                self._start_segment()
                return
            if self._compacting:
                break
            victim = self._pick_victim(self._disk_capacity_bytes)
            if victim is None:
                break
            try:
                self._compact(victim, self._disk_capacity_bytes)
            except StorageError:
                if self._writer.failure is not None:
                    raise  # the tier stopped writing: no room will come
                # that victim is stuck now (`_give_up_on`): another may do
        stuck = sum(segment.is_stuck for segment in records.segments.values())
        raise StorageError(
            f"NVMe tier: no room for a {footprint}-byte record in {self._files.path} after "
            "compaction" + (f" ({stuck} segments could not be compacted: see the log)"
                            if stuck else " (disk accounting is broken; please report this)"))

    def _start_segment(self) -> None:
        self._writer.seal()
        seq = self._next_seq
        self._next_seq += 1
        self._writer.start(seq)
        self.records.add_segment(seq)

    # -- compaction ----------------------------------------------------------------------------

    def _pick_victim(self, hard_limit: int) -> Segment | None:
        """The segment with the most reclaimable bytes whose copies fit under the limit."""
        best: Segment | None = None
        disk_bytes = self.records.disk_bytes
        for segment in self.records.segments.values():
            gain = segment.reclaimable_bytes
            copies = segment.disk_bytes - gain
            if (gain <= 0 or segment.is_stuck
                    or disk_bytes + copies + 2 * IO_ALIGN > hard_limit):
                continue
            if best is None or gain > best.reclaimable_bytes:
                best = segment
        return best

    def _compact(self, victim: Segment, hard_limit: int) -> None:
        """Copy the live records (and owed tombstones) of ``victim`` to the active segment,
        make the copies durable, then delete the victim's file.

        The index moves to the copies only once they are durable. A failure on the way (an
        I/O error, or a bug) leaves every live record where it was and files the copies made
        so far as stale records of their keys, so the tier stays consistent and usable; a
        victim that failed for any reason but I/O is not picked again."""
        self._compacting = True
        records = self.records
        seq = victim.seq
        copies: list[tuple[bytes, RecordLoc, int, int]] = []  # key, its loc, new seq, offset
        try:
            if seq == self._writer.seq:
                self._writer.seal()
            stale_seen: dict[bytes, int] = {}  # key -> its stale records the scan met
            for record in self._scan(seq, victim.disk_bytes, ScanReport()):
                key = record.header.key
                loc = records.find(key)
                if loc is not None and loc.seq == seq and loc.is_record(record):
                    if record.is_intact:
                        copies.append((key, loc, *self._append(
                            record.header.header_for, record.payload, loc.stored_len,
                            hard_limit)))
                        continue
                    self.num_checksum_failures += 1  # rotted since written: it is stale now
                    records.take_live(key)
                    records.stale_add(key, seq)
                stale = records.stale_segments(key)
                if stale is not None and seq in stale:
                    stale_seen[key] = stale_seen.get(key, 0) + 1
            self._drop_unseen_live(victim, copies)
            owed = self._stale_in(victim, stale_seen)
            for key in owed:
                stale = records.stale_segments(key)
                assert stale is not None, "an owed key has stale records"
                older = [s for s in stale if s != seq]
                if max(stale) == seq and older and records.find(key) is None:
                    # The victim held the key's newest record and older ones remain elsewhere.
                    self._write_tombstone(key, max(older), hard_limit)
                    records.repin(key)
            self.flush()
        except BaseException:
            for key, _loc, new_seq, _offset in copies:  # records now, but not live ones
                records.stale_add(key, new_seq)
                records.repin(key)
            self._give_up_on(victim)
            raise
        finally:
            self._compacting = False
        for _key, loc, new_seq, offset in copies:
            records.move_live(loc, new_seq, offset)
        for key in owed:
            while seq in (records.stale_segments(key) or ()):
                records.stale_remove(key, seq)
            records.repin(key)
        assert victim.num_live == 0 and victim.num_stale == 0 and victim.pinned_bytes == 0, (
            f"segment {seq} still counts records after its compaction")
        try:
            self._files.remove(seq)
        except BaseException:
            self._give_up_on(victim)  # nothing in it counts any more: only its bytes stay
            raise
        records.remove_segment(victim)
        self.num_compactions += 1

    def _give_up_on(self, victim: Segment) -> None:
        """A compaction of ``victim`` failed (a read the disk refused, a bug): it is not
        picked again, so the next one tries another segment instead of failing the same way
        forever. A write that failed stopped the tier already (`SegmentWriter.fail`)."""
        if self._writer.failure is None:
            victim.is_stuck = True
            log.exception("NVMe tier %s: compacting segment %d failed; it stays as it is "
                          "and is not compacted again while the tier is open",
                          self._files.path, victim.seq)

    def _drop_unseen_live(self, victim: Segment, copies: list[tuple[Any, ...]]) -> None:
        """Live records of ``victim`` that the scan did not find (a header that rotted
        after it was written) are lost: they become stale."""
        if victim.num_live == len(copies):
            return
        copied = {key for key, *_ in copies}
        seq = victim.seq
        records = self.records
        for key in [k for k, loc in records.live_items() if loc.seq == seq and k not in copied]:
            self.num_checksum_failures += 1
            records.take_live(key)
            records.stale_add(key, seq)

    def _stale_in(self, victim: Segment, seen: dict[bytes, int]) -> list[bytes]:
        """The keys with stale records in ``victim``: those the scan met and, only when it
        did not meet them all (a rotted header), every other key whose records name it."""
        if sum(seen.values()) >= victim.num_stale:
            return list(seen)
        return self.records.keys_with_stale_in(victim.seq)

    def _scan(self, seq: int, file_bytes: int, report: ScanReport) -> Iterator[ScannedRecord]:
        """The records of segment ``seq``, checked with its MAC (`scan_records`)."""
        return scan_records(functools.partial(self._files.read_at, seq), file_bytes, report,
                            self._files.segment_key.for_segment(seq), _SCAN_WINDOW_BYTES)

    # -- recovery ------------------------------------------------------------------------------

    def recover(self) -> tuple[list[tuple[bytes, RecordLoc]], int]:
        """Rebuild the index by replaying every segment in log order, then forget the oldest
        live records while `used_bytes` is over capacity, append to the last segment if it
        ended cleanly, and compact while the files are over `write_limit`. Returns the live
        records left after forgetting, oldest first, and how many were forgotten."""
        records = self.records
        segment_sizes = self._files.list_segments()
        last_report: ScanReport | None = None
        for seq, file_bytes in segment_sizes:
            records.add_segment(seq, file_bytes)
            last_report = ScanReport()
            for record in self._scan(seq, file_bytes, last_report):
                self._replay(seq, record)
            self.num_corrupt_skipped += last_report.num_corrupt
            self._next_seq = seq + 1
        for key in records.keys_with_stale():
            records.repin(key)
        by_age = sorted(records.live_items(), key=lambda item: (item[1].seq, item[1].offset))
        dropped = 0
        while records.used_bytes > self._capacity_bytes and dropped < len(by_age):
            records.forget(by_age[dropped][0])  # the capacity shrank: the oldest go first
            dropped += 1
        if segment_sizes and last_report is not None and last_report.num_corrupt == 0:
            self._resume_segment(segment_sizes[-1][0], last_report.end_offset)
        for _ in range(4 * len(records.segments) + 16):
            if records.disk_bytes <= self._write_limit:
                break
            # Over the limit: a smaller capacity than before, or a crash mid-compaction.
            victim = self._pick_victim(max(self._disk_capacity_bytes, records.disk_bytes
                                           + self._segment_bytes + 2 * IO_ALIGN))
            if victim is None:
                log.warning("NVMe tier %s: %d bytes of segments exceed capacity and cannot be "
                            "compacted now", self._files.path, records.disk_bytes)
                break
            try:
                self._compact(victim, records.disk_bytes + self._segment_bytes + 2 * IO_ALIGN)
            except StorageError as e:  # the tier opens all the same, read only if it must
                log.warning("NVMe tier %s: compaction at open failed: %s", self._files.path, e)
                break
        if self.num_corrupt_skipped or dropped:
            log.warning("NVMe tier %s: skipped %d corrupt records, dropped %d over capacity",
                        self._files.path, self.num_corrupt_skipped, dropped)
        return by_age[dropped:], dropped

    def _replay(self, seq: int, record: ScannedRecord) -> None:
        records, header = self.records, record.header
        key = header.key
        if records.find(key) is not None:
            old = records.take_live(key)
            records.stale_add(key, old.seq)
        if header.is_tombstone or not record.is_intact:
            # A tombstone, or a record that rotted: older records of the key must not win.
            records.stale_add(key, seq)
            return
        records.put_live(key, RecordLoc(seq, record.offset, header.stored_len,
                                        header.raw_len, header.flags, header.parent,
                                        header.payload_checksum))

    def _resume_segment(self, seq: int, end: int) -> None:
        """Append to the last segment, which ended cleanly, instead of starting a new one."""
        if not self._writer.resume(seq, end):
            return
        segment = self.records.segments[seq]
        disk_bytes = align_up(end)
        if segment.disk_bytes != disk_bytes:  # only zeros lie past the last record
            self._files.truncate(seq, disk_bytes)
            self.records.resize_segment(segment, disk_bytes)

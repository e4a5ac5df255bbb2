"""The NVMe tier's writer: records appended to the active segment through an aligned
write buffer, and stored bytes read back from the disk or that buffer.

    active segment   [ on disk ................ | write buffer (aligned mmap) ]
                     0                     buffer offset      end      buffer end

Not thread-safe: the tier's lock guards it (and the `SegmentFiles` it writes through).

Invariants
- Bytes ``[0, buffer offset)`` of the active segment are on disk, bytes ``[buffer
  offset, end)`` are in the buffer, and ``buffer offset`` is 4 KiB aligned. A full buffer
  goes out in one aligned pwrite. `write_buffer()` writes the partial buffer padded with
  zeros to 4 KiB and keeps its unfinished last block, which the next write rewrites (same
  bytes, plus new ones). So once the buffer is written the file is ``align_up(end)`` bytes
  and all of them past ``end`` are zeros.
- The open header page (where detached records put their headers, see `record`) is in
  the buffer: once a buffer write takes it to disk it is sealed and never written again.
"""

from __future__ import annotations

import errno
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from kvstore.buffers import page_aligned_buffer
from kvstore.errors import StorageError
from kvstore.tiers.nvme.files import SegmentFiles
from kvstore.tiers.nvme.record import (
    HEADER_BYTES,
    HEADERS_PER_PAGE,
    IO_ALIGN,
    RECORD_ALIGN,
    HeaderFor,
    HeaderMac,
    align_down,
    align_up,
    is_detached,
)

__all__ = ["SegmentWriter"]

log = logging.getLogger(__name__)

_ZERO_BLOCK = bytes(IO_ALIGN)


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    """pwrite all of ``data`` at ``offset`` (the I/O thread's job)."""
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


class SegmentWriter:
    """Appends records to the active segment through an aligned write buffer, and reads
    stored bytes back from the disk or that buffer."""

    def __init__(self, files: SegmentFiles, buffer_bytes: int, max_record_bytes: int) -> None:
        self._files = files
        self._seq: int | None = None
        self._mac: HeaderMac | None = None  # the active segment's
        self._end = self._buffer_offset = self._written_end = 0
        self._header_page: int | None = None  # offset of the open header page, if any
        self._num_headers = 0                  # headers in it so far
        self._wview = page_aligned_buffer(buffer_bytes)
        # A full buffer is written by the I/O thread while records go on into the other one
        # (one write in flight at most: the copy and checksum of puts overlap the disk).
        self._spare_view = page_aligned_buffer(buffer_bytes)
        self._inflight: tuple[Future[None], int, int, memoryview] | None = None
        self._failure: StorageError | None = None
        self._io_thread = ThreadPoolExecutor(1, thread_name_prefix="kvstore-nvme-write")
        files.before_reopen = self.drain
        self._rview = page_aligned_buffer(align_up(max_record_bytes) + 2 * IO_ALIGN)
        self._rarray = np.frombuffer(self._rview, dtype=np.uint8)

    @property
    def seq(self) -> int | None:
        """The active segment, if there is one."""
        return self._seq

    @property
    def end(self) -> int:
        """Where the next record goes in the active segment."""
        return self._end

    def start(self, seq: int) -> None:
        """Create segment ``seq`` and make it the active one (after `seal`)."""
        assert self._seq is None, "seal the active segment before starting another"
        self._check_writable()
        try:
            self._files.create(seq)
        except StorageError as e:
            raise self.fail(e) from e.__cause__
        self._seq = seq
        self._mac = self._files.segment_key.for_segment(seq)
        self._end = self._buffer_offset = self._written_end = 0
        self._header_page = None

    def resume(self, seq: int, end: int) -> bool:
        """Make segment ``seq``, whose records end at ``end``, active again: its unfinished
        last block goes back into the buffer. False, changing nothing, if it reads short."""
        buffer_offset = align_down(end)
        if end > buffer_offset:
            got = self._files.read_at(seq, buffer_offset, self._wview[:IO_ALIGN])
            if got < end - buffer_offset:
                return False
        self._seq = seq
        self._mac = self._files.segment_key.for_segment(seq)
        self._end = self._written_end = end
        self._buffer_offset = buffer_offset
        self._header_page = None
        return True

    def seal(self) -> None:
        """Write out the buffer; no segment is active after."""
        self.write_buffer()
        self._seq = None
        self._header_page = None

    def append(self, header_for: HeaderFor, payload: Any, stored_bytes: int) -> int:
        """Append one record: ``payload`` (``stored_bytes``) and its header,
        ``header_for(payload offset)`` signed for the active segment, inline or detached as
        `record` says, padded with zeros to 8 bytes; returns the offset of its payload."""
        mac = self._mac
        assert self._seq is not None and mac is not None, "no active segment to append to"
        self._check_writable()
        if not is_detached(stored_bytes):
            offset = self._end + HEADER_BYTES
            self._buffer_write(mac.sign(header_for(offset)))
        else:
            page = self._header_page
            if (page is None or page < self._buffer_offset
                    or self._num_headers == HEADERS_PER_PAGE):
                page = self._open_header_page()
            offset = align_up(self._end)
            self._buffer_write(_ZERO_BLOCK[:offset - self._end])
            slot = page + self._num_headers * HEADER_BYTES - self._buffer_offset
            self._wview[slot:slot + HEADER_BYTES] = mac.sign(header_for(offset))
            self._num_headers += 1
        self._buffer_write(payload)
        pad = -self._end % RECORD_ALIGN
        if pad:
            self._buffer_write(_ZERO_BLOCK[:pad])
        return offset

    def _open_header_page(self) -> int:
        """Start a header page at the next 4 KiB boundary, in the buffer."""
        page = align_up(self._end)
        self._buffer_write(_ZERO_BLOCK[:page - self._end])
        # Taken without `_buffer_write`, which would write a full buffer out with the page
        # still empty; the buffer has room, since it is never left full and `page` aligned.
        used = page - self._buffer_offset
        self._wview[used:used + IO_ALIGN] = _ZERO_BLOCK[:IO_ALIGN]
        self._end += IO_ALIGN
        self._header_page, self._num_headers = page, 0
        return page

    @property
    def failure(self) -> StorageError | None:
        """The write error that stopped this writer for good, if one did (see `fail`)."""
        return self._failure

    def fail(self, error: StorageError) -> StorageError:
        """Stop writing for good after ``error`` (the disk is full or failing): every later
        write raises it. What was appended stays readable, from the disk or the buffer, and
        reads of records that are in neither fail their checksum (a miss)."""
        if self._failure is None:
            self._failure = error
            log.error("NVMe tier %s: %s; no more writes: the tier serves what it holds, read "
                      "only, until it is reopened", self._files.path, error)
        return error

    def _check_writable(self) -> None:
        if self._failure is not None:
            raise StorageError(f"the NVMe tier stopped writing after an error: "
                               f"{self._failure}")

    def drain(self) -> None:
        """Wait for the buffer write in flight, if any; raise `StorageError` if it failed
        (a refused O_DIRECT write is made again buffered, as every I/O falls back). The
        bytes of a failed write stay readable: they go back in front of the buffer."""
        job, self._inflight = self._inflight, None
        if job is None:
            return
        done, seq, offset, view = job
        try:
            done.result()
            return
        except OSError as e:
            error = e
        finally:
            self._files.release(seq)
        try:
            if error.errno != errno.EINVAL or not self._files.is_direct:
                raise StorageError(f"I/O error on NVMe segment {self._files.path_of(seq)}: "
                                   f"{error}") from error
            self._files.pwrite(seq, view, offset)  # O_DIRECT refused: again, as reads do
        except StorageError as e:
            used = self._end - self._buffer_offset
            tail = bytearray(len(view) + used)  # [offset, end) of the segment, in memory
            tail[:len(view)] = view
            tail[len(view):] = self._wview[:used]
            self._wview, self._buffer_offset = memoryview(tail), offset
            self._written_end = offset
            raise self.fail(e) from e.__cause__

    def _drain_for_read(self, seq: int) -> None:
        """Before reading segment ``seq``: its bytes may be in the write in flight. A write
        that failed is the writer's business (`fail`), not the reader's."""
        if self._inflight is not None and self._inflight[1] == seq:
            try:
                self.drain()
            except StorageError:
                pass

    def write_buffer(self) -> None:
        """Write what the buffer holds, zero-padded to 4 KiB; keep its unfinished block."""
        self.drain()
        if self._seq is None or self._end == self._written_end:
            return
        self._check_writable()
        used = self._end - self._buffer_offset
        nbytes = align_up(used)
        self._wview[used:nbytes] = _ZERO_BLOCK[:nbytes - used]
        try:
            self._files.pwrite(self._seq, self._wview[:nbytes], self._buffer_offset)
        except StorageError as e:
            raise self.fail(e) from e.__cause__
        self._written_end = self._end
        keep = align_down(used)
        if keep:
            self._wview[:used - keep] = bytes(self._wview[keep:used])  # < 4 KiB
            self._buffer_offset += keep

    def read(self, seq: int, start: int, nbytes: int) -> memoryview | None:
        """Bytes ``[start, start + nbytes)`` of segment ``seq`` (a view valid until the next
        I/O); None if the file is shorter than that."""
        end = start + nbytes
        if start == end:
            return memoryview(b"")
        self._drain_for_read(seq)
        in_buffer = seq == self._seq
        if in_buffer and start >= self._buffer_offset:
            return self._wview[start - self._buffer_offset:end - self._buffer_offset]
        base = align_down(start)
        disk_end = min(align_up(end), self._buffer_offset) if in_buffer else align_up(end)
        scratch = self._scratch(align_up(end) - base)
        got = self._files.read_at(seq, base, scratch[:disk_end - base])
        if got < min(end, disk_end) - base:
            return None  # the file is shorter than the index says
        if in_buffer and end > disk_end:  # the record's tail is still in the write buffer
            scratch[disk_end - base:end - base] = self._wview[:end - disk_end]
        return scratch[start - base:end - base]

    def read_into(self, seq: int, start: int, dst: np.ndarray) -> bool:
        """Copy bytes ``[start, start + len(dst))`` of segment ``seq`` into ``dst`` (a 1-D
        uint8 array); False if the file is shorter than that.

        An aligned span on disk read into an aligned ``dst`` goes there in one read, with
        no bounce buffer and no copy: the path of large records, whose payloads are 4 KiB
        aligned, into page-aligned caller buffers.
        """
        nbytes = dst.shape[0]
        self._drain_for_read(seq)
        if (not (start | nbytes) % IO_ALIGN and nbytes
                and not (seq == self._seq and start + nbytes > self._buffer_offset)):
            done = self._files.read_whole(seq, start, dst)
            if done is not None:
                return done
        data = self.read(seq, start, nbytes)
        if data is None:
            return False
        dst[:] = np.frombuffer(data, dtype=np.uint8)
        return True

    def close(self) -> None:
        """Finish the write in flight (its error logged: the tier is closing) and free the
        buffers. Before the files close: the write uses their descriptor."""
        try:
            self.drain()
        except StorageError as e:
            log.error("%s", e)
        self._io_thread.shutdown(wait=True)
        self._files.before_reopen = None
        self._rarray = np.empty(0, dtype=np.uint8)  # no view of the read buffer outlives it
        for view in (self._wview, self._spare_view, self._rview):
            view.release()  # the maps go with the last reference

    def _buffer_write(self, data: Any) -> None:
        data = memoryview(data)
        size = len(self._wview)
        pos, nbytes = 0, len(data)
        while pos < nbytes:
            used = self._end - self._buffer_offset
            take = min(size - used, nbytes - pos)
            self._wview[used:used + take] = data[pos:pos + take]
            self._end += take
            pos += take
            if used + take == size:  # a full buffer: one large aligned write
                self._write_full_buffer()

    def _write_full_buffer(self) -> None:
        """Hand the full buffer to the I/O thread and go on in the other one."""
        self.drain()
        seq = self._seq
        assert seq is not None
        size = len(self._wview)
        fd = self._files.hold(seq, size)
        done = self._io_thread.submit(_write_all, fd, self._wview, self._buffer_offset)
        self._inflight = (done, seq, self._buffer_offset, self._wview)
        self._wview, self._spare_view = self._spare_view, self._wview
        self._buffer_offset += size
        self._written_end = self._end

    def scratch(self, nbytes: int) -> np.ndarray:
        """The first ``nbytes`` of the aligned read buffer, valid until the next I/O."""
        if nbytes <= self._rarray.shape[0]:
            return self._rarray[:nbytes]
        return np.frombuffer(self._scratch(nbytes), dtype=np.uint8)

    def _scratch(self, nbytes: int) -> memoryview:
        if nbytes <= len(self._rview):
            return self._rview
        return page_aligned_buffer(nbytes)  # a record from a larger config

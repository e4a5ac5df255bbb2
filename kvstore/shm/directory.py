"""Where each block of a shared DRAM pool lies, in shared memory: one-sided reads.

A daemon's DRAM pool is POSIX shared memory that its same-host clients map (see
`kvstore.tiers.dram`). Without more, a client asks the daemon where a block is and pins it
(a round trip) before it copies. The directory publishes that answer: a table in a second
shared-memory object, ``/dev/shm/<pool name>-dir``, that the DRAM tier updates whenever a
key gains or loses its slot, and that clients read without asking anyone.

    header   8 words: magic, version, number of rows, probes, heartbeat, closed, 0, 0
    rows     (rows + probes) x 6 words: seq, key (2 words), offset, nbytes, 0

A key lives in one of ``probes`` consecutive rows from ``hash(key) % rows`` (keys are
already hashes: their first 8 bytes are the hash). A key that finds no free row there is
simply not listed: a client that misses in the directory asks the daemon as before, so the
directory is a cache of locations and never the only way to a block.

Consistency is a seqlock per row. The writer (the daemon, under the store lock) makes a
row's ``seq`` odd, changes the row, makes it even again; it removes a key's row *before*
its slot is freed, so before anyone can reuse the slot. A reader reads ``seq`` (it must be
even), then the row, copies the value, and reads ``seq`` again: unchanged means the slot
held this key's value for the whole copy. This relies on x86-64's ordering (loads are not
reordered with loads, nor stores with stores, and a store seen by one core is seen by all),
which each numpy access, a separate C call, respects; elsewhere `Directory.supported` is
False and clients use the round trip.

Liveness: a client that reads only through the directory never talks to the daemon, so it
would not notice the daemon dying. The daemon stamps ``heartbeat`` (CLOCK_MONOTONIC,
shared by the host's processes) every `BEAT_S`; readers ignore a directory whose stamp is
older than `STALE_S` or that is marked ``closed`` (a clean stop marks it first, so not a
single read is served after), and ask the daemon, which then fails or reconnects as any
request does. After a SIGKILL, reads of blocks the dead daemon held can go on for up to
`STALE_S`, returning the bytes it stored (for KV blocks, keyed by the hash of their
prefix, still the right bytes).

Who may read it: whoever can map the pool (a client granted shared memory), which can read
every byte of the pool anyway; the directory only tells it where its own blocks are.
"""

from __future__ import annotations

import os
import platform
import time

import numpy as np

from kvstore.shm.mapping import map_read_only, map_shared, shm_path

__all__ = ["Directory"]

MAGIC = 0x4B56_5344_4952_0001  # "KVSDIR", 1
VERSION = 1
HEADER_WORDS = 8
ROW_WORDS = 6
PROBES = 8
_SEQ, _KEY_LO, _KEY_HI, _OFFSET, _NBYTES = range(5)
_HEARTBEAT, _CLOSED = 4, 5  # header words
BEAT_S = 0.1
STALE_S = 1.0
MIN_ROWS = 1024
MAX_ROWS = 1 << 22
BYTES_PER_ROW_OF_POOL = 32 * 1024  # rows: twice the blocks of 64 KiB the pool could hold


def rows_for(pool_bytes: int) -> int:
    """Rows for a pool of ``pool_bytes``: a power of two, room for twice its 64 KiB blocks."""
    want = max(MIN_ROWS, min(MAX_ROWS, pool_bytes // BYTES_PER_ROW_OF_POOL))
    return 1 << (want - 1).bit_length()


def directory_name(pool_name: str) -> str:
    return f"{pool_name}-dir"


def _words(key: bytes) -> tuple[int, int]:
    return int.from_bytes(key[:8], "little"), int.from_bytes(key[8:16], "little")


class Directory:
    """The table; the daemon creates it (``create=True``) and writes, clients map and read."""

    supported = platform.machine().lower() in ("x86_64", "amd64")

    def __init__(self, name: str, num_rows: int = MIN_ROWS, *, create: bool) -> None:
        if num_rows & (num_rows - 1) or num_rows <= 0:
            raise ValueError(f"directory rows must be a power of two, got {num_rows}")
        self.name = name
        self._owner = create
        nbytes = 8 * (HEADER_WORDS + (num_rows + PROBES) * ROW_WORDS)
        if create:
            self._mmap = map_shared(name, nbytes, create=True)
            words = np.frombuffer(self._mmap, dtype=np.uint64)
            words[1:4] = (VERSION, num_rows, PROBES)
            words[_HEARTBEAT] = time.monotonic_ns()
            words[0] = MAGIC  # last: a reader that sees the magic sees the rest
        else:
            self._mmap = map_read_only(name)
            words = np.frombuffer(self._mmap, dtype=np.uint64)
            header = words[:HEADER_WORDS].tolist()
            if len(header) < HEADER_WORDS or header[:2] != [MAGIC, VERSION]:
                raise ValueError(f"shared memory {name!r} is not a kvstore directory")
            num_rows = header[2]
            if header[3] != PROBES or len(words) < HEADER_WORDS + (
                    num_rows + PROBES) * ROW_WORDS:
                raise ValueError(f"directory {name!r} has another shape")
        self.num_rows = num_rows
        # The words again, as a memoryview: a load or store through it costs a tenth of
        # numpy's indexing (the daemon writes rows on every commit, clients read one on
        # every get).
        self._words: memoryview | None = memoryview(self._mmap).cast("Q")
        self._row_of: dict[bytes, int] = {}  # writer only: key -> its row
        self._taken = bytearray(num_rows + PROBES)  # writer only: 1 where a row is in use

    def _home(self, key: bytes) -> int:
        return int.from_bytes(key[:8], "little") & (self.num_rows - 1)

    # -- writer (the daemon, under the store lock) ------------------------------------------

    def insert(self, key: bytes, offset: int, nbytes: int) -> bool:
        """List ``key`` at ``offset``; False (not listed) when its rows are all taken."""
        self.remove(key)
        home = self._home(key)
        row = self._taken.find(0, home, home + PROBES)  # every commit: no numpy here
        if row < 0:
            return False
        self._write(row, (*_words(key), offset, nbytes))
        self._taken[row] = 1
        self._row_of[key] = row
        return True

    def remove(self, key: bytes) -> None:
        """Unlist ``key`` (before its slot is freed)."""
        row = self._row_of.pop(key, None)
        if row is not None:
            self._write(row, (0, 0, 0, 0))
            self._taken[row] = 0

    def clear(self) -> None:
        for key in list(self._row_of):
            self.remove(key)

    def beat(self) -> None:
        """Stamp the heartbeat: the daemon is alive (every `BEAT_S`)."""
        if self._words is not None:
            self._words[_HEARTBEAT] = time.monotonic_ns()

    def __len__(self) -> int:
        return len(self._row_of)

    def _write(self, row: int, fields: tuple[int, int, int, int]) -> None:
        words, at = self._words, HEADER_WORDS + row * ROW_WORDS
        assert words is not None, "the directory is closed"
        seq = words[at + _SEQ]
        words[at + _SEQ] = seq + 1  # odd: changing (stores land in program order: x86-64)
        (words[at + _KEY_LO], words[at + _KEY_HI], words[at + _OFFSET],
         words[at + _NBYTES]) = fields
        words[at + _SEQ] = seq + 2

    # -- reader (a client) ------------------------------------------------------------------

    def lookup(self, key: bytes) -> tuple[int, int, int, int] | None:
        """``(row, seq, offset, nbytes)`` of ``key``, or None (not listed, or its row is
        changing right now). Valid only if `unchanged(row, seq)` still holds after the
        caller copied the bytes."""
        words = self._words
        if (words is None or words[_CLOSED]
                or time.monotonic_ns() - words[_HEARTBEAT] > STALE_S * 1e9):
            return None  # the daemon stopped or stalled: ask it (see Liveness)
        lo, hi = _words(key)
        home = lo & (self.num_rows - 1)
        at = HEADER_WORDS + home * ROW_WORDS
        for probe in range(PROBES):
            base = at + probe * ROW_WORDS
            if words[base + _KEY_LO] != lo or words[base + _KEY_HI] != hi:
                continue
            seq = words[base + _SEQ]  # the seqlock: seq, the row, then seq again
            if seq & 1:
                return None
            offset, nbytes = words[base + _OFFSET], words[base + _NBYTES]
            if (words[base + _KEY_LO] == lo and words[base + _KEY_HI] == hi
                    and words[base + _SEQ] == seq):
                return home + probe, seq, offset, nbytes
        return None

    def unchanged(self, row: int, seq: int) -> bool:
        words = self._words
        return words is not None and words[HEADER_WORDS + row * ROW_WORDS + _SEQ] == seq

    # -- closing -----------------------------------------------------------------------------

    def close(self) -> None:
        """Unmap; the owner first marks it closed, so that no reader uses it any more, and
        then unlinks the shared-memory object."""
        if self._owner and self._words is not None:
            self._words[_CLOSED] = 1
            self.clear()
        if self._words is not None:
            self._words.release()
            self._words = None
        try:
            self._mmap.close()
        except BufferError:  # a view is still referenced; unmapped when it goes
            pass
        if self._owner:
            self._owner = False
            try:
                os.unlink(shm_path(self.name))
            except FileNotFoundError:
                pass


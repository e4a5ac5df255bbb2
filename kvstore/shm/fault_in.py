"""A new pool's pages, allocated and faulted in before it is used.

A pool is faulted in when it is made, so that no put pays a page fault later (and a
shared pool's pages are also allocated in /dev/shm then: `kvstore.shm.mapping`). This is
done in chunks of `CHUNK_BYTES`: a large pool (`LARGE_POOL_BYTES` up) logs its progress,
and a ``check_stop`` callback runs before each chunk; what it raises stops the allocation.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from kvstore.units import format_bytes

log = logging.getLogger(__name__)

CHUNK_BYTES = 64 << 20  # ~20 ms of faulting in: how soon a check_stop is heard
LARGE_POOL_BYTES = 1 << 30  # from here the log follows the allocation
PROGRESS_EVERY_S = 5.0  # a progress line at least this often (and every 10%)

StopCheck = Callable[[], None]


def fault_in(nbytes: int, fill: Callable[[int, int], None], *,
             check_stop: StopCheck | None = None, where: str = "private memory") -> None:
    """``fill(offset, n)`` over a new pool of ``nbytes`` by chunks; ``check_stop`` before
    each; progress logged for a large pool."""
    progress = _Progress(nbytes, where) if nbytes >= LARGE_POOL_BYTES else None
    for offset in range(0, nbytes, CHUNK_BYTES):
        if check_stop is not None:
            check_stop()
        fill(offset, min(CHUNK_BYTES, nbytes - offset))
        if progress is not None:
            progress.done(min(offset + CHUNK_BYTES, nbytes))


class _Progress:
    """Log lines for a large pool: at the start, every 10% or `PROGRESS_EVERY_S`, and at
    the end (bytes done and the rate: a slow one says the machine is short of memory)."""

    def __init__(self, nbytes: int, where: str) -> None:
        self.nbytes = nbytes
        self.started = self.logged_at = time.monotonic()
        self.logged_bytes = 0
        log.info("allocating the DRAM pool: %s in %s", format_bytes(nbytes), where)

    def done(self, done_bytes: int) -> None:
        now = time.monotonic()
        rate = f"{format_bytes(done_bytes / max(now - self.started, 1e-9))}/s"
        if done_bytes == self.nbytes:
            log.info("DRAM pool allocated: %s in %.1f s (%s)", format_bytes(self.nbytes),
                     now - self.started, rate)
        elif (done_bytes - self.logged_bytes >= self.nbytes / 10
              or now - self.logged_at >= PROGRESS_EVERY_S):
            log.info("allocating the DRAM pool: %s of %s (%d%%), %s",
                     format_bytes(done_bytes), format_bytes(self.nbytes),
                     100 * done_bytes // self.nbytes, rate)
            self.logged_at, self.logged_bytes = now, done_bytes

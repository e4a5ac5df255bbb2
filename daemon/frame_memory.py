"""What frames may cost the daemon in memory: the limits of one frame each way, one budget
for the large bodies of all connections together, the buffers those bodies are received
into, and giving the memory back once a burst of large frames is over.

A request body larger than a connection's receive buffer can cut it from (TCP: received
into a buffer of its own; UCX: received by ucxx) first takes a *share* of one budget,
``--frame-memory``, and gives it back once its request is answered or its connection ends:

    header ──share fits?──yes──> buffer (from the pool) ──body──> request ──answered──> back
                    └──no──> the connection waits, unread and untimed, first come first served

Invariants:

- ``held_bytes <= budget_bytes``: a share is taken whole, and only if it fits.
- Shares are granted in the order they were asked for (no body overtakes a waiting one), and
  the budget holds at least one body of the largest size (`largest_body_bytes`), so every
  body is admitted once the shares ahead of it come back; and they all come back: a share is
  held by a body the daemon is reading (its sender must finish it within the frame timeout
  or is dropped) or by a request being answered (under its deadline).
- A buffer is reused only once nothing can read it any more: never after its request ran
  out of time (a worker thread may still be copying from it); its share comes back all the
  same, so such a buffer is briefly outside the budget (at most one per worker thread).

Giving memory back: glibc keeps what Python frees in its heap, and raises its mmap threshold
to the largest block freed (up to 32 MiB), so body buffers and the values of large answers
come from the heap and stay there after a burst. Reused buffers (the pool, up to
`POOL_BYTES`) keep their pages warm, with no page faults or zero-filling per frame, while
large frames keep coming; once none has come or gone for `IDLE_S`, the pool is emptied and
``malloc_trim`` returns the free pages of every heap to the system.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from kvstore.wire.frames import MAX_META_BYTES

log = logging.getLogger(__name__)

MiB = 1024 * 1024
MIN_FRAME_DATA_BYTES = 64 * MiB  # a round trip per 64 MiB costs under 1% of its transfer
MIN_ANSWER_DATA_BYTES = 16 * MiB  # values in one get_many answer (the client asks again)
DEFAULT_BUDGET_BYTES = 256 * MiB
POOL_BYTES = 64 * MiB  # idle body buffers kept for reuse
BUFFER_GRAIN_BYTES = 256 * 1024  # buffers (and shares) come in steps of this: sizes recur
IDLE_S = 1.0  # no large frame for this long: the burst is over, give memory back
LOG_EVERY_S = 5.0


def max_frame_data_bytes(max_value_bytes: int) -> int:
    """The data one request may carry (`hello` reports it; clients split put_many by it):
    a value of the largest size, and at least `MIN_FRAME_DATA_BYTES`."""
    return max(max_value_bytes, MIN_FRAME_DATA_BYTES)


def max_answer_data_bytes(max_value_bytes: int) -> int:
    """The value bytes one get_many answer may carry, duplicates counted each time."""
    return max(max_value_bytes, MIN_ANSWER_DATA_BYTES)


def largest_body_bytes(max_value_bytes: int) -> int:
    """The share of the largest request body (meta and data) a daemon admits: the least
    budget."""
    return share_bytes(MAX_META_BYTES + max_frame_data_bytes(max_value_bytes))


def share_bytes(body_bytes: int) -> int:
    """What a body takes of the budget: the size of its buffer."""
    return -(-body_bytes // BUFFER_GRAIN_BYTES) * BUFFER_GRAIN_BYTES


def default_budget_bytes(max_value_bytes: int) -> int:
    return max(DEFAULT_BUDGET_BYTES, largest_body_bytes(max_value_bytes))


@dataclass(eq=False, slots=True)
class Share:
    """Bytes of the budget held by one body (`share_bytes`), and the buffer it is received
    into (TCP; a UCX body arrives in ucxx's own buffers)."""

    body_bytes: int
    nbytes: int
    buffer: bytearray | None = None
    is_held: bool = True


@dataclass(eq=False, slots=True)
class Waiter:
    body_bytes: int
    granted: Callable[[Share], None]

    @property
    def nbytes(self) -> int:
        return share_bytes(self.body_bytes)


class LogThrottle:
    """At most one line per ``period_s`` for one kind of event (the first at once), saying
    how many happened since the last line."""

    def __init__(self, period_s: float = LOG_EVERY_S) -> None:
        self._period_s = period_s
        self._next_s = 0.0
        self._count = 0

    def count(self) -> int:
        """Count one event: the events to report if a line is due now, else 0."""
        self._count += 1
        now = time.monotonic()
        if now < self._next_s:
            return 0
        count, self._count, self._next_s = self._count, 0, now + self._period_s
        return count


class FrameMemory:
    """The budget of the daemon's large bodies, their buffers, and the idle trim; used on
    the daemon's event loop only."""

    def __init__(self, budget_bytes: int, *, executor: Executor | None = None,
                 pool_bytes: int = POOL_BYTES) -> None:
        self.budget_bytes = budget_bytes
        self.held_bytes = 0
        self.num_waits = 0  # bodies that had to wait, since start
        self._waiting: deque[Waiter] = deque()
        self._pool: dict[int, list[bytearray]] = {}
        self._pooled_bytes = 0
        self._pool_bytes = pool_bytes
        self._executor = executor  # where malloc_trim runs (a thread: it takes a while)
        self._last_use_s = 0.0
        self._trim_timer: asyncio.TimerHandle | None = None
        self._is_closed = False
        self._wait_log = LogThrottle()

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    # -- shares ---------------------------------------------------------------------------

    def try_take(self, body_bytes: int) -> Share | None:
        """A share for a body of ``body_bytes`` if it fits now and nobody waits ahead;
        else None."""
        nbytes = share_bytes(body_bytes)
        if self._waiting or self.held_bytes + nbytes > self.budget_bytes:
            return None
        self.held_bytes += nbytes
        self._used()
        return Share(body_bytes, nbytes)

    def wait(self, body_bytes: int, granted: Callable[[Share], None], peer: str) -> Waiter:
        """Queue for a share for a body of ``body_bytes``: ``granted(share)`` is called
        from the loop once it is taken (never from within this call); `cancel` leaves the
        queue."""
        waiter = Waiter(body_bytes, granted)
        assert waiter.nbytes <= self.budget_bytes, f"a body of {body_bytes} bytes never fits"
        self._waiting.append(waiter)
        self.num_waits += 1
        count = self._wait_log.count()
        if count:
            log.info("a frame body of %d bytes from peer=%s waits for frame memory (%d of "
                     "%d bytes held, %d bodies waiting; %d waited since the last such line)",
                     body_bytes, peer, self.held_bytes, self.budget_bytes,
                     len(self._waiting), count)
        return waiter

    def cancel(self, waiter: Waiter) -> None:
        """Leave the queue (the connection ended); a share already granted to ``waiter``
        reaches its callback, which must give it back."""
        if waiter in self._waiting:
            self._waiting.remove(waiter)
            self._admit()  # the bodies behind it may fit

    async def take(self, body_bytes: int, peer: str) -> Share:
        """A share for a body of ``body_bytes``, waiting for it if need be (streams: UCX
        connections)."""
        share = self.try_take(body_bytes)
        if share is not None:
            return share
        future: asyncio.Future[Share] = asyncio.get_running_loop().create_future()

        def granted(share: Share) -> None:
            if future.done():  # cancelled meanwhile
                self.give_back(share)
            else:
                future.set_result(share)

        waiter = self.wait(body_bytes, granted, peer)
        try:
            return await future
        except BaseException:  # cancelled: the connection is going away
            self.cancel(waiter)
            raise

    def give_back(self, share: Share, *, reuse: bool = True) -> None:
        """Return ``share`` (again: nothing) and its buffer, kept for another body unless
        ``reuse`` is False (something may still read it)."""
        if not share.is_held:
            return
        share.is_held = False
        self.held_bytes -= share.nbytes
        buffer, share.buffer = share.buffer, None
        if buffer is not None and reuse and self._pooled_bytes + len(buffer) <= self._pool_bytes:
            self._pool.setdefault(len(buffer), []).append(buffer)
            self._pooled_bytes += len(buffer)
        self._used()
        self._admit()

    def _admit(self) -> None:
        loop = asyncio.get_running_loop()
        while self._waiting and self.held_bytes + self._waiting[0].nbytes <= self.budget_bytes:
            waiter = self._waiting.popleft()
            self.held_bytes += waiter.nbytes
            loop.call_soon(waiter.granted, Share(waiter.body_bytes, waiter.nbytes))

    # -- buffers --------------------------------------------------------------------------

    def buffer(self, share: Share) -> memoryview:
        """A buffer for the body of ``share``, reused if the pool has one of its size."""
        pooled = self._pool.get(share.nbytes)
        if pooled:
            share.buffer = pooled.pop()
            self._pooled_bytes -= share.nbytes
        else:
            share.buffer = bytearray(share.nbytes)
        return memoryview(share.buffer)[:share.body_bytes]

    # -- giving memory back ---------------------------------------------------------------

    def note_use(self) -> None:
        """A large answer was written: its values were freed (to the heap)."""
        self._used()

    def _used(self) -> None:
        self._last_use_s = time.monotonic()
        if self._trim_timer is None and not self._is_closed:
            self._trim_timer = asyncio.get_running_loop().call_later(IDLE_S, self._idle)

    def _idle(self) -> None:
        """After the last large frame: once none came for `IDLE_S`, empty the pool and give
        the heap's free pages back."""
        loop = asyncio.get_running_loop()
        quiet_s = time.monotonic() - self._last_use_s
        if quiet_s < IDLE_S:
            self._trim_timer = loop.call_later(IDLE_S - quiet_s, self._idle)
            return
        self._trim_timer = None
        self._pool.clear()
        self._pooled_bytes = 0
        if _malloc_trim is not None:
            loop.run_in_executor(self._executor, _malloc_trim, 0)

    def close(self) -> None:
        """No more trims (the executor is about to go)."""
        self._is_closed = True
        if self._trim_timer is not None:
            self._trim_timer.cancel()
            self._trim_timer = None


def _find_malloc_trim() -> Any | None:
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_malloc_trim = _find_malloc_trim()

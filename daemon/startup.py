"""SIGTERM and SIGINT while kvstored starts: recorded, then acted on where it is safe.

The event loop takes these signals over once the daemon exists (`StopSignals.hand_over`),
but building it can take long: importing, reclaiming what dead daemons left, and above all
faulting in a large DRAM pool (seconds per ten GiB). Before the hand-over a signal only
records itself. Start-up calls `StopSignals.check` at the points where stopping is safe
(before the daemon is built, and between chunks of a large pool), which raises
`StartupInterrupted`; that unwinds through the code that made each resource, so the
process exits 0 with nothing left behind instead of dying of the signal's default action
half-way (a 9 GiB segment in /dev/shm, for one). A signal recorded after the last check is
handed to the loop as a stop request.

This module imports nothing of the daemon's, so `python -m daemon` installs it before the
imports that take a while.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StartupInterrupted(Exception):
    """A stop signal came while the daemon was starting; it stopped cleanly."""


class StopSignals:
    """Records SIGTERM/SIGINT from construction until `hand_over` (main thread only)."""

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self._previous = {sig: signal.signal(sig, self._record) for sig in SIGNALS}

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)

    def check(self) -> None:
        """Raise `StartupInterrupted` if a stop signal came."""
        if self.received is not None:
            raise StartupInterrupted(f"stopped by {self.received.name} during start-up")

    def hand_over(self, loop: Any, request_stop: Callable[[], None]) -> None:
        """From now on the loop runs ``request_stop`` on a signal; one recorded since the
        last `check` is a stop request already."""
        for sig in SIGNALS:
            loop.add_signal_handler(sig, request_stop)
        if self.received is not None:
            request_stop()

    def restore(self) -> None:
        """The handlers from before (the process is about to exit, or `main` was called in
        a process that had its own)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

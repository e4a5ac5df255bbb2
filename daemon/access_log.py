"""The daemon's access log (``kvstored --access-log FILE``): one JSON line per request.

A request, for the daemon, is one prefix lookup (`match_prefix`): an engine asks it once
per request with all of the request's full-block keys, first block first. Each line is in
the ``access-log`` trace format of `kvstore.sim.traces`, so ``kvstore hitrate`` replays it:

    {"ts": 1718000000.123, "keys": ["<32 hex>", ...], "input_tokens": 48,
     "block_tokens": 16, "hit_blocks": 2, "namespace": "default"}

``keys`` are the keys the client sent (not the daemon's namespace-scoped ones), so two
namespaces that send the same keys look alike in the log. ``input_tokens`` is
``len(keys) * block_tokens`` (the daemon sees only full blocks: a prompt's trailing
partial block has no key), ``block_tokens`` the daemon's ``--block-tokens``, ``hit_blocks``
the answer the lookup got. A lookup with no keys is not logged (it has no tokens).

Invariants:
- The event loop never touches the disk: `record` appends a line to a list in memory;
  every ``flush_interval_s`` the pending lines go, in one batch, to a single writer thread
  that appends them to the file and flushes it. One thread keeps the lines in order.
- `aclose` (the daemon's shutdown, after requests in flight drained) writes whatever is
  pending, fsyncs and closes: a clean shutdown loses no line.
- The file is opened for appending and created with mode 0600 (it names the keys of every
  tenant); an existing file keeps its mode.
- At most ``MAX_PENDING_LINES`` wait in memory (a stalled disk); beyond that new lines
  are dropped and counted, never queued without bound.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kvstore.errors import ConfigError

log = logging.getLogger(__name__)

FLUSH_INTERVAL_S = 1.0
MAX_PENDING_LINES = 1_000_000


class AccessLog:
    """Append-only JSONL of prefix lookups; `start`, `record`, then `aclose`."""

    def __init__(self, path: str | Path, *, block_tokens: int,
                 flush_interval_s: float = FLUSH_INTERVAL_S) -> None:
        if block_tokens <= 0 or not flush_interval_s > 0:
            raise ValueError("block_tokens and flush_interval_s must be positive")
        self.path = Path(path)
        self.block_tokens = block_tokens
        self.flush_interval_s = flush_interval_s
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as e:
            raise ConfigError(f"cannot open --access-log {self.path}: "
                              f"{e.strerror or e}") from e
        self._file = os.fdopen(fd, "a", encoding="utf-8", buffering=1 << 16)
        self._pending: list[str] = []
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="kvstored-access-log")
        self._flusher: asyncio.Task[None] | None = None
        self.num_lines = 0
        self.num_dropped = 0
        self._write_failed = False

    def record(self, keys: Sequence[bytes], *, hit_blocks: int, namespace: str | None) -> None:
        """Log one lookup (on the event loop: no I/O here)."""
        if not keys:
            return
        if len(self._pending) >= MAX_PENDING_LINES:
            self.num_dropped += 1
            return
        line = {"ts": round(time.time(), 6), "keys": [bytes(k).hex() for k in keys],
                "input_tokens": len(keys) * self.block_tokens,
                "block_tokens": self.block_tokens, "hit_blocks": hit_blocks,
                "namespace": namespace}
        self._pending.append(json.dumps(line, separators=(",", ":")) + "\n")
        self.num_lines += 1

    async def start(self) -> None:
        self._flusher = asyncio.create_task(self._flush_periodically(),
                                            name="kvstored-access-log")

    async def _flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval_s)
            await self.flush()

    async def flush(self) -> None:
        """Hand the pending lines to the writer thread and wait until they are written."""
        if not self._pending:
            return
        lines, self._pending = self._pending, []
        loop = asyncio.get_running_loop()
        # Shielded: a cancelled flusher must not lose the batch it took.
        await asyncio.shield(loop.run_in_executor(self._writer, self._write, lines))

    def _write(self, lines: list[str]) -> None:
        try:
            self._file.write("".join(lines))
            self._file.flush()
        except OSError as e:
            self.num_dropped += len(lines)
            if not self._write_failed:  # once, not once a second
                log.error("access log %s: write failed (%s); dropping lines until it works",
                          self.path, e.strerror or e)
            self._write_failed = True
        else:
            self._write_failed = False

    def _close_file(self) -> None:
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as e:
            log.error("access log %s: final flush failed: %s", self.path, e.strerror or e)
        finally:
            self._file.close()

    def close_unstarted(self) -> None:
        """Close the file of a log that never started (the daemon failed to start)."""
        assert self._flusher is None, "started: use aclose"
        self._writer.shutdown(wait=False)
        self._file.close()

    async def aclose(self) -> None:
        """Stop the flusher, write what is pending, close the file; idempotent."""
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
            self._flusher = None
        if self._file.closed:
            return
        await self.flush()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._writer, self._close_file)
        self._writer.shutdown(wait=True)
        log.info("access log %s closed: %d lines, %d dropped", self.path, self.num_lines,
                 self.num_dropped)

"""How the daemon's event loop calls the Store without stalling.

A call that may wait on NVMe I/O runs in a worker thread (the Store is thread-safe); a
short one runs on the loop itself when the store lock is free (no disk I/O: two thread
switches saved), else in a worker thread. A call whose result must not be lost if the
request's deadline passes (slots taken out of a table, a commit) runs to its end, and a
result nobody reads any more is given back (`run_to_end`'s ``release``).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kvstore.store import Store

INLINE_PUT_BYTES = 1 << 20  # a put this small, with no NVMe tier, may run on the loop


class StoreCalls:
    """The Store, and the worker threads that run its calls for the loop."""

    def __init__(self, store: Store, num_workers: int) -> None:
        self.store = store
        self.executor = ThreadPoolExecutor(num_workers, thread_name_prefix="kvstored")

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in a worker thread: calls that may wait on NVMe I/O."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, functools.partial(fn, *args))

    async def run_short(self, fn: Callable[..., Any], *args: Any,
                        shield: bool = False) -> Any:
        """``fn(*args)`` on the loop itself when the store lock is free (a short call with
        no disk I/O saves two thread switches), else in a worker thread (``shield``: one
        that runs to the end even if the request's deadline passes)."""
        if self.store.try_lock():
            try:
                return fn(*args)
            finally:
                self.store.unlock()
        call = self.run(fn, *args)
        return await (asyncio.shield(call) if shield else call)

    async def run_to_end(self, fn: Callable[[], Any], *, inline: bool,
                         release: Callable[[Any], Any]) -> Any:
        """``fn()``, run to its end even if the request's deadline passes meanwhile (on the
        loop if ``inline`` and the lock is free); ``release`` gets a result nobody reads."""
        if inline and self.store.try_lock():
            try:
                return fn()
            finally:
                self.store.unlock()
        future = self.executor.submit(fn)
        try:
            return await asyncio.shield(asyncio.wrap_future(future))
        except asyncio.CancelledError:
            future.add_done_callback(
                lambda f: None if f.cancelled() or f.exception() else release(f.result()))
            raise

    def for_put(self, nbytes: int) -> Callable[..., Any]:
        """How to run a put of ``nbytes``: on the loop when it cannot reach the disk."""
        if not self.store.has_nvme and nbytes <= INLINE_PUT_BYTES:
            return self.run_short
        return self.run

    def for_get(self) -> Callable[..., Any]:
        return self.run if self.store.has_nvme else self.run_short

    def shutdown(self) -> None:
        self.executor.shutdown(wait=True)

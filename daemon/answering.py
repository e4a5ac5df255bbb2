"""What answering one request takes: its record, its answer, and running its handler in
place. Most handlers finish without waiting for anything (the store lock was free), so the
daemon starts them with ``send(None)`` and hands the rest to the loop (an ``await``, or a
task) only when one did suspend."""

from __future__ import annotations

import asyncio
import types
from collections.abc import Callable, Coroutine, Generator
from dataclasses import dataclass
from typing import Any

Answer = tuple[dict[str, Any], list[Any], bool, str]  # response, data parts, keep open, op
# An operation's handler: (connection, request meta, data) -> (response fields, data parts).
Handler = Callable[[Any, dict[str, Any], Any],
                   Coroutine[Any, Any, tuple[dict[str, Any], list[Any]]]]


@dataclass
class Request:
    """What is known of a request being answered (filled in as it is checked)."""

    id: int | None = None
    op: str = "?"
    timeout_s: float = 0.0


async def within(handler: Coroutine[Any, Any, Any], timeout_s: float) -> Any:
    """Await a request's handler under its deadline (`TimeoutError` past it). A handler
    that finishes without waiting is run to the end first, arming no timer: a timer costs
    about as much as the rest of a small request."""
    try:
        waiting = handler.send(None)
    except StopIteration as done:
        return done.value
    async with asyncio.timeout(timeout_s):  # no task per request, unlike wait_for
        return await resume(handler, waiting)


def run_in_place(handler: Coroutine[Any, Any, Any], timeout_s: float | None,
                 settle: Callable[[Any, Exception | None], None]) -> asyncio.Task[None] | None:
    """Run ``handler`` from a protocol callback: ``settle(result, error)`` gets its outcome
    at once when it does not wait (and None is returned), else from the task returned,
    which finishes it under ``timeout_s`` (the caller pauses its connection meanwhile)."""
    try:
        waiting = handler.send(None)
    except StopIteration as done:
        settle(done.value, None)
        return None
    except Exception as e:
        settle(None, e)
        return None
    return asyncio.get_running_loop().create_task(_finish(handler, waiting, timeout_s, settle))


async def _finish(handler: Coroutine[Any, Any, Any], waiting: Any, timeout_s: float | None,
                  settle: Callable[[Any, Exception | None], None]) -> None:
    try:
        async with asyncio.timeout(timeout_s):
            result = await resume(handler, waiting)
    except Exception as e:
        settle(None, e)
    else:
        settle(result, None)


@types.coroutine
def resume(handler: Coroutine[Any, Any, Any], waiting: Any) -> Generator[Any, Any, Any]:
    """The rest of ``handler``, which has yielded ``waiting`` (what it awaits) and so
    suspended; what ``await`` does, for a coroutine already started."""
    while True:
        try:
            sent = yield waiting
        except BaseException as e:  # the task's cancellation (the deadline), passed on
            try:
                waiting = handler.throw(e)
            except StopIteration as done:
                return done.value
        else:
            try:
                waiting = handler.send(sent)
            except StopIteration as done:
                return done.value

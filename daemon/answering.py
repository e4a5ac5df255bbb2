"""What answering one request takes: its record, its answer, and running its handler in
place. Most handlers finish without waiting for anything (the store lock was free), so the
daemon starts them with ``send(None)`` and hands the rest to the loop (an ``await``, or a
task) only when one did suspend."""

from __future__ import annotations

import asyncio
import types
from collections.abc import Coroutine, Generator
from dataclasses import dataclass
from typing import Any

Answer = tuple[dict[str, Any], list[Any], bool, str]  # response, data parts, keep open, op


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

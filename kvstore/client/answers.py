"""Where errors meet the client's transports: one boundary, `transport_failed`, for what
went wrong while a request or its answer travelled, and `checked` for what the daemon
answered.

A socket error, an EOF or an answer that is not a frame means the connection broke
(`StoreConnectionError`, which the clients retry on a fresh connection); an error the
daemon answered is raised as its own class (never retried: it would be answered again,
and a refused commit did not take effect).
"""

from __future__ import annotations

from typing import Any, NoReturn

from kvstore.errors import (
    DeadlineExceededError,
    KVStoreError,
    ProtocolError,
    StoreConnectionError,
)
from kvstore.wire.error_codes import ErrorCode, RequestError, error_class

Response = tuple[dict[str, Any], memoryview]  # meta, data


def transport_failed(error: Exception, url: str, op: str, timeout_s: float) -> NoReturn:
    """Raise what ``error``, raised while a transport sent a request or received its
    answer, means to the operations: a timeout is `DeadlineExceededError`; a socket error,
    an EOF or a frame that cannot be read is `StoreConnectionError` (the connection broke:
    retried on a fresh one), except a frame of another protocol version (`ProtocolError`:
    no retry can help). Anything else (a `KVStoreError` already) is raised as it is.

    Each transport calls it from ``except Exception`` around its I/O: a handler costs
    nothing until something is raised, unlike a context manager per request."""
    if isinstance(error, RequestError):
        if error.code is ErrorCode.UNSUPPORTED_VERSION:
            raise ProtocolError(f"bad answer from {url}: {error}") from None
        raise StoreConnectionError(f"{op} to {url}: bad answer ({error}): the connection "
                                   "cannot be trusted") from error
    if isinstance(error, KVStoreError):
        raise error
    if isinstance(error, TimeoutError):
        raise DeadlineExceededError(f"{op} to {url} did not finish within {timeout_s:g} s"
                                    ) from None
    if isinstance(error, EOFError):
        raise StoreConnectionError(f"{op} to {url}: the daemon closed the connection"
                                   ) from error
    if isinstance(error, OSError):
        raise StoreConnectionError(f"{op} to {url}: the connection broke: "
                                   f"{error or type(error).__name__}") from error
    raise error


def checked(answer: dict[str, Any], request_id: int, data: memoryview, url: str) -> Response:
    """The answer's fields and data; the error the daemon answered, as its own class."""
    if answer.get("id") not in (request_id, None):
        raise StoreConnectionError(f"answer to request {answer.get('id')} from {url}, "
                                   f"expected {request_id}: the connection is out of step")
    if not answer.get("ok"):
        code = str(answer.get("code"))
        raise error_class(code)(f"{url}: {answer.get('message')} [{code}]")
    return answer, data


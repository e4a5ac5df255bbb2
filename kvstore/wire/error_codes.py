"""The error codes of a failed response (``"ok": false``), and the exception each becomes.

Both sides translate here, once: the daemon answers an exception with `code_of`, the client
raises an answered code as `error_class`. `RequestError` is the daemon's way to answer a
request with a chosen code. The order of `ErrorCode` is part of the wire: the commit
doorbell sends a code as its position (`kvstore.wire.doorbell`), so new codes go last.
"""

from __future__ import annotations

import enum

from kvstore import errors


class ErrorCode(enum.Enum):
    """Error codes of a failed response (``"ok": false``); see docs/PROTOCOL.md."""

    BAD_FRAME = "bad_frame"  # framing broken: the connection is closed after this answer
    BAD_REQUEST = "bad_request"  # a field missing or of the wrong type
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_OP = "unknown_op"
    AUTH_REQUIRED = "auth_required"  # first request was not a hello
    AUTH_FAILED = "auth_failed"  # unknown token
    FORBIDDEN = "forbidden"  # the token does not grant that namespace (or shared memory)
    INVALID_KEY = "invalid_key"
    INVALID_VALUE = "invalid_value"  # over max_value_bytes, sizes not matching data
    BUFFER_SIZE = "buffer_size"
    UNKNOWN_HANDLE = "unknown_handle"  # a reservation or pin this connection does not hold
    DEADLINE_EXCEEDED = "deadline_exceeded"
    STORAGE_ERROR = "storage_error"
    SHUTTING_DOWN = "shutting_down"
    INTERNAL = "internal"
    # Last, so that the doorbell's status numbers of the codes above stay as they were.
    LEASE_EXPIRED = "lease_expired"  # a reservation committed after its lease ran out


_ERROR_CLASSES: dict[ErrorCode, type[errors.KVStoreError]] = {
    ErrorCode.BAD_FRAME: errors.ProtocolError,
    ErrorCode.BAD_REQUEST: errors.ProtocolError,
    ErrorCode.UNSUPPORTED_VERSION: errors.ProtocolError,
    ErrorCode.UNKNOWN_OP: errors.ProtocolError,
    ErrorCode.AUTH_REQUIRED: errors.AuthError,
    ErrorCode.AUTH_FAILED: errors.AuthError,
    ErrorCode.FORBIDDEN: errors.AuthError,
    ErrorCode.INVALID_KEY: errors.InvalidKeyError,
    ErrorCode.INVALID_VALUE: errors.InvalidValueError,
    ErrorCode.BUFFER_SIZE: errors.BufferSizeError,
    ErrorCode.UNKNOWN_HANDLE: errors.ProtocolError,
    ErrorCode.DEADLINE_EXCEEDED: errors.DeadlineExceededError,
    ErrorCode.STORAGE_ERROR: errors.StorageError,
    ErrorCode.SHUTTING_DOWN: errors.StoreClosedError,
    ErrorCode.INTERNAL: errors.KVStoreError,
    ErrorCode.LEASE_EXPIRED: errors.LeaseExpiredError,
}


def error_class(code: str) -> type[errors.KVStoreError]:
    try:
        return _ERROR_CLASSES[ErrorCode(code)]
    except ValueError:
        return errors.KVStoreError


def code_of(error: BaseException) -> ErrorCode:
    """The wire code of an exception raised while serving a request."""
    if isinstance(error, RequestError):
        return error.code
    for cls, code in ((errors.InvalidKeyError, ErrorCode.INVALID_KEY),
                      (errors.InvalidValueError, ErrorCode.INVALID_VALUE),
                      (errors.BufferSizeError, ErrorCode.BUFFER_SIZE),
                      (errors.StorageError, ErrorCode.STORAGE_ERROR),
                      (errors.StoreClosedError, ErrorCode.SHUTTING_DOWN)):
        if isinstance(error, cls):
            return code
    return ErrorCode.INTERNAL


class RequestError(errors.KVStoreError):
    """Raised on the daemon side to answer a request with an error code."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code

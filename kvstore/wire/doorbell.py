"""The commit doorbell's messages (same host: a Unix socket beside the TCP connection;
`daemon.doorbell` serves it, `kvstore.client.sync` rings it).

    REQUEST  <Q handle><16s key><Q spare_size>                      32 bytes (0: no spare)
    RESPONSE <Q status><Q stored><Q spare_handle><Q spare_offset>   32 bytes

A status is 0 for done, else an `ErrorCode` by its position in the enum (plus one).
"""

from __future__ import annotations

import struct

from kvstore.wire.error_codes import ErrorCode

DOORBELL_REQUEST = struct.Struct("<Q16sQ")  # handle, key, spare size (0: none)
DOORBELL_RESPONSE = struct.Struct("<QQQQ")  # status, stored, spare handle (0: none), offset
DOORBELL_MESSAGE_BYTES = 32  # the secret, each request and each response
_CODES = list(ErrorCode)


def doorbell_status(code: ErrorCode) -> int:
    """A doorbell response's status for an error code (0 means done)."""
    return 1 + _CODES.index(code)


def doorbell_code(status: int) -> ErrorCode:
    return _CODES[status - 1] if 0 < status <= len(_CODES) else ErrorCode.INTERNAL

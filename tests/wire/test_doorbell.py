"""The commit doorbell's messages (`kvstore.wire.doorbell`); the doorbell itself, served by
a real daemon, is tests/daemon/test_doorbell.py."""

from __future__ import annotations

from kvstore.wire.doorbell import (
    DOORBELL_MESSAGE_BYTES,
    DOORBELL_REQUEST,
    DOORBELL_RESPONSE,
    doorbell_code,
    doorbell_status,
)
from kvstore.wire.error_codes import ErrorCode


def test_doorbell_status_numbers_are_the_documented_ones():
    """The wire numbers of the error codes (docs/PROTOCOL.md lists them): fixed."""
    numbers = {code.value: doorbell_status(code) for code in ErrorCode}
    assert numbers["bad_frame"] == 1 and numbers["unknown_handle"] == 11
    assert numbers["internal"] == 15 and numbers["lease_expired"] == 16
    assert len(numbers) == 16
    assert all(doorbell_code(n) is ErrorCode(code) for code, n in numbers.items())


def test_an_unknown_status_reads_as_internal():
    assert doorbell_code(0) is ErrorCode.INTERNAL
    assert doorbell_code(len(ErrorCode) + 1) is ErrorCode.INTERNAL


def test_messages_are_32_bytes_each_way():
    assert DOORBELL_REQUEST.size == DOORBELL_RESPONSE.size == DOORBELL_MESSAGE_BYTES == 32

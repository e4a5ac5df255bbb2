"""Small files written whole: a crash leaves the old file or the new one, never a part.

    write to PATH.new (the mode asked; one left by a crash is overwritten) -> fsync
    -> rename over PATH -> fsync the directory (the rename itself is durable)

`key_file` is the one use so far: a secret made once and read back at every start.
"""

from __future__ import annotations

import os
import secrets


def write_durably(path: str, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` by a file holding ``data``, made with ``mode``; raises OSError."""
    temporary = f"{path}.new"  # the caller holds what makes it the only writer of ``path``
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    os.fchmod(fd, mode)  # (a file left by a crash keeps its old mode otherwise)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise
    directory = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class DamagedKeyError(ValueError):
    """A key file holds the wrong number of bytes."""


def key_file(path: str, nbytes: int) -> tuple[bytes, bool]:
    """The secret of ``nbytes`` in ``path``, made there (random, mode 0600) if the file does
    not exist; and whether it was made now. `DamagedKeyError` if the file holds another
    number of bytes, OSError if it cannot be read or written."""
    try:
        with open(path, "rb") as f:
            key = f.read(nbytes + 1)
    except FileNotFoundError:
        key = secrets.token_bytes(nbytes)
        write_durably(path, key)
        return key, True
    if len(key) != nbytes:
        raise DamagedKeyError(f"{path} holds {len(key)} bytes, not {nbytes}")
    return key, False

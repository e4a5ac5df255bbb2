"""Small files written whole: a crash leaves the old file or the new one, never a part.

    write to PATH.<pid>.new (O_EXCL, the mode asked) -> fsync -> rename over PATH
    -> fsync the directory (the rename itself is durable)
"""

from __future__ import annotations

import os


def write_durably(path: str, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` by a file holding ``data``, made with ``mode``; raises OSError."""
    temporary = f"{path}.{os.getpid()}.new"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
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

"""Sizes as people write them: ``8GiB``, ``512MiB``, ``3M`` tokens, ``100GB``."""

from __future__ import annotations

import re

from kvstore.errors import ConfigError

_BYTE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4,
    "ki": 1024, "kib": 1024, "mi": 1024**2, "mib": 1024**2, "gi": 1024**3, "gib": 1024**3,
    "ti": 1024**4, "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(value: int | str, *, what: str = "size") -> int:
    """Bytes (or a count) from an int or a string like ``8GiB``; `ConfigError` if malformed."""
    if isinstance(value, bool):
        raise ConfigError(f"{what} must be a size, not a bool")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{what} must not be negative, got {value}")
        return value
    if not isinstance(value, str):
        raise ConfigError(f"{what} must be an int or a string like '8GiB', got {value!r}")
    match = _SIZE.match(value)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _BYTE_UNITS:
        raise ConfigError(f"{what}: cannot read {value!r}; write e.g. 4096, 512MiB, 8GiB, 3M")
    return int(float(match.group(1)) * _BYTE_UNITS[unit])


def format_bytes(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")

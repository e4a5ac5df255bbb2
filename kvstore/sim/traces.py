"""Request traces for the hit-rate simulator: three JSONL formats, one in-memory shape.

Formats (one JSON object per line; blank lines are ignored):

- ``mooncake``: Mooncake's published traces,
  ``{"timestamp": ms, "input_length": n, "hash_ids": [int, ...]}``. Each hash id names a
  512-token block *and everything before it* (a chained prefix hash); the last block may
  be partial. The block size is fixed at 512 tokens by the format.
- ``tokens``: ``{"tokens": [id, ...]}`` with an optional ``"ts"`` (seconds). Keys come
  from `kvstore.prefix_hashes` at ``--block-tokens``; a trailing partial block gets no key
  (it is never cached), so it can never be a hit.
- ``access-log``: what ``kvstored --access-log FILE`` writes, one line per request (each
  ``match_prefix`` lookup): ``{"ts": seconds, "keys": [hex, ...], "input_tokens": n}``
  where ``keys`` are the request's 16-byte chained block keys in hex, first block first,
  and ``input_tokens`` the prompt length (at most ``len(keys) * block_tokens``; the daemon
  writes exactly that, as it sees only full blocks). An optional ``"block_tokens"`` (the
  daemon writes its ``--block-tokens``) is the block size the keys were made with: when
  every file is an access log and ``--block-tokens`` is not given, the first line's is
  used, and a line whose ``block_tokens`` differs from the replay's is malformed. Other
  extra fields are ignored (the daemon adds ``"hit_blocks"``, ``"namespace"``).

Invariants of a `Trace`:
- ``keys[i]`` are request ``i``'s block keys, first block first, each chained to the ones
  before it, so ``keys[i][j - 1]`` is the parent of ``keys[i][j]``.
- ``input_tokens[i] > 0``, and ``timestamps_s`` never decreases across files: a file's
  timestamps are shifted to start where the previous file ended.
- Keys are hashable and equal exactly when they name the same block: ``bytes`` (16-byte
  chained keys) or, for Mooncake's traces, the trace's own integer hash ids (a replay
  interns them to dense ids, `Trace.interned`, so their type costs nothing there).
"""

from __future__ import annotations

import enum
import json
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvstore.errors import KVStoreError

MOONCAKE_BLOCK_TOKENS = 512
TOKENS_NAMESPACE = "kvstore-hitrate"


class TraceFormat(enum.Enum):
    MOONCAKE = "mooncake"
    TOKENS = "tokens"
    ACCESS_LOG = "access-log"


class TraceError(KVStoreError, ValueError):
    """A trace cannot be read: unknown format, a malformed line (file and line named)."""


@dataclass(frozen=True)
class Interned:
    """A trace's keys as dense ids: request r's blocks are ``flat[starts[r]:starts[r + 1]]``
    (ids ``0 <= id < num_ids``, one per distinct key)."""

    flat: array  # 'i'
    starts: array  # 'q', one more than the requests
    input_tokens: array  # 'q'
    num_ids: int


@dataclass
class Trace:
    """Requests in replay order; see the module docstring for the invariants."""

    block_tokens: int
    timestamps_s: list[float] = field(default_factory=list)
    input_tokens: list[int] = field(default_factory=list)
    keys: list[list[bytes | int]] = field(default_factory=list)
    num_bad_lines: int = 0

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def num_accesses(self) -> int:
        return sum(len(k) for k in self.keys)

    @property
    def total_input_tokens(self) -> int:
        return sum(self.input_tokens)

    def interned(self) -> Interned:
        """The keys as dense ids (made once, again if ``keys`` is replaced)."""
        cached = self.__dict__.get("_interned")
        if cached is not None and cached[0] is self.keys and cached[1] == len(self.keys):
            return cached[2]
        from kvstore.placement import intern

        flat, starts, num_ids = intern(self.keys)
        interned = Interned(flat, starts, array("q", self.input_tokens), num_ids)
        self.__dict__["_interned"] = (self.keys, len(self.keys), interned)
        return interned


def detect_format(obj: Any) -> TraceFormat | None:
    """The format a parsed line belongs to, or None if it matches none."""
    if not isinstance(obj, dict):
        return None
    if "hash_ids" in obj:
        return TraceFormat.MOONCAKE
    if "tokens" in obj:
        return TraceFormat.TOKENS
    if "keys" in obj:
        return TraceFormat.ACCESS_LOG
    return None


def _parse_line(fmt: TraceFormat, obj: Any, block_tokens: int
                ) -> tuple[float | None, int, list[bytes]]:
    """``(timestamp_s or None, input_tokens, keys)`` of one request; ValueError if bad."""
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    if fmt is TraceFormat.MOONCAKE:
        ids, length = obj["hash_ids"], obj["input_length"]
        if not isinstance(ids, list) or (ids and (set(map(type, ids)) != {int}
                                                  or min(ids) < 0)):
            raise ValueError("hash_ids must be a list of non-negative ints")
        if type(length) is not int:
            raise ValueError("input_length must be a positive int")
        return _mooncake_request(obj.get("timestamp"), length, ids, block_tokens)
    if fmt is TraceFormat.TOKENS:
        tokens = obj["tokens"]
        if not isinstance(tokens, list) or not tokens:
            raise ValueError("tokens must be a non-empty list of token ids")
        from kvstore.keys import prefix_hashes  # (numpy: loaded only for this format)

        keys = prefix_hashes(tokens, block_tokens=block_tokens, namespace=TOKENS_NAMESPACE)
        ts = obj.get("ts")
        return None if ts is None else float(ts), len(tokens), list(keys)
    hex_keys, length = obj["keys"], obj["input_tokens"]
    if not isinstance(hex_keys, list):
        raise ValueError("keys must be a list of hex strings")
    keys = [bytes.fromhex(k) for k in hex_keys]
    if type(length) is not int or length <= 0 or length > len(keys) * block_tokens:
        raise ValueError(f"input_tokens must be a positive int of at most "
                         f"len(keys) * {block_tokens}")
    logged_block_tokens = obj.get("block_tokens", block_tokens)
    if logged_block_tokens != block_tokens:
        raise ValueError(f"logged with block_tokens {logged_block_tokens}, replayed at "
                         f"{block_tokens}")
    ts = obj.get("ts")
    return None if ts is None else float(ts), length, keys


def _mooncake_request(timestamp: Any, length: int, ids: list[int], block_tokens: int
                      ) -> tuple[float | None, int, list[int]]:
    """A Mooncake line whose ``hash_ids`` are non-negative ints and ``input_length`` an
    int, checked further."""
    if length <= 0:
        raise ValueError("input_length must be a positive int")
    if length > len(ids) * block_tokens:
        raise ValueError(f"input_length {length} exceeds {len(ids)} blocks of "
                         f"{block_tokens} tokens")
    return None if timestamp is None else float(timestamp) / 1000.0, length, ids


def _requests(path: Path, fmt: TraceFormat, block_tokens: int
              ) -> Iterator[tuple[int, tuple[float | None, int, list[Any]] | Exception]]:
    """``(line number, (timestamp_s, input_tokens, keys) or what is wrong with it)`` for
    each line of ``path`` that is not blank.

    Mooncake files go through a compiled reader of their lines (`kvstore.sim._scan`),
    which hands back as text, for json and `_parse_line`, any line it does not read
    itself: the same requests and the same errors as the json path, 3-4x faster."""
    if fmt is not TraceFormat.MOONCAKE:
        for number, line in _lines(path):
            try:
                yield number, _parse_line(fmt, json.loads(line), block_tokens)
            except (ValueError, KeyError, TypeError, KVStoreError) as e:
                yield number, e
        return
    from kvstore.sim._scan import scan_mooncake

    try:
        data = path.read_bytes()
        data.decode("utf-8")
    except OSError as e:
        raise TraceError(f"{path}: cannot read: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise TraceError(f"{path}: not a UTF-8 text file") from e
    for number, row in scan_mooncake(data, block_tokens):
        if type(row) is tuple:
            yield number, row
            continue
        try:
            if row.strip():
                yield number, _parse_line(fmt, json.loads(row), block_tokens)
        except (ValueError, KeyError, TypeError, KVStoreError) as e:
            yield number, e


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    try:
        with path.open("r", encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    yield number, line
    except OSError as e:
        raise TraceError(f"{path}: cannot read: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise TraceError(f"{path}: not a UTF-8 text file") from e


def sniff_format(path: Path) -> TraceFormat:
    """The format of the first line of ``path`` that parses as JSON and matches one."""
    for _, line in _lines(path):
        try:
            fmt = detect_format(json.loads(line))
        except ValueError:
            continue
        if fmt is not None:
            return fmt
    raise TraceError(f"{path}: cannot tell the trace format (no line looks like "
                     f"{', '.join(f.value for f in TraceFormat)}); give --format")


def _logged_block_tokens(path: Path) -> int | None:
    """The ``block_tokens`` an access log's first line declares, if it is a positive int."""
    for _, line in _lines(path):
        try:
            obj = json.loads(line)
        except ValueError:
            return None
        value = obj.get("block_tokens") if isinstance(obj, dict) else None
        return value if type(value) is int and value > 0 else None
    return None


def _why(error: Exception) -> str:
    """What is wrong with a line, the JSON parser's position named as inside the record."""
    if isinstance(error, json.JSONDecodeError):
        return (f"not JSON: {error.msg} at line {error.lineno} column {error.colno} "
                "of the record")
    if isinstance(error, KeyError):
        return f"missing field {error}"
    return str(error)


def read_traces(paths: list[Path], *, fmt: TraceFormat | None = None,
                block_tokens: int | None = None, skip_bad: bool = False) -> Trace:
    """Read and concatenate ``paths`` (see the module docstring).

    ``block_tokens`` defaults to the one access logs declare, else 512 (Mooncake's, which
    that format fixes). A malformed line raises `TraceError` naming file and line (and, for
    bad JSON, the parser's line and column inside the record), or is counted in
    ``num_bad_lines`` when ``skip_bad``.
    """
    if block_tokens is not None and block_tokens <= 0:
        raise TraceError(f"--block-tokens must be positive, got {block_tokens}")
    formats = [fmt or sniff_format(p) for p in paths]
    if TraceFormat.MOONCAKE in formats:
        if block_tokens not in (None, MOONCAKE_BLOCK_TOKENS):
            raise TraceError(f"Mooncake traces fix --block-tokens at {MOONCAKE_BLOCK_TOKENS}; "
                             f"got {block_tokens}")
    if block_tokens is None and formats and all(f is TraceFormat.ACCESS_LOG for f in formats):
        block_tokens = _logged_block_tokens(paths[0])
    block_tokens = block_tokens or MOONCAKE_BLOCK_TOKENS
    trace = Trace(block_tokens)
    offset_s = 0.0
    for path, file_fmt in zip(paths, formats, strict=True):
        first_s: float | None = None
        last_s = offset_s
        for number, request in _requests(path, file_fmt, block_tokens):
            if isinstance(request, Exception):
                if skip_bad:
                    trace.num_bad_lines += 1
                    continue
                raise TraceError(f"{path} line {number}: not a {file_fmt.value} trace line "
                                 f"({_why(request)}); fix it or pass --skip-bad") from request
            ts, length, keys = request
            if ts is not None:
                if first_s is None:
                    first_s = ts
                last_s = max(last_s, offset_s + ts - first_s)  # never goes back in time
            trace.timestamps_s.append(last_s)
            trace.input_tokens.append(length)
            trace.keys.append(keys)
        offset_s = last_s
    return trace

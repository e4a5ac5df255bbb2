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
import itertools
import json
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
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


class Trace:
    """Requests in replay order; see the module docstring for the invariants.

    A trace read from files is held as dense ids (`interned`); ``keys`` is made from them
    when first asked for. A trace built by hand sets ``keys`` (and may append to it)."""

    def __init__(self, block_tokens: int, timestamps_s: list[float] | None = None,
                 input_tokens: list[int] | None = None,
                 keys: list[list[bytes | int]] | None = None, num_bad_lines: int = 0) -> None:
        self.block_tokens = block_tokens
        self.timestamps_s = [] if timestamps_s is None else timestamps_s
        self.input_tokens = [] if input_tokens is None else input_tokens
        self._keys: list[list[bytes | int]] | None = [] if keys is None else keys
        self.num_bad_lines = num_bad_lines
        # (the ids, the keys list they were made from or None, its length then)
        self._interned: tuple[Interned, list | None, int] | None = None
        self._interner: Any = None

    def __len__(self) -> int:
        return len(self.input_tokens)

    def __repr__(self) -> str:
        return (f"Trace({len(self)} requests, {self.num_accesses} accesses of "
                f"{self.block_tokens} tokens)")

    @property
    def keys(self) -> list[list[bytes | int]]:
        if self._keys is None:
            interned = self.interned()
            flat, starts, keys_of = interned.flat, interned.starts, self._interner.keys_of
            self._keys = [keys_of(flat, starts[r], starts[r + 1]) for r in range(len(self))]
            self._interned = (interned, self._keys, len(self._keys))
        return self._keys

    @keys.setter
    def keys(self, keys: list[list[bytes | int]]) -> None:
        self._keys = keys

    @property
    def num_accesses(self) -> int:
        if self._keys is None:
            return len(self.interned().flat)
        return sum(len(k) for k in self._keys)

    @property
    def total_input_tokens(self) -> int:
        return sum(self.input_tokens)

    def interned(self) -> Interned:
        """The keys as dense ids (made once, again if ``keys`` was replaced or grew)."""
        cached = self._interned
        if cached is not None and ((cached[1] is None and self._keys is None) or (
                cached[1] is self._keys and cached[2] == len(self._keys))):
            return cached[0]
        from kvstore.sim._scan import Interner, intern

        self._interner = Interner()
        flat, starts, num_ids = intern(self.keys, self._interner)
        interned = Interned(flat, starts, array("q", self.input_tokens), num_ids)
        self._interned = (interned, self._keys, len(self._keys))
        return interned

    def _set_interned(self, flat: array, counts: list[int], interner: Any) -> None:
        """Hold the requests' keys as these ids (``counts``: blocks per request, in order),
        ``keys`` to be made from them when asked for."""
        starts = array("q", [0])
        starts.extend(itertools.accumulate(counts))
        self._interner = interner
        self._keys = None
        self._interned = (Interned(flat, starts, array("q", self.input_tokens),
                                   interner.num_ids), None, 0)


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
    each line of ``path`` that is not blank, through json."""
    for number, line in _lines(path):
        try:
            yield number, _parse_line(fmt, json.loads(line), block_tokens)
        except (ValueError, KeyError, TypeError, KVStoreError) as e:
            yield number, e


def _scanned(path: Path, block_tokens: int, interner: Any
             ) -> tuple[list[float | None], list[int], list[int], array,
                        list[tuple[int, int, tuple[float | None, int, list[Any]] | Exception]]]:
    """A Mooncake file through the compiled reader (`kvstore.sim._scan`): per request
    (blank lines aside) its timestamp, input tokens, blocks, their ids one after another,
    and ``(index, line number, request or what is wrong)`` for the lines that reader left
    to json and `_parse_line` (their entries: None, 0, 0): the same requests and errors
    as the json path, 3-4x faster."""
    from kvstore.sim._scan import scan_mooncake

    try:
        data = path.read_bytes()
        data.decode("utf-8")
    except OSError as e:
        raise TraceError(f"{path}: cannot read: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise TraceError(f"{path}: not a UTF-8 text file") from e
    timestamps, lengths, counts, flat, left = scan_mooncake(data, block_tokens, interner)
    parsed = []
    for index, number, text in left:
        if not text.strip():
            parsed.append((index, number, None))
            continue
        try:
            request: Any = _parse_line(TraceFormat.MOONCAKE, json.loads(text), block_tokens)
        except (ValueError, KeyError, TypeError, KVStoreError) as e:
            request = e
        parsed.append((index, number, request))
    return timestamps, lengths, counts, flat, parsed


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


def _file_requests(path: Path, fmt: TraceFormat, block_tokens: int, interner: Any,
                   flat: array, trace: Trace, skip_bad: bool
                   ) -> Iterator[tuple[float | None, int, int]]:
    """``(timestamp_s, input_tokens, blocks)`` of each request of ``path``, its blocks' ids
    appended to ``flat``; a bad line raises `TraceError` or, with ``skip_bad``, is counted
    in ``trace.num_bad_lines``."""

    def bad(number: int, error: Exception) -> None:
        if not skip_bad:
            raise TraceError(f"{path} line {number}: not a {fmt.value} trace line "
                             f"({_why(error)}); fix it or pass --skip-bad") from error
        trace.num_bad_lines += 1

    def taken(number: int, request: Any) -> tuple[float | None, int, int] | None:
        """A line json read: its request with its ids appended to ``flat``, or None."""
        if isinstance(request, Exception):
            bad(number, request)
            return None
        ts, length, keys = request
        interner.extend(flat, keys)
        return ts, length, len(keys)

    if fmt is not TraceFormat.MOONCAKE:
        for number, request in _requests(path, fmt, block_tokens):
            if (row := taken(number, request)) is not None:
                yield row
        return
    timestamps, lengths, counts, scanned, left = _scanned(path, block_tokens, interner)
    if not left:  # the usual case: every line read by the compiled reader
        flat.extend(scanned)
        yield from zip(timestamps, lengths, counts, strict=True)
        return
    fixed = {index: (number, request) for index, number, request in left}
    offset = 0
    for index, count in enumerate(counts):
        if index not in fixed:
            flat.extend(scanned[offset:offset + count])
            offset += count
            yield timestamps[index], lengths[index], count
            continue
        number, request = fixed[index]
        # (None: a line blank to str.strip, not to the compiled reader)
        if request is not None and (row := taken(number, request)) is not None:
            yield row


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
    from kvstore.sim._scan import Interner

    interner = Interner()
    trace = Trace(block_tokens)
    flat, counts = array("i"), []
    offset_s = 0.0
    for path, file_fmt in zip(paths, formats, strict=True):
        first_s: float | None = None
        last_s = offset_s
        for ts, length, count in _file_requests(path, file_fmt, block_tokens, interner,
                                                flat, trace, skip_bad):
            if ts is not None:
                if first_s is None:
                    first_s = ts
                last_s = max(last_s, offset_s + ts - first_s)  # never goes back in time
            trace.timestamps_s.append(last_s)
            trace.input_tokens.append(length)
            counts.append(count)
        offset_s = last_s
    trace._set_interned(flat, counts, interner)
    return trace

"""A seeded generator of frames for `kvstored`: well-formed requests of every operation,
the same with one field's value replaced by anything msgpack can carry, forged headers,
frames cut short, and plain garbage. `Fuzzer.run` sends them over raw sockets and sorts
what came back; the daemon must answer every whole frame (or hang up on a broken one),
never with an internal error, never hang, and stay up.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import msgpack

from kvstore.wire import frames
from kvstore.wire.frames import HEADER, MAGIC
from kvstore.wire.ops import OPERATIONS
from tests.daemon.test_robustness import RawConnection, frame, hello

_LIST_OPS = ("put_many", "get_many", "match_prefix", "reserve", "pin", "touch")


@dataclass
class FuzzReport:
    frames: int = 0
    answers: Counter[str] = field(default_factory=Counter)  # "ok" or the error code
    hang_ups: int = 0      # the daemon closed the connection instead of answering
    internal_errors: list[str] = field(default_factory=list)
    hangs: list[str] = field(default_factory=list)  # no answer within the wait

    def figures(self) -> dict[str, Any]:
        return {"frames": self.frames, "answers": dict(self.answers),
                "hang_ups": self.hang_ups, "internal_errors": len(self.internal_errors),
                "hangs": len(self.hangs)}


class Fuzzer:
    """Frames for the daemon at ``port``, in the namespace ``fuzz`` (keys of its own)."""

    def __init__(self, port: int, seed: int, max_value_bytes: int) -> None:
        self.port = port
        self.rng = random.Random(seed)
        self.max_value_bytes = max_value_bytes
        self.keys = [self.rng.randbytes(16) for _ in range(24)]
        self.handles: list[int] = list(range(1, 50))
        self.report = FuzzReport()
        self._conn: RawConnection | None = None

    # -- values ------------------------------------------------------------------------------

    def _anything(self, depth: int = 0) -> Any:
        """Any msgpack value, biased towards the edges."""
        rng = self.rng
        kind = rng.randrange(12 if depth < 2 else 9)
        if kind == 0:
            return None
        if kind == 1:
            return rng.choice([True, False])
        if kind == 2:
            return rng.choice([0, 1, -1, 2**31, 2**32, 2**63 - 1, -(2**63), 2**64 - 1])
        if kind == 3:
            return rng.randrange(-1000, 100_000)
        if kind == 4:
            return rng.choice([0.0, -1.5, 1e300, float("nan")])
        if kind == 5:
            return rng.randbytes(rng.choice([0, 1, 15, 16, 17, 64]))
        if kind == 6:
            return rng.choice(["", "x", "default", "fuzz", "ü" * 300, "a" * 257])
        if kind == 7:
            return rng.choice(self.keys)
        if kind == 8:
            return rng.choice([*sorted(OPERATIONS), "_stop", "nope"])
        if kind == 9:
            return [self._anything(depth + 1) for _ in range(rng.randrange(6))]
        if kind == 10:
            return {str(self._anything(depth + 1)): self._anything(depth + 1)
                    for _ in range(rng.randrange(4))}
        return [rng.choice(self.keys) for _ in range(rng.randrange(0, 300))]

    def _request(self) -> tuple[dict[str, Any], bytes]:
        """A well-formed request of a random operation, with its data."""
        rng = self.rng
        op = rng.choice(sorted(OPERATIONS - {"hello"}))
        meta: dict[str, Any] = {"id": rng.randrange(1 << 30), "op": op,
                                "timeout_ms": rng.choice([1, 50, 5000])}
        data = b""
        keys = [rng.choice(self.keys) for _ in range(rng.randrange(1, 6))]
        if op in ("put", "get", "contains", "delete", "tier_of"):
            meta["key"] = keys[0]
            if op == "put":
                data = rng.randbytes(rng.choice([0, 1, 100, 4096, 70_000]))
        elif op in _LIST_OPS:
            meta["keys"] = keys
            if op in ("put_many", "reserve"):
                sizes = [rng.choice([0, 10, 4096, 65536, self.max_value_bytes])
                         for _ in keys]
                meta["sizes"] = sizes
                if op == "put_many":
                    data = rng.randbytes(sum(min(s, 4096) for s in sizes))
                    meta["sizes"] = [min(s, 4096) for s in sizes]
        elif op in ("commit", "abort", "unpin"):
            meta["handles"] = [rng.choice(self.handles) for _ in keys]
            if op == "commit" and rng.random() < 0.5:
                meta["keys"] = keys
            if op == "commit" and rng.random() < 0.3:
                meta["reserve_sizes"] = [rng.choice([4096, 65536])]
        if op == "match_prefix" and rng.random() < 0.3:
            meta["probe"] = True
        return meta, data

    def next_frame(self) -> tuple[bytes, bool]:
        """A frame, and whether it is whole (an answer or a hang-up must follow)."""
        rng = self.rng
        roll = rng.random()
        meta, data = self._request()
        if roll < 0.35:
            return frame(meta, data), True
        if roll < 0.7:  # one field replaced (or added, or removed)
            name = rng.choice([*meta, "extra", "id", "op", "timeout_ms"])
            if rng.random() < 0.15:
                meta.pop(name, None)
            else:
                meta[name] = self._anything()
            return frame(meta, data), True
        if roll < 0.8:  # a forged header around a good body (lengths that match the body)
            return frame(meta, data, magic=rng.choice([MAGIC, b"KW", b"\x00\x00"]),
                         version=rng.choice([0, 1, 1, 2, 255]),
                         kind=rng.choice([0, 1, 1, 2, 3])), True
        if roll < 0.87:  # a body that is not the meta it claims
            packed = rng.choice([rng.randbytes(rng.randrange(1, 200)),
                                 msgpack.packb(meta)[:-1], b"\xc1", b"\xdd\xff\xff\xff\xff"])
            return frame(None, packed=packed), True
        if roll < 0.94:  # cut short: the rest never comes
            whole = frame(meta, data)
            return whole[:rng.randrange(1, len(whole))], False
        if roll < 0.97:  # lengths larger than what follows
            return HEADER.pack(MAGIC, frames.PROTOCOL_VERSION, 1, rng.randrange(1, 1 << 22),
                               rng.randrange(1 << 30)) + rng.randbytes(50), False
        return rng.randbytes(rng.randrange(1, 400)), False

    # -- sending --------------------------------------------------------------------------------

    def _connection(self) -> RawConnection:
        if self._conn is None:
            conn = RawConnection(self.port, timeout_s=10)
            conn.send(frame(hello(shm=self.rng.random() < 0.5, namespace="fuzz")))
            answer = conn.answer()
            assert answer["ok"], answer
            self._conn = conn
        return self._conn

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def run(self, num_frames: int) -> FuzzReport:
        report = self.report
        for _ in range(num_frames):
            raw, whole = self.next_frame()
            conn = self._connection()
            report.frames += 1
            try:
                conn.send(raw)
            except OSError:
                report.hang_ups += 1
                self._drop()
                continue
            if not whole:
                self._drop()  # the daemon drops it after the frame timeout; we need not wait
                continue
            try:
                response = conn.read_frame()
            except TimeoutError:
                report.hangs.append(repr(raw[:120]))
                self._drop()
                continue
            except (AssertionError, OSError):
                report.hang_ups += 1
                self._drop()
                continue
            if response is None:
                report.hang_ups += 1
                self._drop()
                continue
            answer = response[0]
            code = "ok" if answer.get("ok") else str(answer.get("code"))
            report.answers[code] += 1
            if code == "internal":
                report.internal_errors.append(f"{answer.get('message')} <- {raw[:200]!r}")
            if answer.get("handles"):
                self.handles.extend(answer["handles"])
        self._drop()
        return report


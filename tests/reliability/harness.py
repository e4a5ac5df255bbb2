"""The reliability suite's machinery, shared by its tests (short runs, in CI) and by
`benchmarks/reliability_bench.py` (long runs, figures as JSON).

Every value written here says whose it is: a 32-byte head (magic, key id, version, length,
and a BLAKE2b of those) followed by bytes derived from (key id, version). So any bytes a
reader gets back can be judged on their own (`judge`): the value last written for that key,
an older value of that key (stale), another key's value (foreign), or bytes nobody wrote
(corrupt).

`CrashLoop` is the SIGKILL test: a writer thread puts, overwrites, deletes and flushes
against a real `kvstored` on an NVMe directory, the daemon is killed at a random moment,
restarted on the same directory, and every key is read back and judged against what was
acknowledged before the last completed flush (must be exact), after it (may be either), or
in flight (may be either).
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import statistics
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kvstore
from tests.daemon.conftest import DaemonProcess

KiB, MiB = 1024, 1024 * 1024

_HEAD = struct.Struct("<8sQQQ")  # magic, key id, version, length; then 16 bytes of BLAKE2b
_MAGIC = b"KVRELIAB"
HEAD_BYTES = _HEAD.size + 16


def key_of(key_id: int) -> bytes:
    return hashlib.blake2b(f"reliability-{key_id}".encode(), digest_size=16).digest()


def value_of(key_id: int, version: int, nbytes: int) -> bytes:
    """The value of ``key_id`` at ``version``: it names both (see the module docstring)."""
    assert nbytes >= HEAD_BYTES
    head = _HEAD.pack(_MAGIC, key_id, version, nbytes)
    head += hashlib.blake2b(head, digest_size=16).digest()
    seed = hashlib.blake2b(head, digest_size=64).digest()
    body = nbytes - HEAD_BYTES
    return head + (seed * (body // 64 + 1))[:body]


def whose(data: bytes) -> tuple[int, int] | None:
    """(key id, version) of bytes that are exactly some `value_of`, else None."""
    if len(data) < HEAD_BYTES:
        return None
    magic, key_id, version, nbytes = _HEAD.unpack_from(data)
    if magic != _MAGIC or nbytes != len(data):
        return None
    if value_of(key_id, version, nbytes) != data:
        return None
    return key_id, version


@dataclass
class Verdicts:
    """What reading keys back found, summed over rounds."""

    checked: int = 0  # keys read back and judged
    exact: int = 0    # the expected value, or an accepted absence
    lost: int = 0     # absent, though a value was durable
    stale: int = 0    # a value of this key that was not the latest durable one (nor later)
    foreign: int = 0  # another key's value
    corrupt: int = 0  # bytes nobody wrote
    examples: list[str] = field(default_factory=list)

    @property
    def bad(self) -> int:
        return self.lost + self.stale + self.foreign + self.corrupt

    def judge(self, key_id: int, got: bytes | None, accepted: set[int | None],
              durable: int | None) -> None:
        """``accepted``: the versions (None: absent) that may be read; ``durable``: the
        version that must be there at least (its loss is `lost`)."""
        self.checked += 1
        if got is None:
            if None in accepted:
                self.exact += 1
            else:
                self._bad("lost", f"key {key_id}: absent, durable version {durable}")
            return
        found = whose(got)
        if found is None:
            self._bad("corrupt", f"key {key_id}: {len(got)} bytes nobody wrote")
        elif found[0] != key_id:
            self._bad("foreign", f"key {key_id}: the value of key {found[0]}")
        elif found[1] not in accepted:
            self._bad("stale", f"key {key_id}: version {found[1]}, accepted {accepted}")
        else:
            self.exact += 1

    def _bad(self, kind: str, example: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        if len(self.examples) < 20:
            self.examples.append(f"{kind}: {example}")

    def add(self, other: Verdicts) -> None:
        for name in ("checked", "exact", "lost", "stale", "foreign", "corrupt"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.examples += other.examples[:20 - len(self.examples)]

    def figures(self) -> dict[str, int]:
        return {"values_checked": self.checked, "lost": self.lost, "stale": self.stale,
                "foreign": self.foreign, "corrupt": self.corrupt}


@dataclass
class Journal:
    """Acknowledged writes in order, and how many of them the last completed flush covers."""

    ops: list[tuple[int, int | None]] = field(default_factory=list)  # key id, version|None
    durable_upto: int = 0
    in_flight: tuple[int, int | None] | None = None  # sent, not acknowledged


class CrashLoop:
    """Rounds of write -> SIGKILL -> restart -> judge against one NVMe directory."""

    SIZES = (HEAD_BYTES, 4 * KiB, 20 * KiB, 64 * KiB, 100 * KiB, 200 * KiB)

    def __init__(self, tmp_path: Path, *, num_keys: int = 160, seed: int = 0,
                 start: Callable[..., DaemonProcess]) -> None:
        self.flags = ("--dram", "4MiB", "--nvme-path", str(tmp_path / "nvme"), "--nvme",
                      "96MiB", "--max-value", "256KiB")
        self.num_keys = num_keys
        self.rng = random.Random(seed)
        self.start = start
        self.state: dict[int, int | None] = {}  # key id -> version on disk (None: absent)
        self.next_version = 1
        self.verdicts = Verdicts()
        self.rounds = 0
        self.num_acknowledged = 0
        self.latencies_s: list[float] = []
        self.write_s = 0.0
        self.port: int | None = None

    def run(self, rounds: int) -> None:
        for _ in range(rounds):
            self.round()

    def round(self) -> None:
        daemon = self.start(*self.flags, port=self.port)
        self.port = daemon.port
        journal = Journal()
        stop = threading.Event()
        errors: list[BaseException] = []
        shared_memory = self.rounds % 2 == 0
        writer = threading.Thread(target=self._write, daemon=True,
                                  args=(daemon.url, shared_memory, journal, stop, errors))
        started = time.monotonic()
        writer.start()
        # Kill at a random moment once some writes and a flush went through.
        deadline = time.monotonic() + 30
        kill_after = self.rng.randrange(40, 220)
        while len(journal.ops) < kill_after or journal.durable_upto == 0:
            assert writer.is_alive(), f"the writer died: {errors}"
            assert time.monotonic() < deadline, f"writes too slow: {len(journal.ops)}"
            time.sleep(0.001)
        daemon.signal(signal.SIGKILL)
        stop.set()
        writer.join(30)
        assert not writer.is_alive(), "the writer hung on a killed daemon"
        self.write_s += time.monotonic() - started
        self.num_acknowledged += len(journal.ops)
        self._judge(journal)
        self.rounds += 1

    def _write(self, url: str, shared_memory: bool, journal: Journal, stop: threading.Event,
               errors: list[BaseException]) -> None:
        rng = random.Random(self.rng.random())
        try:
            with kvstore.connect(url, timeout_s=10, shared_memory=shared_memory) as client:
                while not stop.is_set():
                    roll = rng.random()
                    if roll < 0.06:
                        upto = len(journal.ops)
                        client.flush()
                        journal.durable_upto = upto
                        continue
                    key_id = rng.randrange(self.num_keys)
                    if roll < 0.18:
                        journal.in_flight = (key_id, None)
                        began = time.perf_counter()
                        client.delete(key_of(key_id))
                    else:
                        version = self.next_version
                        self.next_version += 1
                        journal.in_flight = (key_id, version)
                        value = value_of(key_id, version, rng.choice(self.SIZES))
                        began = time.perf_counter()
                        assert client.put(key_of(key_id), value)
                    self.latencies_s.append(time.perf_counter() - began)
                    journal.ops.append(journal.in_flight)
                    journal.in_flight = None
        except kvstore.KVStoreError as e:  # the daemon was killed under it
            errors.append(e)

    def _judge(self, journal: Journal) -> None:
        durable = dict(self.state)
        for key_id, version in journal.ops[:journal.durable_upto]:
            durable[key_id] = version
        maybe: dict[int, set[int | None]] = {}
        later = journal.ops[journal.durable_upto:]
        if journal.in_flight is not None:
            later.append(journal.in_flight)
        for key_id, version in later:
            maybe.setdefault(key_id, set()).add(version)
        restarted = self.start(*self.flags, port=self.port)
        try:
            with kvstore.connect(restarted.url, timeout_s=30, shared_memory=False) as client:
                ids = list(range(self.num_keys))
                values = client.get_many([key_of(i) for i in ids])
                for key_id, got in zip(ids, values, strict=True):
                    accepted = {durable.get(key_id)} | maybe.get(key_id, set())
                    self.verdicts.judge(key_id, got, accepted, durable.get(key_id))
                    found = None if got is None else whose(got)
                    self.state[key_id] = None if found is None else found[1]
        finally:
            restarted.stop()

    def figures(self) -> dict[str, Any]:
        latencies = sorted(self.latencies_s)
        return {
            "rounds": self.rounds,
            "acknowledged_writes": self.num_acknowledged,
            **self.verdicts.figures(),
            "writes_per_s": round(len(latencies) / self.write_s, 1) if self.write_s else None,
            "write_p50_ms": round(statistics.median(latencies) * 1e3, 3) if latencies else None,
            "write_p99_ms": (round(latencies[int(0.99 * (len(latencies) - 1))] * 1e3, 3)
                             if latencies else None),
        }


DAMAGE_FLAGS = ("--dram", "4MiB", "--nvme", "96MiB", "--max-value", "256KiB")


class DiskDamage:
    """Rounds of: values written through a daemon and flushed by SIGTERM, then damage to
    its NVMe segments while it is down (bit flips, or a segment cut short, in turn), then a
    restart that reads every key back (get_many and get) and judges it: the value written
    or nothing, and nothing missing unless the daemon counted damage."""

    SIZES = (HEAD_BYTES, 3000, 4 * KiB, 20 * KiB, 64 * KiB, 100 * KiB, 256 * KiB)

    def __init__(self, tmp_path: Path, *, start: Callable[..., DaemonProcess], seed: int,
                 num_keys: int = 120, flips: int = 40) -> None:
        self.tmp_path = tmp_path
        self.start = start
        self.rng = random.Random(seed)
        self.num_keys = num_keys
        self.flips = flips
        self.verdicts = Verdicts()
        self.rounds = 0
        self.unnoticed = 0  # rounds that lost values with no damage counted
        self.num_missing = 0  # values the damage took (read back as misses)

    def run(self, rounds: int) -> None:
        for _ in range(rounds):
            self.round()

    def round(self) -> None:
        nvme = self.tmp_path / f"damage-{self.rounds}"
        daemon = self.start(*DAMAGE_FLAGS, "--nvme-path", str(nvme))
        with kvstore.connect(daemon.url, namespace="disk", shared_memory=False) as client:
            for i in range(self.num_keys):
                assert client.put(key_of(i), value_of(i, 1, self.rng.choice(self.SIZES)))
        assert daemon.signal(signal.SIGTERM) == 0
        segments = sorted(nvme.glob("seg-*.log"))
        if self.rounds % 2:
            segment = max(segments, key=lambda p: p.stat().st_size)
            os.truncate(segment, self.rng.randrange(segment.stat().st_size))
        else:
            for _ in range(self.flips):
                _flip_bit(self.rng.choice(segments), self.rng)
        daemon = self.start(*DAMAGE_FLAGS, "--nvme-path", str(nvme))
        verdicts = Verdicts()
        with kvstore.connect(daemon.url, namespace="disk", shared_memory=False) as client:
            ids = range(self.num_keys)
            values = client.get_many([key_of(i) for i in ids])
            for i, got in zip(ids, values, strict=True):
                verdicts.judge(i, got, {1, None}, None)
            for i in ids:  # and one by one (get's own path)
                verdicts.judge(i, client.get(key_of(i)), {1, None}, None)
            stats = client.stats()
        daemon.stop()
        noticed = stats["tiers"]["nvme"]["corrupt_records_skipped"] + stats["checksum_failures"]
        self.num_missing += sum(value is None for value in values)
        if None in values and not noticed:
            self.unnoticed += 1
        self.verdicts.add(verdicts)
        self.rounds += 1

    def figures(self) -> dict[str, Any]:
        return {"rounds": self.rounds, **self.verdicts.figures(),
                "missing_after_damage": self.num_missing, "unnoticed_losses": self.unnoticed}


def _flip_bit(segment: Path, rng: random.Random) -> None:
    size = segment.stat().st_size
    if not size:
        return
    offset = rng.randrange(size)
    with open(segment, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ (1 << rng.randrange(8))]))


def rss_bytes(pid: int) -> int:
    """Resident memory of process ``pid`` (VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")

#!/usr/bin/env python3
"""Reliability benchmark of kvstored: the standing suite's checks (tests/reliability) run
long, with their figures as JSON.

    crash       rounds of puts, overwrites, deletes and flushes; SIGKILL at a random moment;
                restart on the same NVMe directory; every key judged (harness.CrashLoop):
                lost (a flushed value missing), stale, foreign (another key's bytes), corrupt
    damage      rounds of bit flips or a segment cut short while the daemon is down, then
                every key read back (harness.DiskDamage): the value or nothing
    fuzz        seeded frames (tests/reliability/fuzz.py) from another process against one
                daemon while a normal client keeps a steady load: internal errors, hangs,
                the daemon's RSS before and after, and the load's ops/s and p99 beside the
                same load on the same daemon with no attack (the limit, in the same run)
                and their ratio

Each load figure is the median of ``--repeats`` quiet/attacked pairs. Prints one JSON
document on stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))  # this checkout's kvstore and its tests' harness

import kvstore  # noqa: E402
from tests.daemon.conftest import DaemonProcess  # noqa: E402
from tests.reliability.harness import (  # noqa: E402
    CrashLoop,
    DiskDamage,
    KiB,
    Verdicts,
    key_of,
    rss_bytes,
    value_of,
)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Daemons:
    """Starts `kvstored` subprocesses in one temporary directory; stops them all."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.started: list[DaemonProcess] = []

    def __call__(self, *flags: str, port: int | None = None) -> DaemonProcess:
        daemon = DaemonProcess(self.tmp, *flags, port=port).start()
        self.started.append(daemon)
        return daemon

    def stop_all(self) -> None:
        for daemon in self.started:
            daemon.stop()


def _load(url: str, seconds: float, seed: int, until: Any = None) -> dict[str, float]:
    """A steady mix of gets and puts of 4-100 KiB over 64 keys, for ``seconds`` or until
    ``until()`` is true; every value read is judged. Returns ops/s, p50 and p99 in ms, and
    wrong reads."""
    rng = random.Random(seed)
    latencies: list[float] = []
    verdicts = Verdicts()
    versions: dict[int, int] = {}
    with kvstore.connect(url, timeout_s=10) as client:
        started = time.monotonic()
        deadline = started + seconds
        while time.monotonic() < deadline and not (until is not None and until()):
            key_id = rng.randrange(64)
            began = time.perf_counter()
            if rng.random() < 0.3 or key_id not in versions:
                versions[key_id] = versions.get(key_id, 0) + 1
                client.put(key_of(key_id), value_of(key_id, versions[key_id],
                                                    rng.choice((4 * KiB, 20 * KiB, 100 * KiB))))
            else:
                got = client.get(key_of(key_id))
                verdicts.judge(key_id, got, {versions[key_id], None}, None)
            latencies.append(time.perf_counter() - began)
        elapsed = time.monotonic() - started
    latencies.sort()
    return {"ops_per_s": len(latencies) / elapsed,
            "p50_ms": latencies[len(latencies) // 2] * 1e3,
            "p99_ms": latencies[int(0.99 * (len(latencies) - 1))] * 1e3,
            "wrong_reads": verdicts.bad}


_ATTACK = """
import json, sys
sys.path.insert(0, {repo!r})
from tests.reliability.fuzz import Fuzzer
report = Fuzzer({port}, seed={seed}, max_value_bytes={max_value}).run({frames})
print(json.dumps({{**report.figures(), "internal": report.internal_errors[:5],
                  "hang_examples": report.hangs[:5]}}))
"""


def fuzz_under_load(daemons: Daemons, tmp: Path, frames: int, load_s: float,
                    repeats: int) -> dict[str, Any]:
    """Quiet load, then the same load while another process fuzzes the daemon; repeated."""
    daemon = daemons("--dram", "64MiB", "--nvme-path", str(tmp / "fuzz-nvme"), "--nvme",
                     "256MiB", "--max-value", "256KiB", "--frame-timeout", "1")
    _load(daemon.url, 1.0, seed=0)  # warm up: connections, slabs
    rss_before = rss_bytes(daemon.proc.pid)
    quiet, attacked, reports = [], [], []
    for r in range(repeats):
        quiet.append(_load(daemon.url, load_s, seed=r))
        script = _ATTACK.format(repo=str(_REPO), port=daemon.port, seed=1000 + r,
                                max_value=256 * KiB, frames=max(1, frames // repeats))
        attacker = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
        attacked.append(_load(daemon.url, 3600.0, seed=100 + r,
                              until=lambda attacker=attacker: attacker.poll() is not None))
        out, err = attacker.communicate(timeout=600)
        if attacker.returncode:
            raise RuntimeError(f"the attacker failed: {err[-2000:]}")
        reports.append(json.loads(out))
        log(f"fuzz repeat {r + 1}/{repeats}: {reports[-1]['frames']} frames, quiet "
            f"{quiet[-1]['ops_per_s']:.0f} ops/s, attacked {attacked[-1]['ops_per_s']:.0f}")
    time.sleep(2.0)  # connections cut short are dropped after the frame timeout
    rss_after = rss_bytes(daemon.proc.pid)
    alive = daemon.proc.poll() is None
    daemon.stop()

    def median(rows: list[dict[str, float]], name: str) -> float:
        return round(statistics.median(row[name] for row in rows), 3)

    ops_quiet, ops_attacked = median(quiet, "ops_per_s"), median(attacked, "ops_per_s")
    p99_quiet, p99_attacked = median(quiet, "p99_ms"), median(attacked, "p99_ms")
    return {
        "frames": sum(r["frames"] for r in reports),
        "internal_errors": sum(r["internal_errors"] for r in reports),
        "hangs": sum(r["hangs"] for r in reports),
        "hang_ups": sum(r["hang_ups"] for r in reports),
        "internal_examples": [e for r in reports for e in r["internal"]],
        "daemon_alive": alive,
        "rss_before_mib": round(rss_before / 2**20, 1),
        "rss_after_mib": round(rss_after / 2**20, 1),
        "load": {
            "ops_per_s": ops_attacked, "quiet_ops_per_s_limit": ops_quiet,
            "ops_ratio": round(ops_attacked / ops_quiet, 3) if ops_quiet else None,
            "p99_ms": p99_attacked, "quiet_p99_ms_limit": p99_quiet,
            "p99_ratio": round(p99_attacked / p99_quiet, 3) if p99_quiet else None,
            "wrong_reads": sum(x["wrong_reads"] for x in quiet + attacked),
            "runs": {"quiet": quiet, "attacked": attacked},
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30, help="SIGKILL rounds (default 30)")
    parser.add_argument("--damage-rounds", type=int, default=10,
                        help="disk damage rounds (default 10)")
    parser.add_argument("--frames", type=int, default=12_000,
                        help="fuzzed frames in all (default 12,000)")
    parser.add_argument("--load-s", type=float, default=3.0,
                        help="seconds of each quiet load measurement (default 3)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="quiet/attacked load pairs (default 3)")
    parser.add_argument("--skip", action="append", default=[],
                        choices=["crash", "damage", "fuzz"], help="leave a part out")
    args = parser.parse_args(argv)
    result: dict[str, Any] = {"benchmark": "reliability", "started": time.strftime("%F %T")}
    with tempfile.TemporaryDirectory(prefix="kvstore-reliability-") as name:
        tmp = Path(name)
        daemons = Daemons(tmp)
        try:
            if "crash" not in args.skip:
                log(f"crash: {args.rounds} SIGKILL rounds")
                loop = CrashLoop(tmp / "crash", start=daemons, seed=2026)
                started = time.monotonic()
                loop.run(args.rounds)
                result["crash"] = {**loop.figures(),
                                   "seconds": round(time.monotonic() - started, 1),
                                   "examples": loop.verdicts.examples}
                daemons.stop_all()
            if "damage" not in args.skip:
                log(f"damage: {args.damage_rounds} rounds")
                damage = DiskDamage(tmp / "damage", start=daemons, seed=2026)
                damage.run(args.damage_rounds)
                result["damage"] = {**damage.figures(), "examples": damage.verdicts.examples}
                daemons.stop_all()
            if "fuzz" not in args.skip:
                log(f"fuzz: {args.frames} frames under load")
                result["fuzz"] = fuzz_under_load(daemons, tmp, args.frames, args.load_s,
                                                 args.repeats)
        finally:
            daemons.stop_all()
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())

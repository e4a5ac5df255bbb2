#!/usr/bin/env python3
"""Daemon benchmark of kvstore: each client path of `kvstored` beside the embedded Store and
beside the raw limit, all measured in the same run.

    path         how values move                                      started here
    embedded     kvstore.Store in this process                        Store(StoreConfig)
    shm          kvstore.connect(url): same-host client; values copied a real `python -m
                 straight into / out of the daemon's /dev/shm pool     daemon` subprocess
                 (reserve -> copy -> commit, pin -> copy -> unpin)     on a free port
    tcp          kvstore.connect(url, shared_memory=False): values     the same daemon
                 streamed in the frames over a loopback socket
    ucx          kvstore.connect(ucx_url, shared_memory=False): the    the same daemon, with
                 same frames as UCX tag messages through ucxx; UCX     --ucx 127.0.0.1:0
                 picks the transport (UCX_PROTO_INFO=y in the          (the port is logged)
                 daemon's environment prints its choice: tcp over
                 lo on the VM this was written on)
                 Where ucxx is not importable or the listener does not start, the other paths
                 still run and ``ucx`` says why: {"available": false, "reason": ...}

    raw limit    memcpy_chunked: np.copyto of each value into its own place in a page-aligned
                 array (what put and get_into must do at least); memcpy_reused_dst: each value
                 into one reused buffer (the limit of `get`, whose dropped bytes object malloc
                 recycles); raw_tcp / raw_ucx (benchmarks/raw_links.py): each value sent
                 whole to another process over loopback TCP / UCX and answered by one byte
                 (the limit of a network put, one synchronous request per value:
                 put_vs_raw_tcp of tcp and ucx, put_vs_raw_ucx of ucx), and the same with
                 1 byte (raw_tcp_ping_us / raw_ucx_ping_us: the limit of a round trip);
                 batch floor: a Python dict + np.copyto per 4 KiB op

Per value size (256 KiB, 4 MiB): put, get, get_into in GB/s and ops/s. Per path: 4 KiB
put_many / get_many ops/s in chains of 64 keys. Every repeat runs every path in turn (the
machine's noise lands on all of them alike); a figure is the median over repeats and a ratio
the median of the per-run ratios (path / embedded, path / raw). The first repeat reads every
value back and compares the bytes (``verified``). Prints one JSON document on stdout; progress
goes to stderr. GB/s is 1e9 bytes/s.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import os
import pstats
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

_HERE = Path(__file__).resolve().parent
_REPO = _HERE.parent
for _path in (_REPO, _HERE):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))  # this checkout's kvstore and store_bench's helpers

from raw_links import Sink, TcpSink, UcxSink  # noqa: E402
from store_bench import (  # noqa: E402
    aligned,
    chain_keys,
    dram_pool_bytes,
    emit,
    gbps,
    log,
    machine_info,
    profile_top,
    size_label,
    slices,
    summarize,
    timed,
)

import kvstore  # noqa: E402
from kvstore.units import parse_size  # noqa: E402

KiB, MiB = 1 << 10, 1 << 20
MAX_VALUE_BYTES = 16 * MiB
SHM_TARGET_RATIO = 0.80  # shared-memory path / embedded, for 4 MiB values (the target)
SHM_TARGET_VALUE_BYTES = 4 * MiB
BATCH_VALUE_BYTES = 4 * KiB
BATCH_CHAIN_LEN = 64
PATHS = ("embedded", "shm", "tcp", "ucx")
NETWORK_PATHS = ("tcp", "ucx")  # values cross a socket: their put has the raw TCP limit too
UCX_LISTEN = "127.0.0.1:0"  # ucxx's listener takes port 0 as the kernel's pick, as TCP does
_deque = collections.deque


# -- the daemon --------------------------------------------------------------------------------


class DaemonStartError(RuntimeError):
    """kvstored exited, or logged no address in time: ``what`` happened, and ``last_line``,
    its log's last line (an exception's, where it failed)."""

    def __init__(self, what: str, log_text: str) -> None:
        super().__init__(f"{what}: {log_text[-2000:]}")
        self.what = what
        lines = [line for line in log_text.splitlines() if line.strip()]
        self.last_line = lines[-1].strip() if lines else "(empty log)"


class DaemonProcess:
    """`python -m daemon` on 127.0.0.1, port 0 (the kernel picks a free one; read from the
    log); with ``ucx`` also a UCX listener on `UCX_LISTEN` (``ucx_url``, read from the log the
    same way). With ``profile_path`` it runs under cProfile (its event-loop thread), written
    at SIGTERM, which the daemon answers by draining and exiting 0."""

    def __init__(self, dram_bytes: int, max_value_bytes: int = MAX_VALUE_BYTES,
                 profile_path: str | None = None, ucx: bool = False,
                 extra: Sequence[str] = ()) -> None:
        self.log_file = tempfile.NamedTemporaryFile(  # noqa: SIM115 (closed in stop)
            prefix="kvstored-bench-", suffix=".log", delete=False)
        cmd = [sys.executable]
        if profile_path:
            cmd += ["-m", "cProfile", "-o", profile_path]
        cmd += ["-m", "daemon", "--listen", "127.0.0.1:0", "--dram", str(dram_bytes),
                "--max-value", str(max_value_bytes), "--hbm", "0", "--log-level", "INFO",
                *(["--ucx", UCX_LISTEN] if ucx else []), *extra]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(_REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
        self.command = cmd
        self.process = subprocess.Popen(cmd, stdout=self.log_file, stderr=subprocess.STDOUT,
                                        cwd=str(_REPO), env=env)
        self.url = "kvstore://" + self._wait_for_address(_TCP_LINE, 60.0)
        self.ucx_url = ("kvstore+ucx://" + self._wait_for_address(_UCX_LINE, 60.0)
                        if ucx else None)
        self.ucx_error: str | None = None  # why a UCX listener was wanted but is not there

    def _wait_for_address(self, line: re.Pattern[str], timeout_s: float) -> str:
        """HOST:PORT from the first log line ``line`` matches; the daemon is stopped and
        DaemonStartError raised if it exits or times out first."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = Path(self.log_file.name).read_text(errors="replace")
            match = line.search(text)
            if match:
                return match.group(1)
            if self.process.poll() is not None:
                self.stop()
                raise DaemonStartError(f"kvstored exited with {self.process.returncode}", text)
            time.sleep(0.05)
        text = self.log_tail()
        self.stop()
        raise DaemonStartError(f"kvstored did not log {line.pattern!r} within {timeout_s:g} s",
                               text)

    def log_tail(self, nbytes: int = 2000) -> str:
        return Path(self.log_file.name).read_text(errors="replace")[-nbytes:]

    def stop(self) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log_file.close()
        with contextlib.suppress(OSError):
            os.unlink(self.log_file.name)
        return self.process.returncode


_TCP_LINE = re.compile(r"kvstored listening on ([\d.]+:\d+)")
_UCX_LINE = re.compile(r"kvstored serving UCX on ([\d.]+:\d+)")


@contextlib.contextmanager
def running_daemon(dram_bytes: int, profile_path: str | None = None,
                   ucx: bool = False) -> Iterator[DaemonProcess]:
    """The benchmark's daemon; with ``ucx``, serving UCX too where its listener starts, and
    where it does not, the daemon without one, ``ucx_error`` saying why (the other paths
    still run)."""
    ucx_error = None
    if ucx:
        try:
            daemon = DaemonProcess(dram_bytes, profile_path=profile_path, ucx=True)
        except DaemonStartError as e:
            log(f"kvstored --ucx {UCX_LISTEN} did not start; again without UCX. {e}")
            ucx_error = (f"kvstored --ucx {UCX_LISTEN} did not start its UCX listener "
                         f"({e.what}): {e.last_line}")
    if not ucx or ucx_error is not None:
        daemon = DaemonProcess(dram_bytes, profile_path=profile_path)
        daemon.ucx_error = ucx_error
    try:
        yield daemon
    finally:
        code = daemon.stop()
        if code not in (0, None):
            log(f"kvstored exited with {code}")


def ucxx_missing() -> str | None:
    """Why this process cannot use ucxx; None when it can."""
    try:
        import ucxx  # noqa: F401
    except Exception as e:  # ImportError, or a broken native library
        return f"ucxx is not importable here ({type(e).__name__}: {e})"
    return None


def connect_ucx(daemon: DaemonProcess, missing: str | None) -> tuple[Any | None, dict[str, Any]]:
    """The ucx path's client (None when there is none) and the document's ``ucx`` entry:
    what was measured, or the reason nothing was."""
    reason = missing or daemon.ucx_error
    if reason is None:
        assert daemon.ucx_url is not None, "a daemon with no UCX error has a UCX listener"
        try:
            client = kvstore.connect(daemon.ucx_url, shared_memory=False)
        except Exception as e:  # StoreConnectionError, or ucxx failing to start here
            reason = f"cannot connect to {daemon.ucx_url}: {type(e).__name__}: {e}"
        else:
            import ucxx

            return client, {"available": True, "url": daemon.ucx_url,
                            "ucxx": getattr(ucxx, "__version__", None),
                            "ucx": ".".join(map(str, ucxx.get_ucx_version()))}
    log(f"no ucx path: {reason}")
    return None, {"available": False, "reason": reason}


def pool_mapped(client: Any) -> bool:
    """Whether the client's connection mapped the daemon's DRAM pool (the shm data plane)."""
    conn = client._acquire()
    try:
        return conn.session.pool is not None
    finally:
        client._release(conn)


def profile_summary(path: str, top: int = 15) -> list[dict[str, Any]]:
    """The functions with the most own time in a cProfile output file."""
    table = pstats.Stats(path).stats  # type: ignore[attr-defined]
    total_s = sum(row[2] for row in table.values()) or 1.0
    rows = sorted(table.items(), key=lambda item: item[1][2], reverse=True)
    return [{"function": f"{Path(file).name}:{line}({func})" if line else func,
             "calls": calls, "own_s": own_s, "cum_s": cum_s, "own_share": own_s / total_s}
            for (file, line, func), (_, calls, own_s, cum_s, _) in rows[:top]]


# -- one path: the same operations on a Store or a Client ---------------------------------------


class Ops:
    """put / get / get_into of every value, and 4 KiB put_many / get_many, on one path."""

    def __init__(self, store: Any, keys: list[bytes], values: list[np.ndarray],
                 outs: list[np.ndarray], chains: list[tuple[list[bytes], list[np.ndarray]]]):
        self.store, self.keys, self.values, self.outs, self.chains = (
            store, keys, values, outs, chains)

    def put_all(self) -> int:
        return sum(map(self.store.put, self.keys, self.values))

    def get_all(self) -> int:
        return sum(1 for value in map(self.store.get, self.keys) if value is not None)

    def get_into_all(self) -> int:
        return sum(map(self.store.get_into, self.keys, self.outs))

    def delete_all(self) -> None:
        _deque(map(self.store.delete, self.keys), maxlen=0)

    def verify_get(self) -> bool:
        for key, value in zip(self.keys, self.values, strict=True):
            got = self.store.get(key)
            if got is None or not np.array_equal(np.frombuffer(got, np.uint8), value):
                return False
        return True

    def put_many_all(self) -> int:
        return sum(self.store.put_many(chain, chain_values) for chain, chain_values in self.chains)

    def get_many_all(self) -> int:
        return sum(sum(v is not None for v in self.store.get_many(chain))
                   for chain, _ in self.chains)

    def verify_get_many(self) -> bool:
        for chain, chain_values in self.chains:
            for got, value in zip(self.store.get_many(chain), chain_values, strict=True):
                if got is None or not np.array_equal(np.frombuffer(got, np.uint8), value):
                    return False
        return True

    def delete_batch(self) -> None:
        _deque(map(self.store.delete, (k for chain, _ in self.chains for k in chain)),
               maxlen=0)


def bench_values(paths: dict[str, Any], sinks: dict[str, Sink], data: np.ndarray,
                 value_bytes: int, total_bytes: int, repeats: int,
                 profile: bool) -> dict[str, Any]:
    num_values = max(1, total_bytes // value_bytes)
    nbytes = num_values * value_bytes
    values = slices(data, value_bytes, num_values)
    src = data[:nbytes]
    out = aligned(nbytes)
    outs = slices(out, value_bytes, num_values)
    reused = [aligned(value_bytes)] * num_values
    keys = chain_keys(num_values, "bench-daemon", seed=value_bytes)
    ops = {name: Ops(store, keys, values, outs, []) for name, store in paths.items()}
    result: dict[str, Any] = {"value_bytes": value_bytes, "num_values": num_values,
                              "total_bytes": nbytes}
    for name, o in ops.items():  # fault in pages (the pools', the sockets') before timing
        if o.put_all() != num_values:
            raise RuntimeError(f"{name}: warm-up put kept fewer than {num_values} values")
        o.get_into_all()
        o.delete_all()
    for sink in sinks.values():
        sink.send_all(values)
    runs = []
    verified: dict[str, bool] = {}
    for repeat in range(repeats):
        memcpy_s, _ = timed(lambda: _deque(map(np.copyto, outs, values), maxlen=0))
        memcpy_reused_s, _ = timed(lambda: _deque(map(np.copyto, reused, values), maxlen=0))
        run: dict[str, Any] = {"memcpy_chunked_gbps": gbps(nbytes, memcpy_s),
                               "memcpy_reused_dst_gbps": gbps(nbytes, memcpy_reused_s)}
        for link, sink in sinks.items():
            link_s, _ = timed(lambda sink=sink: sink.send_all(values))
            run[f"raw_{link}_gbps"] = gbps(nbytes, link_s)
        for name, o in ops.items():
            put_s, stored = timed(o.put_all)
            if repeat == 0:
                out.fill(0)
            get_into_s, hits_into = timed(o.get_into_all)
            if repeat == 0:
                verified[f"{name}_get_into"] = bool(np.array_equal(out, src))
            get_s, hits = timed(o.get_all)
            if repeat == 0:
                verified[f"{name}_get"] = o.verify_get()
            if not stored == hits_into == hits == num_values:
                raise RuntimeError(f"{name} run {repeat}: stored {stored}, get_into hits "
                                   f"{hits_into}, get hits {hits} of {num_values}")
            o.delete_all()
            for op, seconds in (("put", put_s), ("get", get_s), ("get_into", get_into_s)):
                run[f"{name}_{op}_gbps"] = gbps(nbytes, seconds)
                run[f"{name}_{op}_ops_per_s"] = num_values / seconds
        for name in ops:
            for op in ("put", "get", "get_into"):
                gb = run[f"{name}_{op}_gbps"]
                raw = run["memcpy_reused_dst_gbps" if op == "get" else "memcpy_chunked_gbps"]
                run[f"{name}_{op}_vs_raw"] = gb / raw
                if name != "embedded":
                    run[f"{name}_{op}_vs_embedded"] = gb / run[f"embedded_{op}_gbps"]
            for link in sinks:
                if name in NETWORK_PATHS and link in ("tcp", name):
                    run[f"{name}_put_vs_raw_{link}"] = (run[f"{name}_put_gbps"]
                                                        / run[f"raw_{link}_gbps"])
        runs.append(run)
        log(f"  {size_label(value_bytes)} run {repeat}: " + ", ".join(
            f"{name} put/get/get_into {run[f'{name}_put_gbps']:.2f}/"
            f"{run[f'{name}_get_gbps']:.2f}/{run[f'{name}_get_into_gbps']:.2f}"
            for name in ops) + f" GB/s; memcpy {run['memcpy_chunked_gbps']:.2f}" + "".join(
            f", raw {link} {run[f'raw_{link}_gbps']:.2f}" for link in sinks))
    summary = summarize(runs)
    result["raw"] = {k: summary[k] for k in ("memcpy_chunked_gbps", "memcpy_reused_dst_gbps",
                                             *(f"raw_{link}_gbps" for link in sinks))}
    for name in ops:
        entry = {k[len(name) + 1:]: v for k, v in summary.items() if k.startswith(name + "_")}
        entry["verified"] = verified[f"{name}_get"] and verified[f"{name}_get_into"]
        result[name] = entry
    if profile:
        result["profile"] = {}
        for name, o in ops.items():
            o.put_all()
            o.delete_all()
            phases = {"put": o.put_all, "get_into": o.get_into_all, "get": o.get_all}
            result["profile"][name] = {op: profile_top(fn) for op, fn in phases.items()}
            o.delete_all()
    result["runs"] = runs
    return result


def bench_batch(paths: dict[str, Any], data: np.ndarray, num_chains: int, repeats: int,
                profile: bool) -> dict[str, Any]:
    value_bytes, chain_len = BATCH_VALUE_BYTES, BATCH_CHAIN_LEN
    num_ops = num_chains * chain_len
    values = slices(data, value_bytes, num_ops)
    rng = np.random.default_rng(value_bytes)
    chains = []
    for c in range(num_chains):
        tokens = rng.integers(0, 128_256, chain_len * 16, dtype=np.uint32)
        chain = kvstore.prefix_hashes(tokens, block_tokens=16, namespace="bench-daemon-batch")
        chains.append((chain, values[c * chain_len:(c + 1) * chain_len]))
    ops = {name: Ops(store, [], [], [], chains) for name, store in paths.items()}
    pool = aligned(num_ops * value_bytes)

    def floor_put() -> dict[bytes, int]:
        table: dict[bytes, int] = {}
        offset = 0
        for chain, chain_values in chains:
            for key, value in zip(chain, chain_values, strict=True):
                np.copyto(pool[offset:offset + value_bytes], value)
                table[key] = offset
                offset += value_bytes
        return table

    def floor_get(table: dict[bytes, int]) -> int:
        return sum(len([pool[o:o + value_bytes].tobytes() for o in map(table.__getitem__, chain)])
                   for chain, _ in chains)

    for o in ops.values():
        o.put_many_all()
        o.delete_batch()
    runs, verified = [], {}
    for repeat in range(repeats):
        floor_put_s, table = timed(floor_put)
        floor_get_s, _ = timed(lambda table=table: floor_get(table))
        run: dict[str, Any] = {"floor_put_ops_per_s": num_ops / floor_put_s,
                               "floor_get_ops_per_s": num_ops / floor_get_s}
        for name, o in ops.items():
            put_s, stored = timed(o.put_many_all)
            get_s, hits = timed(o.get_many_all)
            if repeat == 0:
                verified[name] = o.verify_get_many()
            if not stored == hits == num_ops:
                raise RuntimeError(f"batch {name} run {repeat}: stored {stored}, hits {hits} "
                                   f"of {num_ops}")
            o.delete_batch()
            run[f"{name}_put_many_ops_per_s"] = num_ops / put_s
            run[f"{name}_get_many_ops_per_s"] = num_ops / get_s
        for name in ops:
            for op, floor in (("put_many", "floor_put"), ("get_many", "floor_get")):
                run[f"{name}_{op}_vs_raw"] = (run[f"{name}_{op}_ops_per_s"]
                                              / run[f"{floor}_ops_per_s"])
                if name != "embedded":
                    run[f"{name}_{op}_vs_embedded"] = (run[f"{name}_{op}_ops_per_s"]
                                                       / run[f"embedded_{op}_ops_per_s"])
        runs.append(run)
        log(f"  batch 4KiB run {repeat}: " + ", ".join(
            f"{name} put_many/get_many {run[f'{name}_put_many_ops_per_s']:.0f}/"
            f"{run[f'{name}_get_many_ops_per_s']:.0f}" for name in ops) + " ops/s")
    summary = summarize(runs)
    result: dict[str, Any] = {"value_bytes": value_bytes, "chain_len": chain_len,
                              "num_chains": num_chains, "num_ops": num_ops,
                              "raw": {k: summary[k] for k in ("floor_put_ops_per_s",
                                                              "floor_get_ops_per_s")}}
    for name in ops:
        entry = {k[len(name) + 1:]: v for k, v in summary.items() if k.startswith(name + "_")}
        entry["verified"] = verified[name]
        result[name] = entry
    if profile:
        result["profile"] = {}
        for name, o in ops.items():
            o.put_many_all()
            o.delete_batch()
            result["profile"][name] = {"put_many": profile_top(o.put_many_all),
                                       "get_many": profile_top(o.get_many_all)}
            o.delete_batch()
    result["runs"] = runs
    return result


def bench_round_trip(paths: dict[str, Any], sinks: dict[str, Sink], calls: int,
                     repeats: int) -> dict[str, Any]:
    """Microseconds per `contains` of an absent key: one request and its answer, no data (one
    executor hop in the daemon). A shm put or get costs two of these plus its copy. Raw
    limit: a 1-byte request answered by 1 byte from a plain blocking Python socket loop in
    another process (raw_tcp_ping_us), and the same over UCX (raw_ucx_ping_us:
    ucx_vs_raw_ucx)."""
    key = b"\xff" * 16
    runs = []
    for sink in sinks.values():
        sink.ping_us(100)
    for _ in range(repeats):
        run = {f"raw_{link}_ping_us": sink.ping_us(calls) for link, sink in sinks.items()}
        _run_contains(paths, key, calls, run)
        for name in paths:
            if name != "embedded":
                run[f"{name}_vs_raw"] = run[f"{name}_us"] / run["raw_tcp_ping_us"]
            if name in sinks and name != "tcp":
                run[f"{name}_vs_raw_{name}"] = run[f"{name}_us"] / run[f"raw_{name}_ping_us"]
        runs.append(run)
    return {"op": "contains(absent key)", "calls": calls,
            "vs_raw": "path latency / raw ping latency (higher is slower)",
            **summarize(runs), "runs": runs}


def _run_contains(paths: dict[str, Any], key: bytes, calls: int, run: dict[str, Any]) -> None:
    for name, store in paths.items():
        seconds, found = timed(lambda store=store: sum(store.contains(key)
                                                       for _ in range(calls)))
        if found:
            raise RuntimeError(f"{name}: the absent key was found")
        run[f"{name}_us"] = seconds / calls * 1e6


# -- main ---------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="kvstored benchmark: put/get/get_into GB/s and ops/s through the embedded "
                    "Store, a same-host shared-memory client, a TCP client and a UCX client "
                    "(where ucxx is installed) of a real daemon subprocess, beside memcpy and "
                    "raw loopback TCP; prints one JSON document.")
    parser.add_argument("--sizes", default="256KiB,4MiB",
                        help="value sizes (default: %(default)s)")
    parser.add_argument("--total-bytes", default=None,
                        help="bytes per size per path per run (default: 256MiB; quick: 16MiB)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="runs per figure; the median is reported (default: 5, quick: 2)")
    parser.add_argument("--batch-chains", type=int, default=None,
                        help="chains of 64 4-KiB keys per batch run (default: 128, quick: 16)")
    parser.add_argument("--quick", action="store_true", help="small totals and 2 repeats")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one extra (untimed) pass of each op per path in "
                             "this process, and run the daemon under cProfile (its event "
                             "loop thread; the figures then include that overhead)")
    parser.add_argument("--json-out", default=None, help="also write the JSON to this file")
    args = parser.parse_args(argv)
    args.sizes = [parse_size(s.strip(), what="--sizes") for s in args.sizes.split(",")
                  if s.strip()]
    if args.repeats is None:
        args.repeats = 2 if args.quick else 5
    if args.total_bytes is None:
        args.total_bytes = 16 * MiB if args.quick else 256 * MiB
    else:
        args.total_bytes = parse_size(args.total_bytes, what="--total-bytes")
    if args.batch_chains is None:
        args.batch_chains = 16 if args.quick else 128
    if args.repeats < 1 or not args.sizes or min(args.sizes) <= 0 or args.batch_chains < 1:
        parser.error("--repeats, --batch-chains and every size must be positive")
    if max(args.sizes) > MAX_VALUE_BYTES:
        parser.error(f"sizes above {size_label(MAX_VALUE_BYTES)} are not supported")
    return args


def keep_stdout_for_json() -> None:
    """From here on what native code writes on file descriptor 1 goes to stderr (UCX logs its
    warnings on stdout, and the ucxx in use sets a variable this UCX warns it does not know),
    while Python's sys.stdout keeps the real stdout: it carries the JSON document only."""
    sys.stdout.flush()
    sys.stdout = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    keep_stdout_for_json()
    started_s = time.perf_counter()
    totals = {s: max(s, args.total_bytes) for s in args.sizes}
    num_batch = args.batch_chains * BATCH_CHAIN_LEN
    # One DRAM size for the embedded Store and the daemon: room for every section at once.
    dram_bytes = (sum(dram_pool_bytes(s, t // s, MAX_VALUE_BYTES) for s, t in totals.items())
                  + dram_pool_bytes(BATCH_VALUE_BYTES, num_batch, MAX_VALUE_BYTES))
    doc: dict[str, Any] = {
        "benchmark": "kvstore/benchmarks/daemon_bench.py",
        "units": {"gbps": "1e9 bytes per second", "figures": "median over runs",
                  "vs_embedded": "path / embedded Store, median of per-run ratios",
                  "vs_raw": "path / raw limit, median of per-run ratios"},
        "paths": {
            "embedded": "kvstore.Store in the benchmark process",
            "shm": "kvstore.connect(url): maps the daemon's /dev/shm DRAM pool; put = copy "
                   "into a spare slot -> commit (one round trip), get = look up the shared "
                   "directory -> copy -> check (none; pin -> copy -> unpin when not listed)",
            "tcp": "kvstore.connect(url, shared_memory=False): values in the frames over "
                   "loopback TCP",
            "ucx": "kvstore.connect(ucx_url, shared_memory=False) to the same daemon started "
                   f"with --ucx {UCX_LISTEN}: the same frames as UCX tag messages through "
                   "ucxx, over the transport UCX picks (UCX_PROTO_INFO=y prints it; tcp "
                   "over lo on the VM this was written on); measured only where "
                   "ucx.available",
        },
        "raw_limits": {
            "memcpy_chunked": "np.copyto of each value into its own place in a page-aligned "
                              "array (limit of put and get_into)",
            "memcpy_reused_dst": "np.copyto of each value into one reused buffer (limit of "
                                 "get, whose dropped bytes object malloc recycles)",
            "raw_tcp": "each value sent whole (length prefix + sendall) over loopback TCP to "
                       "a plain Python socket loop in another process that reads it into a "
                       "reused buffer and answers one byte: the limit of one synchronous "
                       "network put per value (raw_tcp_gbps; put_vs_raw_tcp of tcp and ucx); "
                       "with 1-byte values, the limit of a round trip (raw_tcp_ping_us)",
            "raw_ucx": "the same over UCX, where the ucx path is measured: each value one "
                       "ucxx send_multi to a ucxx listener in another process, set up as "
                       "kvstored sets it up, answered by a 1-byte message; driven from the "
                       "client's UCX loop (raw_ucx_gbps: put_vs_raw_ucx of ucx; "
                       "raw_ucx_ping_us: round_trip ucx_vs_raw_ucx)",
            "batch floor": "a Python dict + np.copyto per 4 KiB op",
        },
        "config": {"sizes": [size_label(s) for s in args.sizes], "repeats": args.repeats,
                   "quick": args.quick, "total_bytes": {size_label(s): t
                                                        for s, t in totals.items()},
                   "batch_ops": num_batch, "dram_bytes": dram_bytes,
                   "max_value_bytes": MAX_VALUE_BYTES, "profile": args.profile,
                   "client": "one synchronous client, one call at a time"},
        "machine": machine_info(None),
    }
    log(f"generating {size_label(max(totals.values()))} of random values")
    data = aligned(max([*totals.values(), num_batch * BATCH_VALUE_BYTES]))
    data[:] = np.random.default_rng(0).integers(0, 256, data.shape[0], dtype=np.uint8)
    profile_dir = tempfile.mkdtemp(prefix="kvstored-profile-") if args.profile else None
    profile_path = os.path.join(profile_dir, "daemon.prof") if profile_dir else None
    config = kvstore.StoreConfig(dram_bytes=dram_bytes, max_value_bytes=MAX_VALUE_BYTES,
                                 hbm_bytes=0)
    missing = ucxx_missing()
    with (kvstore.Store(config) as embedded,
          running_daemon(dram_bytes, profile_path, ucx=missing is None) as daemon,
          TcpSink(max(args.sizes)) as tcp_sink):
        log(f"kvstored at {daemon.url}" + (f" and {daemon.ucx_url}" if daemon.ucx_url else "")
            + f" (dram {size_label(dram_bytes)})")
        doc["daemon"] = {"url": daemon.url, "ucx_url": daemon.ucx_url,
                         "command": daemon.command}
        shm = kvstore.connect(daemon.url)
        tcp = kvstore.connect(daemon.url, shared_memory=False)
        ucx, doc["ucx"] = connect_ucx(daemon, missing)
        sinks: dict[str, Sink] = {"tcp": tcp_sink}
        try:
            if ucx is not None:
                try:
                    sinks["ucx"] = UcxSink()
                except Exception as e:  # the ucx path is measured all the same, without it
                    doc["ucx"]["raw_ucx_error"] = f"{type(e).__name__}: {e}"
                    log(f"no raw UCX limit: {doc['ucx']['raw_ucx_error']}")
            shm_mapped, tcp_mapped = pool_mapped(shm), pool_mapped(tcp)
            ucx_mapped = ucx is not None and pool_mapped(ucx)
            if not shm_mapped or tcp_mapped or ucx_mapped:
                raise RuntimeError(f"the shm client mapped the pool: {shm_mapped}; the tcp "
                                   f"client: {tcp_mapped}; the ucx client: {ucx_mapped} "
                                   "(expected True, False, False)")
            doc["daemon"]["shm_client_mapped_pool"] = shm_mapped
            paths = {"embedded": embedded, "shm": shm, "tcp": tcp,
                     **({"ucx": ucx} if ucx is not None else {})}
            doc["values"] = {}
            for value_bytes in args.sizes:
                log(f"values {size_label(value_bytes)} x {args.repeats}")
                doc["values"][size_label(value_bytes)] = bench_values(
                    paths, sinks, data, value_bytes, totals[value_bytes], args.repeats,
                    args.profile)
                gc.collect()
            log(f"round trip x {args.repeats}")
            doc["round_trip_us"] = bench_round_trip(paths, sinks, 300 if args.quick else 2000,
                                                    args.repeats)
            log(f"batch 4KiB x {args.repeats}")
            doc["batch_4KiB"] = bench_batch(paths, data, args.batch_chains, args.repeats,
                                            args.profile)
        finally:
            if "ucx" in sinks:
                sinks["ucx"].close()
            for client in (shm, tcp, ucx):
                if client is not None:
                    client.close()
    if profile_path and os.path.exists(profile_path):
        doc["daemon_profile"] = {"note": "cProfile of the daemon's main (event loop) thread "
                                         "over the whole run; Store calls run in worker "
                                         "threads, not profiled",
                                 "top": profile_summary(profile_path)}
    label = size_label(SHM_TARGET_VALUE_BYTES)
    entry = doc["values"].get(label)
    doc["target"] = {
        "ratio": SHM_TARGET_RATIO,
        "what": f"shm path / embedded for {label} values (put, get, get_into)",
        "applies": entry is not None,
        "met": (all(entry["shm"][f"{op}_vs_embedded"] >= SHM_TARGET_RATIO
                    for op in ("put", "get", "get_into")) if entry else None),
        "per_op": ({op: {"ratio": entry["shm"][f"{op}_vs_embedded"],
                         "met": entry["shm"][f"{op}_vs_embedded"] >= SHM_TARGET_RATIO}
                    for op in ("put", "get", "get_into")} if entry else None),
    }
    emit(doc, started_s, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

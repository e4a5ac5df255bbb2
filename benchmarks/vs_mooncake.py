#!/usr/bin/env python3
"""kvstore beside Mooncake Store on the same machine: one store process and one client
process each, the same value sizes, counts and capacity, put / get / get_into over TCP.

    kvstore   store process: `python -m daemon` (kvstored), DRAM tier of DRAM bytes
              client: this process, kvstore.connect(url, shared_memory=False) (tcp);
              also kvstore.connect(url) (shm: the same-host shared-memory data plane)
    Mooncake  mooncake_master (metadata: its own HTTP metadata server) on 127.0.0.1;
              store process: MooncakeDistributedStore.setup(protocol="tcp",
              global_segment_size=DRAM bytes) that only holds its segment;
              client process: MooncakeDistributedStore with no segment of its own
              (global_segment_size=0), so every value crosses TCP to the store process

Mooncake's ops: put(key, numpy view) and get(key) -> bytes like kvstore's; put_from /
get_into on buffers registered with register_buffer (its zero-copy path), compared with
kvstore's put and get_into. Raw limits measured in the same run: memcpy of the same bytes in
value-sized pieces, and a loopback TCP stream of the same pieces to another process, each
piece answered by one byte (one synchronous request per value, nothing else).

Every repeat runs kvstore then Mooncake (the machine's noise lands on both); figures are
medians over repeats, ratios medians of per-run ratios. The first repeat checks the bytes
read back. Prints one JSON document; if Mooncake cannot run, "mooncake" says exactly why
and the kvstore half is still reported (exit 0). Needs, as a benchmark peer only (not a
project dependency): pip install mooncake-transfer-engine-non-cuda; apt-get install
libibverbs1.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

_HERE = Path(__file__).resolve().parent
_REPO = _HERE.parent
for _path in (_REPO, _HERE):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from daemon_bench import MAX_VALUE_BYTES, DaemonProcess, TcpSink, pool_mapped  # noqa: E402
from store_bench import (  # noqa: E402
    aligned,
    dram_pool_bytes,
    emit,
    gbps,
    log,
    machine_info,
    quit_worker,
    size_label,
    slices,
    summarize,
    timed,
)

import kvstore  # noqa: E402
from kvstore.units import parse_size  # noqa: E402

KiB, MiB = 1 << 10, 1 << 20
OPS = ("put", "get", "get_into")
MOONCAKE_LOCAL_BUFFER_BYTES = 64 * MiB  # the client's staging buffer (put/get of bytes)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def values_of(data: np.ndarray, value_bytes: int, total_bytes: int) -> list[np.ndarray]:
    return slices(data, value_bytes, max(1, total_bytes // value_bytes))


def make_data(nbytes: int) -> np.ndarray:
    data = aligned(nbytes)
    data[:] = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)
    return data


# -- raw limits --------------------------------------------------------------------------------

def raw_run(values: list[np.ndarray], outs: list[np.ndarray], sink: TcpSink) -> dict[str, float]:
    nbytes = sum(v.nbytes for v in values)
    memcpy_s, _ = timed(lambda: list(map(np.copyto, outs, values)))
    tcp_s, _ = timed(lambda: sink.send_all(values))
    return {"memcpy_chunked_gbps": gbps(nbytes, memcpy_s), "tcp_loopback_gbps": gbps(nbytes, tcp_s)}


# -- kvstore -------------------------------------------------------------------------------------


def kvstore_run(client: Any, keys: list[bytes], values: list[np.ndarray],
                outs: list[np.ndarray], out: np.ndarray, verify: bool) -> dict[str, Any]:
    nbytes = sum(v.nbytes for v in values)
    put_s, stored = timed(lambda: sum(map(client.put, keys, values)))
    if verify:
        out.fill(0)
    get_into_s, hits_into = timed(lambda: sum(map(client.get_into, keys, outs)))
    run: dict[str, Any] = {}
    if verify:
        run["verified"] = bool(np.array_equal(out, np.concatenate(values))) and all(
            np.array_equal(np.frombuffer(client.get(k) or b"", np.uint8), v)
            for k, v in zip(keys, values, strict=True))
    get_s, hits = timed(lambda: sum(1 for v in map(client.get, keys) if v is not None))
    for key in keys:
        client.delete(key)
    if not stored == hits_into == hits == len(keys):
        raise RuntimeError(f"kvstore: stored {stored}, get_into hits {hits_into}, get hits "
                           f"{hits} of {len(keys)}")
    for op, seconds in (("put", put_s), ("get", get_s), ("get_into", get_into_s)):
        run[f"{op}_gbps"] = gbps(nbytes, seconds)
        run[f"{op}_ops_per_s"] = len(keys) / seconds
    return run


# -- Mooncake ------------------------------------------------------------------------------------


def find_mooncake_master() -> str | None:
    for candidate in (shutil.which("mooncake_master"),
                      str(Path(sys.executable).parent / "mooncake_master")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    try:
        import mooncake
        candidate = str(Path(mooncake.__file__).parent / "mooncake_master")
        return candidate if os.access(candidate, os.X_OK) else None
    except Exception:
        return None


_MOONCAKE_STORE = textwrap.dedent("""
    import sys, time
    from mooncake.store import MooncakeDistributedStore
    store = MooncakeDistributedStore()
    rc = store.setup("127.0.0.1", sys.argv[1], int(sys.argv[2]), 16 << 20, "tcp", "",
                     sys.argv[3])
    print("setup", rc, flush=True)
    if rc != 0:
        sys.exit(1)
    sys.stdin.read()  # hold the segment until the benchmark closes our stdin
    store.close()
""")


def mooncake_worker(argv: list[str]) -> int:
    """The Mooncake client process: set up, then one JSON line per "run" read on stdin."""
    metadata, master, value_bytes, total_bytes = argv[0], argv[1], int(argv[2]), int(argv[3])
    from mooncake.store import MooncakeDistributedStore

    store = MooncakeDistributedStore()
    rc = store.setup("127.0.0.1", metadata, 0, MOONCAKE_LOCAL_BUFFER_BYTES, "tcp", "", master)
    if rc != 0:
        print(json.dumps({"error": f"MooncakeDistributedStore.setup returned {rc}"}), flush=True)
        return 1
    data = make_data(max(value_bytes, total_bytes))
    values = values_of(data, value_bytes, total_bytes)
    nbytes = sum(v.nbytes for v in values)
    out = aligned(nbytes)
    outs = slices(out, value_bytes, len(values))
    for array in (data, out):
        rc = store.register_buffer(array.ctypes.data, array.nbytes)
        if rc != 0:
            print(json.dumps({"error": f"register_buffer returned {rc}"}), flush=True)
            return 1
    keys = [f"bench-{value_bytes}-{i}" for i in range(len(values))]
    src_ptrs = [v.ctypes.data for v in values]
    out_ptrs = [o.ctypes.data for o in outs]

    def one_pass(verify: bool) -> dict[str, Any]:
        run: dict[str, Any] = {}
        put_s, codes = timed(lambda: [store.put(k, v) for k, v in zip(keys, values, strict=True)])
        get_s, got = timed(lambda: sum(1 for k in keys if len(store.get(k)) == value_bytes))
        if verify:
            run["verified_get"] = all(np.array_equal(np.frombuffer(store.get(k), np.uint8), v)
                                      for k, v in zip(keys, values, strict=True))
        store.remove_all(True)
        put_from_s, codes_from = timed(lambda: [
            store.put_from(k, p, value_bytes) for k, p in zip(keys, src_ptrs, strict=True)])
        if verify:
            out.fill(0)
        get_into_s, sizes = timed(lambda: [
            store.get_into(k, p, value_bytes) for k, p in zip(keys, out_ptrs, strict=True)])
        if verify:
            run["verified_get_into"] = bool(np.array_equal(out, data[:nbytes]))
            run["verified"] = run.pop("verified_get") and run.pop("verified_get_into")
        store.remove_all(True)
        bad = ([c for c in codes if c != 0] + [c for c in codes_from if c != 0]
               + [s for s in sizes if s != value_bytes])
        if bad or got != len(keys):
            raise RuntimeError(f"Mooncake: failed codes {sorted(set(bad))[:5]}, get found {got} "
                               f"of {len(keys)}")
        for op, seconds in (("put", put_s), ("get", get_s), ("put_from", put_from_s),
                            ("get_into", get_into_s)):
            run[f"{op}_gbps"] = gbps(nbytes, seconds)
            run[f"{op}_ops_per_s"] = len(keys) / seconds
        return run

    one_pass(False)  # warm-up: segment pages, connections
    print(json.dumps({"ready": True, "num_values": len(values)}), flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "quit":
            break
        try:
            print(json.dumps(one_pass(command == "verify")), flush=True)
        except Exception as e:
            print(json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)
    store.close()
    return 0


class Mooncake:
    """mooncake_master, a store process and a client worker process, all on 127.0.0.1."""

    def __init__(self, segment_bytes: int, workdir: str) -> None:
        self.processes: list[subprocess.Popen[Any]] = []
        self.workdir = workdir
        self.info: dict[str, Any] = {"available": False}
        master = find_mooncake_master()
        if master is None:
            raise RuntimeError("mooncake_master not found (pip install "
                               "mooncake-transfer-engine-non-cuda)")
        self.info["master_binary"] = master
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            self.info["version"] = importlib.metadata.version(
                "mooncake-transfer-engine-non-cuda")
        rpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
        self.metadata = f"http://127.0.0.1:{http_port}/metadata"
        self.master_addr = f"127.0.0.1:{rpc_port}"
        cmd = [master, f"--rpc_port={rpc_port}", "--rpc_address=127.0.0.1",
               "--enable_http_metadata_server=true", "--http_metadata_server_host=127.0.0.1",
               f"--http_metadata_server_port={http_port}", f"--metrics_port={metrics_port}",
               "--metrics_host=127.0.0.1", "--enable_metric_reporting=false",
               "--logtostderr"]
        self.info["master_command"] = cmd
        self.master = self._spawn(cmd, "master.log")
        self._wait_port(rpc_port, self.master, "master.log")
        self._wait_port(http_port, self.master, "master.log")
        self.store = self._spawn([sys.executable, "-c", _MOONCAKE_STORE, self.metadata,
                                  str(segment_bytes), self.master_addr], "store.log",
                                 stdin=subprocess.PIPE)
        self._wait_line(self.store, "store.log", "setup 0", 60)
        self.info["segment_bytes"] = segment_bytes
        self.worker: subprocess.Popen[str] | None = None

    def _spawn(self, cmd: list[str], log_name: str, **kw: Any) -> subprocess.Popen[Any]:
        log_file = open(os.path.join(self.workdir, log_name), "wb")  # noqa: SIM115
        process = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT,
                                   cwd=self.workdir, **kw)
        self.processes.append(process)
        return process

    def log_tail(self, name: str, nbytes: int = 1500) -> str:
        with contextlib.suppress(OSError):
            return Path(self.workdir, name).read_text(errors="replace")[-nbytes:]
        return ""

    def _wait_port(self, port: int, process: subprocess.Popen[Any], log_name: str) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"{log_name[:-4]} exited with {process.returncode}: "
                                   f"{self.log_tail(log_name)}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                return
            time.sleep(0.1)
        raise RuntimeError(f"port {port} of {log_name[:-4]} did not open within 30 s")

    def _wait_line(self, process: subprocess.Popen[Any], log_name: str, line: str,
                   timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if line in self.log_tail(log_name, 1 << 20):
                return
            if process.poll() is not None:
                raise RuntimeError(f"{log_name[:-4]} exited with {process.returncode}: "
                                   f"{self.log_tail(log_name)}")
            time.sleep(0.1)
        raise RuntimeError(f"{log_name[:-4]} did not print {line!r} within {timeout_s:g} s: "
                           f"{self.log_tail(log_name)}")

    def start_worker(self, value_bytes: int, total_bytes: int) -> int:
        self.stop_worker()
        worker_log = open(os.path.join(self.workdir, "client.log"), "wb")  # noqa: SIM115
        self.worker = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--mooncake-worker", self.metadata,
             self.master_addr, str(value_bytes), str(total_bytes)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=worker_log, text=True,
            cwd=self.workdir)
        self.processes.append(self.worker)
        answer = self._answer()
        return int(answer["num_values"])

    def _answer(self) -> dict[str, Any]:
        assert self.worker is not None and self.worker.stdout is not None
        line = self.worker.stdout.readline()
        if not line:
            raise RuntimeError(f"the Mooncake client exited with {self.worker.wait()}: "
                               f"{self.log_tail('client.log')}")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"Mooncake client: {answer['error']}")
        return answer

    def run(self, verify: bool) -> dict[str, Any]:
        assert self.worker is not None and self.worker.stdin is not None
        self.worker.stdin.write("verify\n" if verify else "run\n")
        self.worker.stdin.flush()
        return self._answer()

    def stop_worker(self) -> None:
        if self.worker is not None:
            quit_worker(self.worker, 30)
        self.worker = None

    def close(self) -> None:
        self.stop_worker()
        if self.store.stdin is not None:
            with contextlib.suppress(OSError):
                self.store.stdin.close()
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


# -- main ----------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="kvstore (kvstored + a TCP client, and the shared-memory client) beside "
                    "Mooncake Store (mooncake_master + a store process + a client process, "
                    "over TCP) on this machine; prints one JSON document.")
    parser.add_argument("--sizes", default="256KiB,4MiB", help="value sizes (default: %(default)s)")
    parser.add_argument("--total-bytes", default=None,
                        help="bytes per size per run (default: 256MiB; quick: 16MiB)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="runs per figure; the median is reported (default: 5, quick: 2)")
    parser.add_argument("--quick", action="store_true", help="small totals and 2 repeats")
    parser.add_argument("--no-mooncake", action="store_true", help="the kvstore half only")
    parser.add_argument("--json-out", default=None, help="also write the JSON to this file")
    args = parser.parse_args(argv)
    args.sizes = [parse_size(s.strip(), what="--sizes") for s in args.sizes.split(",")
                  if s.strip()]
    if args.repeats is None:
        args.repeats = 2 if args.quick else 5
    args.total_bytes = (parse_size(args.total_bytes, what="--total-bytes")
                        if args.total_bytes else 16 * MiB if args.quick else 256 * MiB)
    if args.repeats < 1 or not args.sizes or min(args.sizes) <= 0:
        parser.error("--repeats and every size must be positive")
    if max(args.sizes) > MAX_VALUE_BYTES:
        parser.error(f"sizes above {size_label(MAX_VALUE_BYTES)} are not supported")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--mooncake-worker"]:
        return mooncake_worker(argv[1:])
    args = parse_args(argv)
    started_s = time.perf_counter()
    totals = {s: max(s, args.total_bytes) for s in args.sizes}
    dram_bytes = sum(dram_pool_bytes(s, t // s, MAX_VALUE_BYTES) for s, t in totals.items())
    doc: dict[str, Any] = {
        "benchmark": "kvstore/benchmarks/vs_mooncake.py",
        "units": {"gbps": "1e9 bytes per second", "figures": "median over runs",
                  "ratio": "kvstore / Mooncake, median of per-run ratios"},
        "setup": {
            "kvstore": "kvstored subprocess (python -m daemon, DRAM tier) + this process as "
                       "the client: tcp = connect(url, shared_memory=False), shm = "
                       "connect(url) (maps the daemon's /dev/shm pool)",
            "mooncake": "mooncake_master (HTTP metadata server inside) + a store process "
                        "holding a global segment of the same size as kvstored's DRAM "
                        "(protocol tcp) + a client process with no segment (so every value "
                        "crosses TCP); put(key, numpy view), get -> bytes, put_from / "
                        "get_into on register_buffer'ed arrays",
            "raw": "memcpy_chunked: np.copyto in value-sized pieces; tcp_loopback: the same "
                   "pieces streamed to another process over loopback TCP, one 1-byte answer "
                   "per piece",
        },
        "config": {"sizes": [size_label(s) for s in args.sizes], "repeats": args.repeats,
                   "quick": args.quick, "total_bytes": {size_label(s): t
                                                        for s, t in totals.items()},
                   "capacity_bytes": dram_bytes, "client": "one synchronous caller"},
        "machine": machine_info(None),
    }
    data = make_data(max(totals.values()))
    workdir = tempfile.mkdtemp(prefix="vs-mooncake-")
    mooncake: Mooncake | None = None
    mooncake_info: dict[str, Any] = {"available": False}
    if args.no_mooncake:
        mooncake_info["reason"] = "--no-mooncake"
    else:
        try:
            mooncake = Mooncake(dram_bytes, workdir)
            mooncake_info = mooncake.info
            mooncake_info["available"] = True
        except Exception as e:
            mooncake_info["reason"] = f"{type(e).__name__}: {e}"
            log(f"Mooncake cannot run: {mooncake_info['reason']}")
            if mooncake is not None:
                mooncake.close()
            mooncake = None
    daemon = DaemonProcess(dram_bytes)
    sink = TcpSink(max(args.sizes))
    results: dict[str, Any] = {}
    try:
        tcp = kvstore.connect(daemon.url, shared_memory=False)
        shm = kvstore.connect(daemon.url)
        doc["kvstore_daemon"] = {"url": daemon.url, "shm_client_mapped_pool": pool_mapped(shm)}
        for value_bytes in args.sizes:
            total = totals[value_bytes]
            values = values_of(data, value_bytes, total)
            nbytes = sum(v.nbytes for v in values)
            out = aligned(nbytes)
            outs = slices(out, value_bytes, len(values))
            keys = kvstore.prefix_hashes(
                np.arange(len(values) * 16, dtype=np.uint32) + value_bytes, block_tokens=16,
                namespace="vs-mooncake")
            entry: dict[str, Any] = {"value_bytes": value_bytes, "num_values": len(values),
                                     "total_bytes": nbytes}
            if mooncake is not None:
                try:
                    num = mooncake.start_worker(value_bytes, total)
                    assert num == len(values), (num, len(values))
                except Exception as e:
                    mooncake_info.update(available=False, reason=f"{type(e).__name__}: {e}")
                    log(f"Mooncake client failed: {mooncake_info['reason']}")
                    mooncake.close()
                    mooncake = None
            for client in (tcp, shm):  # warm-up
                kvstore_run(client, keys, values, outs, out, False)
            runs = []
            for repeat in range(args.repeats):
                verify = repeat == 0
                run: dict[str, Any] = {f"raw_{k}": v
                                       for k, v in raw_run(values, outs, sink).items()}
                for name, client in (("kvstore_tcp", tcp), ("kvstore_shm", shm)):
                    for k, v in kvstore_run(client, keys, values, outs, out, verify).items():
                        run[f"{name}_{k}"] = v
                if mooncake is not None:
                    try:
                        for k, v in mooncake.run(verify).items():
                            run[f"mooncake_{k}"] = v
                    except Exception as e:
                        mooncake_info.update(available=False, reason=f"{type(e).__name__}: {e}")
                        log(f"Mooncake run failed: {mooncake_info['reason']}")
                        mooncake.close()
                        mooncake = None
                for name in ("kvstore_tcp", "kvstore_shm", "mooncake"):
                    for op in (*OPS, "put_from"):
                        key = f"{name}_{op}_gbps"
                        if key not in run:
                            continue
                        raw = run["raw_memcpy_chunked_gbps"]
                        run[f"{name}_{op}_vs_memcpy"] = run[key] / raw
                        if name != "kvstore_shm" and op != "get":
                            run[f"{name}_{op}_vs_tcp_loopback"] = (run[key]
                                                                   / run["raw_tcp_loopback_gbps"])
                if "mooncake_put_gbps" in run:
                    for name in ("kvstore_tcp", "kvstore_shm"):
                        for op in OPS:
                            run[f"{name}_{op}_vs_mooncake"] = (run[f"{name}_{op}_gbps"]
                                                               / run[f"mooncake_{op}_gbps"])
                        run[f"{name}_put_vs_mooncake_put_from"] = (
                            run[f"{name}_put_gbps"] / run["mooncake_put_from_gbps"])
                runs.append(run)
                log(f"{size_label(value_bytes)} run {repeat}: " + ", ".join(
                    f"{name} " + "/".join(f"{run.get(f'{name}_{op}_gbps', float('nan')):.2f}"
                                          for op in OPS)
                    for name in ("kvstore_tcp", "kvstore_shm", "mooncake"))
                    + f" GB/s (put/get/get_into); tcp loopback "
                      f"{run['raw_tcp_loopback_gbps']:.2f}, memcpy "
                      f"{run['raw_memcpy_chunked_gbps']:.2f}")
            summary = summarize(runs)
            for prefix in ("raw", "kvstore_tcp", "kvstore_shm", "mooncake"):
                part = {k[len(prefix) + 1:]: v for k, v in summary.items()
                        if k.startswith(prefix + "_")}
                if part:
                    entry[prefix] = part
            entry["runs"] = runs
            results[size_label(value_bytes)] = entry
        tcp.close()
        shm.close()
    finally:
        sink.close()
        daemon.stop()
        if mooncake is not None:
            mooncake.close()
        shutil.rmtree(workdir, ignore_errors=True)
    doc["mooncake"] = mooncake_info
    doc["results"] = results
    doc["headline"] = {
        label: {f"{op}_gbps": {"kvstore_tcp": e["kvstore_tcp"][f"{op}_gbps"],
                               "kvstore_shm": e["kvstore_shm"][f"{op}_gbps"],
                               "mooncake_tcp": e.get("mooncake", {}).get(f"{op}_gbps"),
                               "kvstore_tcp_vs_mooncake": e["kvstore_tcp"].get(
                                   f"{op}_vs_mooncake"),
                               "kvstore_shm_vs_mooncake": e["kvstore_shm"].get(
                                   f"{op}_vs_mooncake")}
                for op in OPS}
        for label, e in results.items()}
    emit(doc, started_s, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

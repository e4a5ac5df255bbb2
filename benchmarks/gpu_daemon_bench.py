"""CUDA tensors through kvstored's shared pool, beside the embedded store and raw copies.

Prints one JSON document. For each value size, medians over ``--repeats`` runs of:
- ``shm put`` / ``shm get_into``: a client of a kvstored subprocess on this host puts CUDA
  tensors (the GPU copies into the mapped, page-locked DRAM pool: D2H) and reads them back
  into CUDA tensors (H2D);
- ``embedded put`` / ``get_into``: the same with an in-process Store (pinned DRAM);
- ``raw d2h`` / ``raw h2d``: ``copy_`` between the same CUDA tensors and pinned host memory;
with ratios shm / embedded and shm / raw. Needs CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import kvstore  # noqa: E402
from kvstore.units import parse_size  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_daemon(dram_bytes: int, max_value_bytes: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon", "--listen", f"127.0.0.1:{port}", "--dram",
         str(dram_bytes), "--max-value", str(max_value_bytes), "--log-level", "WARNING"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": os.pathsep.join(
            filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc, f"kvstore://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("kvstored did not start")


def gbps(fn, nbytes: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return nbytes / (time.perf_counter() - start) / 1e9


def bench(value_bytes: int, total_bytes: int, repeats: int, url: str) -> dict:
    count = max(4, total_bytes // value_bytes)
    total = count * value_bytes
    values = [torch.randn(value_bytes // 2, device="cuda").to(torch.float16)
              for _ in range(count)]
    outs = [torch.empty_like(v) for v in values]
    pinned = torch.empty(total, dtype=torch.uint8, pin_memory=True)
    views = [pinned[i * value_bytes:(i + 1) * value_bytes] for i in range(count)]
    keys = kvstore.prefix_hashes(list(range(16 * count)), block_tokens=16, namespace="gpu-bench")
    embedded = kvstore.Store(kvstore.StoreConfig(dram_bytes=total + 64 * value_bytes,
                                                 max_value_bytes=value_bytes))
    client = kvstore.connect(url)
    session = client._idle[0].session
    runs: dict[str, list[float]] = {k: [] for k in (
        "raw_d2h", "raw_h2d", "embedded_put", "embedded_get_into", "shm_put", "shm_get_into")}
    pairs = list(zip(keys, values, outs, views, strict=True))

    def raw_d2h() -> None:
        for _, value, _, view in pairs:
            view.copy_(value.view(torch.uint8))

    def raw_h2d() -> None:
        for _, _, out, view in pairs:
            out.view(torch.uint8).copy_(view)

    for repeat in range(repeats):
        runs["raw_d2h"].append(gbps(raw_d2h, total))
        runs["raw_h2d"].append(gbps(raw_h2d, total))
        for name, store in (("embedded", embedded), ("shm", client)):
            def put(store=store) -> None:
                for key, value, _, _ in pairs:
                    store.put(key, value)

            def get_into(store=store) -> None:
                for key, _, out, _ in pairs:
                    store.get_into(key, out)

            runs[f"{name}_put"].append(gbps(put, total))
            for out in outs:
                out.zero_()
            runs[f"{name}_get_into"].append(gbps(get_into, total))
            if repeat == 0 and not all(torch.equal(v, o) for _, v, o, _ in pairs):
                raise RuntimeError(f"{name}: bytes read back differ")
            for key in keys:
                store.delete(key)
    embedded.close()
    client.close()
    med = {k: round(statistics.median(v), 2) for k, v in runs.items()}
    return {
        "value_bytes": value_bytes, "count": count, "pool_registered": session.is_pool_registered,
        "gbps": med,
        "shm_vs_embedded": {op: round(med[f"shm_{op}"] / med[f"embedded_{op}"], 3)
                            for op in ("put", "get_into")},
        "shm_vs_raw": {"put": round(med["shm_put"] / med["raw_d2h"], 3),
                       "get_into": round(med["shm_get_into"] / med["raw_h2d"], 3)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="256KiB,4MiB")
    parser.add_argument("--total-bytes", default="1GiB")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_daemon_bench needs CUDA")
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    total = parse_size(args.total_bytes)
    proc, url = start_daemon(total + 64 * max(sizes), max(sizes))
    try:
        results = {f"{s // 1024}KiB": bench(s, total, args.repeats, url) for s in sizes}
    finally:
        proc.terminate()
        proc.wait(30)
    print(json.dumps({"device": torch.cuda.get_device_name(), "repeats": args.repeats,
                      "units": "GB/s (1e9 bytes/s), medians", "sizes": results}, indent=1))


if __name__ == "__main__":
    main()

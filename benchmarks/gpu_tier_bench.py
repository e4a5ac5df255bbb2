"""GPU paths of the store: HBM tier and pinned DRAM tier, beside raw CUDA copies.

Prints one JSON document. For each value size: throughput of
- ``hbm put``   (a CUDA tensor into the HBM pool: device-to-device), ``hbm get_into`` a
  CUDA tensor, beside a raw device-to-device ``copy_`` of the same bytes;
- ``dram put``  (a CUDA tensor into the pinned host pool: D2H), ``dram get_into`` a CUDA
  tensor (H2D), beside raw ``copy_`` between a CUDA tensor and pinned host memory;
with medians over ``--repeats`` runs and the ratio store / raw. Needs CUDA.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import kvstore
from kvstore.units import parse_size


def timed(fn, nbytes: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return nbytes / (time.perf_counter() - start) / 1e9


def bench_size(value_bytes: int, total_bytes: int, repeats: int) -> dict:
    count = max(total_bytes // value_bytes, 4)
    total = count * value_bytes
    elems = value_bytes // 2
    device_values = [torch.randn(elems, device="cuda").to(torch.float16) for _ in range(count)]
    device_out = [torch.empty(elems, dtype=torch.float16, device="cuda") for _ in range(count)]
    pinned = torch.empty(total, dtype=torch.uint8, pin_memory=True)
    pinned_views = [pinned[i * value_bytes:(i + 1) * value_bytes] for i in range(count)]
    keys = kvstore.prefix_hashes(list(range(16 * count)), block_tokens=16, namespace="gpu")
    pool_bytes = total + 64 * value_bytes
    runs: dict[str, list[float]] = {name: [] for name in (
        "raw_d2d", "raw_d2h_pinned", "raw_h2d_pinned", "hbm_put", "hbm_get_into",
        "dram_put", "dram_get_into")}
    hbm = kvstore.Store(kvstore.StoreConfig(hbm_bytes=pool_bytes, dram_bytes=0,
                                            max_value_bytes=value_bytes))
    dram = kvstore.Store(kvstore.StoreConfig(dram_bytes=pool_bytes, max_value_bytes=value_bytes))
    try:
        for _ in range(repeats):
            def raw_d2d() -> None:
                for src, dst in zip(device_values, device_out, strict=True):
                    dst.copy_(src)

            def raw_d2h() -> None:
                for src, dst in zip(device_values, pinned_views, strict=True):
                    dst.copy_(src.view(torch.uint8))

            def raw_h2d() -> None:
                for src, dst in zip(pinned_views, device_out, strict=True):
                    dst.view(torch.uint8).copy_(src)

            runs["raw_d2d"].append(timed(raw_d2d, total))
            runs["raw_d2h_pinned"].append(timed(raw_d2h, total))
            runs["raw_h2d_pinned"].append(timed(raw_h2d, total))
            for name, store in (("hbm", hbm), ("dram", dram)):
                runs[f"{name}_put"].append(timed(
                    lambda s=store: [s.put(k, v) for k, v in zip(keys, device_values,
                                                                 strict=True)], total))
                runs[f"{name}_get_into"].append(timed(
                    lambda s=store: [s.get_into(k, o) for k, o in zip(keys, device_out,
                                                                      strict=True)], total))
                for key, value in zip(keys[:4], device_values[:4], strict=True):
                    out = torch.empty_like(value)
                    assert store.get_into(key, out) and torch.equal(out, value)
        assert hbm.tier_of(keys[0]) == "hbm" and dram.tier_of(keys[0]) == "dram"
        assert dram.stats()["tiers"]["dram"]["pinned"]
    finally:
        hbm.close()
        dram.close()
    med = {name: statistics.median(values) for name, values in runs.items()}
    return {
        "values": count, "total_bytes": total,
        "gbps_median": {k: round(v, 2) for k, v in med.items()},
        "ratio": {
            "hbm_put/raw_d2d": round(med["hbm_put"] / med["raw_d2d"], 3),
            "hbm_get_into/raw_d2d": round(med["hbm_get_into"] / med["raw_d2d"], 3),
            "dram_put/raw_d2h_pinned": round(med["dram_put"] / med["raw_d2h_pinned"], 3),
            "dram_get_into/raw_h2d_pinned": round(med["dram_get_into"] / med["raw_h2d_pinned"],
                                                  3),
        },
        "runs_gbps": {k: [round(x, 2) for x in v] for k, v in runs.items()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="256KiB,4MiB")
    parser.add_argument("--total-bytes", default="1GiB", help="bytes moved per size per run")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"skipped": "no CUDA device"}))
        return 0
    total = parse_size(args.total_bytes)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "sizes": {}}
    for size in args.sizes.split(","):
        result["sizes"][size] = bench_size(parse_size(size), total, args.repeats)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

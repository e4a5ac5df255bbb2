#!/usr/bin/env python3
"""Replay speed of `kvstore hitrate`, beside a raw limit measured in the same run.

    figure                 what runs                                 raw limit (same accesses)
    replay accesses/s      TieredReplay: BlockIndex + the policy     an OrderedDict LRU with the
                           (one HBM tier), per policy and capacity   same prefix-hit count
    belady accesses/s      farthest-next-use with bypass             (same raw limit)

Prints one JSON document on stdout (progress on stderr). An access is one block of one
request; each figure is the median of ``--repeats`` runs, ``ratio`` = replay / raw.
The issue's target is 1,000,000 accesses/s of replay on the conversation trace.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import OrderedDict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from store_bench import emit, log, machine_info

from kvstore.placement.rules import EvictionPolicy
from kvstore.sim.replay import ReplayConfig, belady, replay
from kvstore.sim.traces import Trace, read_traces

TRACE = Path("/work/shared/data/mooncake_conversation_trace.jsonl")
TARGET_ACCESSES_PER_S = 1_000_000


def raw_lru(trace: Trace, capacity_blocks: int) -> int:
    """Hit tokens of a plain OrderedDict LRU: the floor of any Python replay."""
    cache: OrderedDict[bytes, None] = OrderedDict()
    bt, hit = trace.block_tokens, 0
    for keys, n in zip(trace.keys, trace.input_tokens, strict=True):
        count = 0
        for key in keys:
            if key not in cache:
                break
            count += 1
        hit += min(count * bt, n)
        for key in keys:
            if key in cache:
                cache.move_to_end(key)
            else:
                if len(cache) >= capacity_blocks:
                    cache.popitem(last=False)
                cache[key] = None
    return hit


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", type=Path, default=TRACE)
    parser.add_argument("--capacities", default="1000000,3000000,10000000",
                        help="HBM capacities in tokens")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json-out")
    args = parser.parse_args()
    started = time.perf_counter()
    trace = read_traces([args.trace])
    accesses = trace.num_accesses
    doc: dict = {"benchmark": "hitrate", "machine": machine_info(None),
                 "trace": {"path": str(args.trace), "requests": len(trace),
                           "accesses": accesses},
                 "target_accesses_per_s": TARGET_ACCESSES_PER_S, "runs": []}
    for capacity in (int(c) for c in args.capacities.split(",")):
        blocks = capacity // trace.block_tokens
        raw = [accesses / timed(lambda b=blocks: raw_lru(trace, b)) for _ in range(args.repeats)]
        row: dict = {"capacity_tokens": capacity,
                     "raw_ordered_dict_lru_accesses_per_s": statistics.median(raw)}
        for policy in EvictionPolicy:
            config = ReplayConfig((blocks, 0, 0), policy=policy)
            speeds = [accesses / timed(lambda c=config: replay(trace, c))
                      for _ in range(args.repeats)]
            row[f"{policy.value}_accesses_per_s"] = statistics.median(speeds)
            row[f"{policy.value}_ratio"] = statistics.median(speeds) / row[
                "raw_ordered_dict_lru_accesses_per_s"]
        speeds = [accesses / timed(lambda b=blocks: belady(trace, b))
                  for _ in range(args.repeats)]
        row["belady_accesses_per_s"] = statistics.median(speeds)
        log(f"{capacity} tokens: {row}")
        doc["runs"].append(row)
    doc["meets_target"] = all(r[f"{p.value}_accesses_per_s"] >= TARGET_ACCESSES_PER_S
                              for r in doc["runs"] for p in EvictionPolicy)
    emit(doc, started, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

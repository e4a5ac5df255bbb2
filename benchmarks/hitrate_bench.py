#!/usr/bin/env python3
"""Speed of `kvstore hitrate`, beside raw limits measured in the same run.

    figure                        what runs                           raw limit (same run)
    replay accesses/s             the placement core, per policy,     a bare OrderedDict LRU
                                  one tier and three tiers            of the same accesses
    belady / infinite accesses/s  the two references                  (the same)
    load s                        reading and interning the trace     json.loads of each line
    command s                     `kvstore hitrate TRACE --hbm 3M`    a bare Python script that
                                  (a process: start, load, replays,   parses the file and replays
                                  Belady, infinite, report)           it through an OrderedDict
    sweep s                       `--sweep` of 8 capacities           (3 s: the issue's bound)

Prints one JSON document on stdout (progress on stderr). An access is one block of one
request; each figure is the median of ``--repeats`` runs (5 by default), ``ratio`` = figure
/ raw limit (for times: raw / figure, so above 1 is faster). The issue's target: 5M
accesses/s of leaf-first LRU over three tiers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from store_bench import emit, log, machine_info

from kvstore.placement.rules import EvictionPolicy
from kvstore.sim.replay import ReplayConfig, belady, infinite_bound, replay
from kvstore.sim.traces import Trace, read_traces

TRACE = Path("/work/shared/data/mooncake_conversation_trace.jsonl")
TARGET_ACCESSES_PER_S = 5_000_000
SWEEP = "100k,300k,1M,2M,3M,5M,10M,30M"

# The OrderedDict LRU every figure is held against, as source: the in-process floor
# (`raw_lru`) and the bare script a whole `kvstore hitrate` command races run this code.
LRU_SOURCE = textwrap.dedent("""
    from collections import OrderedDict

    def lru_hit_tokens(requests, capacity, block_tokens):
        cache, hit = OrderedDict(), 0
        for keys, n in requests:
            count = 0
            for key in keys:
                if key not in cache:
                    break
                count += 1
            hit += min(count * block_tokens, n)
            for key in keys:
                if key in cache:
                    cache.move_to_end(key)
                else:
                    if len(cache) >= capacity:
                        cache.popitem(last=False)
                    cache[key] = None
        return hit
""")
# The bare script: parse the file with json, replay it through the LRU (module docstring).
BARE_SCRIPT = LRU_SOURCE + textwrap.dedent("""
    import json, sys
    with open(sys.argv[1]) as f:
        requests = [(row["hash_ids"], row["input_length"]) for row in map(json.loads, f)]
    hit = lru_hit_tokens(requests, int(sys.argv[2]) // 512, 512)
    print(hit / sum(n for _, n in requests))
""")


def raw_lru(trace: Trace, capacity_blocks: int) -> int:
    """Hit tokens of a plain OrderedDict LRU (`LRU_SOURCE`): the floor of any Python replay."""
    namespace: dict = {}
    exec(LRU_SOURCE, namespace)
    return namespace["lru_hit_tokens"](zip(trace.keys, trace.input_tokens, strict=True),
                                       capacity_blocks, trace.block_tokens)


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def median_s(fn, repeats: int) -> float:
    return statistics.median(timed(fn) for _ in range(repeats))


def json_load_s(path: Path) -> None:
    with path.open() as f:
        for line in f:
            json.loads(line)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", type=Path, default=TRACE)
    parser.add_argument("--tokens", type=int, default=3_000_000,
                        help="the capacity point, in tokens (three tiers: 1/6, 1/3, 1/2 of it"
                             " from HBM down; one tier: all of it in HBM)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json-out")
    args = parser.parse_args()
    if not args.trace.exists():
        parser.error(f"{args.trace}: no such trace (Mooncake's conversation trace, "
                     "github.com/kvcache-ai/Mooncake, FAST25-release/traces)")
    started = time.perf_counter()
    repeats = args.repeats

    load_s = median_s(lambda: read_traces([args.trace]).interned(), repeats)
    json_s = median_s(lambda: json_load_s(args.trace), repeats)
    trace = read_traces([args.trace])
    trace.interned()
    accesses = trace.num_accesses
    blocks = args.tokens // trace.block_tokens
    three = (blocks // 6, blocks // 3, blocks - blocks // 6 - blocks // 3)
    raw_s = median_s(lambda: raw_lru(trace, blocks), repeats)
    raw = accesses / raw_s
    log(f"raw OrderedDict LRU: {raw / 1e6:.2f}M accesses/s")
    doc: dict = {"benchmark": "hitrate", "machine": machine_info(None),
                 "trace": {"path": str(args.trace), "requests": len(trace),
                           "accesses": accesses},
                 "capacity_tokens": args.tokens, "repeats": repeats,
                 "target_accesses_per_s": TARGET_ACCESSES_PER_S,
                 "raw_ordered_dict_lru_accesses_per_s": raw, "replay": {}}
    for tiers, capacity in (("one tier", (blocks, 0, 0)), ("three tiers", three)):
        for policy in EvictionPolicy:
            config = ReplayConfig(capacity, policy=policy)
            speed = accesses / median_s(lambda c=config: replay(trace, c), repeats)
            doc["replay"][f"{policy.value}, {tiers}"] = {
                "capacity_blocks": capacity, "accesses_per_s": speed, "ratio": speed / raw}
            log(f"{policy.value}, {tiers}: {speed / 1e6:.2f}M accesses/s")
    for name, run in (("belady", lambda: belady(trace, blocks)),
                      ("infinite", lambda: infinite_bound(trace))):
        speed = accesses / median_s(run, repeats)
        doc["replay"][name] = {"accesses_per_s": speed, "ratio": speed / raw}
    doc["load"] = {"read_and_intern_s": load_s, "json_loads_of_each_line_s": json_s,
                   "ratio": json_s / load_s}

    def run_command(argv: list[str]) -> None:
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)

    kvstore_cli = [sys.executable, "-m", "kvstore.cli", "hitrate", str(args.trace)]
    command_s = median_s(lambda: run_command([*kvstore_cli, "--hbm", str(args.tokens)]),
                         repeats)
    bare_s = median_s(lambda: run_command([sys.executable, "-c", BARE_SCRIPT, str(args.trace),
                                           str(args.tokens)]), repeats)
    sweep_s = median_s(lambda: run_command([*kvstore_cli, "--sweep", SWEEP]), repeats)
    doc["command"] = {"kvstore_hitrate_s": command_s, "bare_script_s": bare_s,
                      "ratio": bare_s / command_s,
                      "what": "kvstore hitrate --hbm: replays of both policies, Belady, the "
                              "infinite bound; the bare script: one OrderedDict replay"}
    doc["sweep"] = {"capacities": SWEEP, "wall_s": sweep_s, "bound_s": 3.0}
    target = doc["replay"]["leaf-lru, three tiers"]["accesses_per_s"]
    doc["meets_target"] = target >= TARGET_ACCESSES_PER_S
    emit(doc, started, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``kvstore hitrate --nodes N``: the trace over a pool of N cache nodes, at the same total
capacity (`kvstore.sim.pool`). ``--hbm``, ``--dram`` and ``--nvme`` are the pool's total;
each node gets 1/N of each.

For each policy, the configurations reported:

    one node         all the capacity in one node (the plain replay, for reference)
    per-node         N nodes routed by --routing, each seeing only its own cache
    pooled           the same, but a block another node holds is a hit (remote), served
                     from there and kept as a copy by the request's node
    pooled, prefix   pooled with prefix (cache-aware) routing; left out when --routing is
                     prefix (it is the line above)
"""

from __future__ import annotations

import argparse
import time
from functools import partial
from typing import Any

from kvstore.cli.jobs import Job, LazyProgress, policy_job, pool_job, run_jobs
from kvstore.errors import ConfigError
from kvstore.placement.rules import EvictionPolicy
from kvstore.sim.pool import PoolConfig, Routing
from kvstore.sim.replay import ReplayConfig
from kvstore.sim.traces import Trace


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=int, metavar="N",
                   help="replay over a pool of N cache nodes: the capacities are the pool's "
                        "total, 1/N per node; reports N nodes each on its own cache, the same "
                        "nodes pooled (a block another node holds is a remote hit, copied to "
                        "the request's node) and pooled with prefix routing, beside one node "
                        "of all the capacity")
    p.add_argument("--routing", choices=[r.value for r in Routing],
                   help="with --nodes: which node a request goes to. random: uniform, drawn "
                        "with --seed (the trace formats name no session to keep together); "
                        "prefix: the node holding the longest leading run of its blocks (a "
                        "run under half its input counts as none), ties to the node given "
                        "the fewest requests in the last 60 s of trace time. Default: random")
    p.add_argument("--seed", type=int,
                   help="with --nodes and random routing: the seed of the draws (default 0)")


def check_arguments(args: argparse.Namespace) -> None:
    """A clear error for every flag that does not fit with the others (before any work)."""
    if args.nodes is None:
        for flag in ("routing", "seed"):
            if getattr(args, flag) is not None:
                raise ConfigError(f"--{flag} needs --nodes N (a pool of 2 or more nodes)")
        return
    if args.nodes < 1:
        raise ConfigError(f"--nodes must be 1 or more, got {args.nodes}")
    if args.routing is not None and args.nodes == 1:
        raise ConfigError("--routing needs --nodes 2 or more: one node has nothing to route")
    if args.seed is not None and (args.nodes == 1 or args.routing == Routing.PREFIX.value):
        raise ConfigError("--seed draws the random routing: it needs --nodes 2 or more and "
                          "--routing random")
    if args.sweep is not None:
        raise ConfigError("--sweep does not combine with --nodes: run one --nodes command "
                          "per capacity")
    if args.window is not None:
        raise ConfigError("--window does not combine with --nodes")


def pool_configs(replay_config: ReplayConfig, num_nodes: int, routing: Routing, seed: int
                 ) -> list[PoolConfig]:
    """Per node, pooled, and pooled with prefix routing (unless ``routing`` is prefix)."""
    configs = [PoolConfig(replay_config, num_nodes, routing, pooled, seed)
               for pooled in (False, True)]
    if routing is not Routing.PREFIX:
        configs.append(PoolConfig(replay_config, num_nodes, Routing.PREFIX, True, seed))
    return configs


def run_pool(trace: Trace, args: argparse.Namespace, capacity_tokens: dict[str, int],
             kinds: list[EvictionPolicy], show_bar: bool) -> dict[str, Any]:
    """The pool's part of the report (what ``--json`` prints beside the trace's header)."""
    bt = trace.block_tokens
    tiers = tuple(capacity_tokens)
    blocks = tuple(c // bt for c in capacity_tokens.values())
    if not any(blocks):
        raise ConfigError(f"a capacity of {sum(capacity_tokens.values())} tokens holds no "
                          f"{bt}-token block")
    routing = Routing(args.routing or Routing.RANDOM.value)
    seed = args.seed or 0
    singles = [ReplayConfig(blocks, tiers, kind, not args.no_promote) for kind in kinds]
    pools = [pool_configs(single, args.nodes, routing, seed) for single in singles]
    jobs: list[Job] = []
    for single, configs in zip(singles, pools, strict=True):
        jobs.append(partial(policy_job, single))
        jobs += [partial(pool_job, config) for config in configs]
    per_policy = 1 + len(pools[0])
    started = time.perf_counter()
    bar = LazyProgress(len(jobs), "replaying", show_bar)
    try:
        results = run_jobs(trace, jobs, bar)
    finally:
        bar.close()
    elapsed_s = time.perf_counter() - started
    nodes = pools[0][0].node_capacity_blocks()
    doc: dict[str, Any] = {
        "replay_s": elapsed_s, "nodes": args.nodes, "routing": routing.value,
        "seed": seed if routing is Routing.RANDOM else None,
        "capacity_tokens": capacity_tokens,
        "total_capacity_tokens": sum(capacity_tokens.values()),
        "node_capacity_tokens": [{t: n * bt for t, n in zip(tiers, node, strict=True)}
                                 for node in nodes],
        "policies": {}}
    for i, kind in enumerate(kinds):
        chunk = results[i * per_policy:(i + 1) * per_policy]
        doc["policies"][kind.value] = {"one_node": chunk[0], "configurations": chunk[1:]}
    return doc


def print_pool_report(doc: dict[str, Any]) -> None:
    """The pool's lines of the human-readable report."""
    nodes = doc["node_capacity_tokens"]
    caps = ", ".join(f"{t} {_span([node[t] for node in nodes])}"
                     for t, total in doc["capacity_tokens"].items() if total)
    print(f"{doc['nodes']} nodes of {caps} tokens each; a pool of "
          f"{doc['total_capacity_tokens']:,} tokens"
          + (f"; random routing seed {doc['seed']}" if doc["seed"] is not None else ""))
    for name, runs in doc["policies"].items():
        print(f"{name:<26}{'routing':>8}{'hit rate':>10}{'local hit tokens':>18}"
              f"{'remote hit tokens':>19}  requests per node")
        one = runs["one_node"]
        print(f"  {'one node, all capacity':<24}{'-':>8}{one['hit_rate']:>10.2%}"
              f"{one['hit_tokens']:>18,}{0:>19,}  all")
        for run in runs["configurations"]:
            print(f"  {run['configuration']:<24}{run['routing']:>8}{run['hit_rate']:>10.2%}"
                  f"{run['local_hit_tokens']:>18,}{run['remote_hit_tokens']:>19,}  "
                  f"{_span(run['requests_per_node'])}")


def _span(values: list[int]) -> str:
    low, high = min(values), max(values)
    return f"{low:,}" if low == high else f"{low:,}-{high:,}"

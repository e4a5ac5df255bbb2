"""``kvstore hitrate TRACE [TRACE...]``: what hit rate a cache of given tiers buys.

Capacities are tokens (``3M``, ``500k``, ``2000000``) or bytes (a unit with a ``B``:
``80GiB``, ``512MB``), bytes converted with ``--kv-bytes-per-token`` or ``--model``.
Every run reports, beside each policy's replay, the infinite-capacity bound and Belady at
the total capacity. ``--sweep`` replaces ``--hbm`` by each of its values in turn (the
other tiers stay as given), one process per run where there is more than one core;
``--plot`` draws the sweep (matplotlib, the ``plot`` extra, is checked before the replay).

``--nodes N`` replays the trace over a pool of N cache nodes instead, the capacities given
being the pool's total (1/N per node), and reports per policy: one node of all the
capacity; the N nodes each on its own cache, routed by ``--routing``; the same nodes
pooled (a block another node holds is a remote hit, and the request's node keeps a copy);
and pooled with prefix routing. Hit tokens are split into local and remote.

Exit codes: 0 done; 2 bad arguments or a bad trace (a message names what and where).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvstore.cli import hitrate_pool
from kvstore.cli.jobs import Job, LazyProgress, belady_job, policy_job, run_jobs
from kvstore.errors import ConfigError, KVStoreError
from kvstore.model_shapes import MODEL_SHAPES, kv_layout
from kvstore.placement.rules import EvictionPolicy
from kvstore.sim.replay import ReplayConfig, infinite_bound
from kvstore.sim.traces import TraceError, TraceFormat, read_traces
from kvstore.units import parse_size

if TYPE_CHECKING:
    from matplotlib.figure import Figure

TIERS = ("hbm", "dram", "nvme")


def register(commands: Any) -> None:
    p = commands.add_parser(
        "hitrate", help="replay request traces and report the hit rate a cache size buys",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("traces", nargs="+", metavar="TRACE", type=Path)
    p.add_argument("--format", choices=[f.value for f in TraceFormat],
                   help="trace format (default: detected from the first valid line)")
    p.add_argument("--block-tokens", type=int, help="tokens per block (default: what "
                   "access logs declare, else 512; Mooncake traces fix it)")
    for tier in TIERS:
        p.add_argument(f"--{tier}", default="0", metavar="SIZE",
                       help=f"{tier.upper()} capacity: tokens (3M) or bytes (80GiB)")
    p.add_argument("--kv-bytes-per-token", type=int, metavar="N")
    p.add_argument("--model", metavar="PRESET",
                   help=f"KV bytes per token of a preset: {', '.join(MODEL_SHAPES)}")
    p.add_argument("--policy", default=",".join(e.value for e in EvictionPolicy),
                   help="eviction policies, comma-separated (default: all: "
                        f"{', '.join(e.value for e in EvictionPolicy)})")
    p.add_argument("--no-promote", action="store_true",
                   help="do not copy hits in slower tiers up to the fastest")
    p.add_argument("--window", type=float, metavar="SECONDS",
                   help="also report the hit rate per window of trace time")
    p.add_argument("--sweep", metavar="SIZES", help="HBM capacities to sweep: 1M,3M,10M")
    p.add_argument("--plot", type=Path, metavar="FILE.png",
                   help="with --sweep: plot hit rate vs capacity (needs matplotlib: "
                        "pip install 'kvstore[plot]')")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip (and count) malformed lines instead of stopping")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    hitrate_pool.add_arguments(p)
    p.set_defaults(run=run)


# -- arguments --------------------------------------------------------------------------------


def kv_bytes_per_token(args: argparse.Namespace) -> int | None:
    if args.model is not None:
        if args.model not in MODEL_SHAPES:
            raise ConfigError(f"unknown --model {args.model!r}; presets: "
                              f"{', '.join(MODEL_SHAPES)}")
        return kv_layout(args.model).bytes_per_token
    if args.kv_bytes_per_token is not None and args.kv_bytes_per_token <= 0:
        raise ConfigError(f"--kv-bytes-per-token must be positive, got "
                          f"{args.kv_bytes_per_token}")
    return args.kv_bytes_per_token


def capacity_tokens(value: str, what: str, bytes_per_token: int | None) -> int:
    """Tokens from ``3M`` (tokens) or ``80GiB`` (bytes, converted)."""
    text = value.strip()
    if text.startswith("-"):
        raise ConfigError(f"{what} must not be negative, got {value!r}")
    size = parse_size(text, what=what)
    if "b" not in text.lower():
        return size
    if bytes_per_token is None:
        raise ConfigError(f"{what} {value!r} is in bytes: give --kv-bytes-per-token N or "
                          f"--model PRESET ({', '.join(MODEL_SHAPES)}), or write tokens (3M)")
    return size // bytes_per_token


def policies(text: str) -> list[EvictionPolicy]:
    out = []
    for name in text.split(","):
        try:
            out.append(EvictionPolicy(name.strip()))
        except ValueError:
            raise ConfigError(f"unknown --policy {name.strip()!r}; choose from "
                              f"{', '.join(e.value for e in EvictionPolicy)}") from None
    return out


# -- the command ------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    bpt = kv_bytes_per_token(args)
    kinds = policies(args.policy)
    capacities = {t: capacity_tokens(getattr(args, t), f"--{t}", bpt) for t in TIERS}
    sweep = ([capacity_tokens(v, "--sweep", bpt) for v in args.sweep.split(",")]
             if args.sweep else None)
    if args.plot is not None and sweep is None:
        raise ConfigError("--plot needs --sweep")
    if sweep is None and not any(capacities.values()):
        raise ConfigError("give a capacity: --hbm, --dram, --nvme (e.g. --hbm 3M) or --sweep")
    if args.window is not None and args.window <= 0:
        raise ConfigError(f"--window must be positive, got {args.window}")
    hitrate_pool.check_arguments(args)
    if args.plot is not None:
        require_matplotlib()  # now, not after a replay that may take minutes
    fmt = TraceFormat(args.format) if args.format else None
    trace = read_traces(list(args.traces), fmt=fmt, block_tokens=args.block_tokens,
                        skip_bad=args.skip_bad)
    if not len(trace):
        raise TraceError("the trace holds no requests")
    bt = trace.block_tokens
    show_bar = not args.json and sys.stderr.isatty()
    bound = infinite_bound(trace, args.window).to_dict()
    header = {"requests": len(trace), "accesses": trace.num_accesses,
              "input_tokens": trace.total_input_tokens, "block_tokens": bt,
              "bad_lines_skipped": trace.num_bad_lines, "infinite": bound}
    if args.nodes is not None:
        doc = {**header, **hitrate_pool.run_pool(trace, args, capacities, kinds, show_bar)}
        if args.json:
            print(json.dumps(doc, indent=1))
        else:
            print_header(doc)
            hitrate_pool.print_pool_report(doc)
        return 0
    points = sweep if sweep is not None else [capacities["hbm"]]
    jobs: list[Job] = []
    for hbm in points:
        blocks = tuple(c // bt for c in (hbm, capacities["dram"], capacities["nvme"]))
        if not any(blocks):
            raise ConfigError(f"a capacity of {hbm} tokens holds no {bt}-token block")
        jobs += [partial(policy_job, ReplayConfig(blocks, TIERS, k, not args.no_promote,
                                                  args.window)) for k in kinds]
        jobs.append(partial(belady_job, sum(blocks), args.window))
    started = time.perf_counter()
    bar = LazyProgress(len(jobs), "replaying", show_bar)
    try:
        results = run_jobs(trace, jobs, bar)  # at least a policy and belady
    finally:
        bar.close()
    elapsed_s = time.perf_counter() - started
    per_point = len(kinds) + 1
    rows = []
    for i, hbm in enumerate(points):
        chunk = results[i * per_point:(i + 1) * per_point]
        row = {"capacity_tokens": {"hbm": hbm, "dram": capacities["dram"],
                                   "nvme": capacities["nvme"]},
               "total_capacity_tokens": hbm + capacities["dram"] + capacities["nvme"],
               "policies": {k.value: r for k, r in zip(kinds, chunk, strict=False)},
               "belady": chunk[-1]}
        rows.append(row)
    doc = {**header, "replay_s": elapsed_s, "runs": rows}
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        print_report(doc, kinds, sweep is not None)
    if args.plot is not None:
        names = ", ".join(path.name for path in args.traces)
        write_plot(sweep_figure(doc, kinds, names, bpt), args.plot)
    return 0


def print_header(doc: dict[str, Any]) -> None:
    print(f"{doc['requests']} requests, {doc['accesses']} block accesses of "
          f"{doc['block_tokens']} tokens, {doc['input_tokens']} input tokens"
          + (f", {doc['bad_lines_skipped']} bad lines skipped" if doc["bad_lines_skipped"]
             else ""))
    print(f"infinite-capacity bound: {doc['infinite']['hit_rate']:.2%}")


def print_report(doc: dict[str, Any], kinds: list[EvictionPolicy], is_sweep: bool) -> None:
    print_header(doc)
    if is_sweep:
        names = [k.value for k in kinds] + ["belady"]
        print(f"{'capacity (tokens)':>18}" + "".join(f"{n:>10}" for n in names)
              + f"{'infinite':>10}")
        for row in doc["runs"]:
            rates = [row["policies"][k.value]["hit_rate"] for k in kinds]
            rates.append(row["belady"]["hit_rate"])
            print(f"{row['total_capacity_tokens']:>18,}" + "".join(f"{r:>10.2%}" for r in rates)
                  + f"{doc['infinite']['hit_rate']:>10.2%}")
        return
    row = doc["runs"][0]
    caps = ", ".join(f"{t} {c:,}" for t, c in row["capacity_tokens"].items() if c)
    print(f"capacity (tokens): {caps}")
    for name, r in row["policies"].items():
        tiers = ", ".join(f"{t} {n:,}" for t, n in r["hit_tokens_per_tier"].items())
        print(f"{name}: hit rate {r['hit_rate']:.2%} (hit tokens: {tiers}); "
              f"{r['evictions']:,} evictions, {r['demotions']:,} demotions, "
              f"{r['promotions']:,} promotions")
    print(f"belady at {row['total_capacity_tokens']:,} tokens: "
          f"{row['belady']['hit_rate']:.2%}")
    first = next(iter(row["policies"].values()))
    if "windows" in first:
        print("hit rate per window: start_s " + " ".join(
            f"{name}" for name in [*row["policies"], "belady", "infinite"]))
        series = [*(r["windows"] for r in row["policies"].values()), row["belady"]["windows"],
                  doc["infinite"]["windows"]]
        for w, base in enumerate(series[-1]):
            rates = " ".join(f"{s[w]['hit_rate']:.2%}" if w < len(s) else "-" for s in series)
            print(f"  {base['start_s']:>9.0f} {rates}")


def require_matplotlib() -> None:
    try:
        import matplotlib.figure  # noqa: F401
    except ImportError as e:
        raise KVStoreError(f"--plot needs matplotlib, which does not import here ({e}): "
                           "pip install 'kvstore[plot]' (in a clone: pip install -e "
                           "'.[plot]')") from None


# Every line stays visible where others lie on it (leaf-first LRU and LRU often coincide):
# the first policy is drawn wide and solid, each later one narrower and dashed over it,
# with its own marker.
POLICY_STYLES = ({"linestyle": "-", "marker": "o", "linewidth": 3.5, "markersize": 10},
                 {"linestyle": "--", "marker": "x", "linewidth": 1.5, "markersize": 9,
                  "markeredgewidth": 2})
BELADY_STYLE = {"linestyle": "-.", "marker": "^", "linewidth": 1.5, "markersize": 8}


def sweep_figure(doc: dict[str, Any], kinds: list[EvictionPolicy], trace_names: str,
                 kv_bytes_per_token: int | None) -> Figure:
    """Hit rate against total capacity for a ``--sweep`` document (what ``--json`` prints).

    The x axis is tokens, with the KV's bytes on the top axis when the bytes per token are
    known (``--model``, ``--kv-bytes-per-token``), else blocks.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter, NullFormatter, PercentFormatter

    runs, bt = doc["runs"], doc["block_tokens"]
    xs = [row["total_capacity_tokens"] for row in runs]
    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    for i, k in enumerate(kinds):
        style = POLICY_STYLES[min(i, len(POLICY_STYLES) - 1)]
        ax.plot(xs, [row["policies"][k.value]["hit_rate"] for row in runs], label=k.value,
                zorder=2 + i, **style)
    ax.plot(xs, [row["belady"]["hit_rate"] for row in runs], label="belady (optimal)",
            zorder=2 + len(kinds), **BELADY_STYLE)
    ax.axhline(doc["infinite"]["hit_rate"], linestyle=":", color="gray", linewidth=1.5,
               label="infinite capacity")
    ax.set_xscale("log")
    ax.set_xticks(xs, labels=[EngFormatter(sep="")(x) for x in xs])  # the swept points
    ax.xaxis.set_minor_formatter(NullFormatter())
    swept = runs[0]["capacity_tokens"]
    fixed = ", ".join(f"{t.upper()} {swept[t]:,}" for t in TIERS[1:] if swept[t])
    ax.set_xlabel("total cache capacity (tokens" + (f"; HBM swept, {fixed} tokens fixed)"
                                                    if fixed else ")"))
    # The top axis labels the same points in another unit: the KV's bytes, else blocks.
    top = ax.secondary_xaxis("top")
    if kv_bytes_per_token is not None:
        unit, unit_bytes = (("GiB", 2**30) if max(xs) * kv_bytes_per_token >= 2**30
                            else ("MiB", 2**20))
        sizes = [x * kv_bytes_per_token / unit_bytes for x in xs]
        top.set_xticks(xs, labels=[f"{v:,.0f}" if v >= 10 else f"{v:.2g}" for v in sizes])
        top.set_xlabel(f"KV bytes ({unit}, at {kv_bytes_per_token:,} bytes per token)")
    else:
        blocks = [sum(c // bt for c in row["capacity_tokens"].values()) for row in runs]
        top.set_xticks(xs, labels=[f"{b:,}" for b in blocks])
        top.set_xlabel(f"capacity (blocks of {bt} tokens)")
    top.xaxis.set_minor_formatter(NullFormatter())
    ax.set_ylabel("prefix hit rate (% of input tokens)")
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=0))
    ax.set_ylim(bottom=0)
    ax.set_title(f"Hit rate by cache size: {trace_names} ({doc['requests']:,} requests, "
                 f"{bt}-token blocks)", fontsize=11)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    return fig


def write_plot(figure: Figure, path: Path) -> None:
    try:
        figure.savefig(path, dpi=120)
    except OSError as e:
        raise ConfigError(f"--plot {path}: cannot write: {e.strerror or e}") from e

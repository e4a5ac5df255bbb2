"""``kvstore stats URL``: a live view of a running `kvstored`.

Each view is one ``stats`` call (`kvstore.connect(...).stats()`) turned into figures:

- per tier: capacity, bytes used (and the fraction), blocks, block gets it served;
- hit rate in tokens, since the daemon started and over the last interval (the
  difference of two calls): prefix lookups (`match_prefix`, once per engine request),
  tokens queried and tokens hit, counted by the daemon as blocks times its
  ``--block-tokens``. As every queried block is a full block, the token hit rate equals
  the block hit rate; the token counts are exact when ``--block-tokens`` is the engines'
  page size. Block gets (``get``/``get_many``/pins) and their hit rate are shown too.

``--watch SECONDS`` redraws the view (a rich table, or one JSON object a line with
``--json``) until Ctrl-C, which exits 0; ``--count N`` stops after N views. The first
view has no interval figures; an interval over which the daemon restarted has none either.
An unreachable daemon, a bad URL or a refused token: one line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

from kvstore.errors import KVStoreError
from kvstore.units import format_bytes

DESCRIPTION = (
    "Live view of a running kvstored: per-tier capacity, use and blocks; hit rate in "
    "tokens (prefix lookups, one per engine request) since start and over the last "
    "interval. Token counts are blocks times the daemon's --block-tokens.")


@dataclass(frozen=True)
class Sample:
    """One ``stats`` answer and when it was taken (``time.monotonic()``)."""

    stats: dict[str, Any]
    taken_s: float


def register(commands: Any) -> None:
    """Add ``stats`` to the `kvstore` CLI's subcommands."""
    p = commands.add_parser("stats", help="live view of a running kvstored",
                            description=DESCRIPTION)
    p.add_argument("url", metavar="URL", help="the daemon, kvstore://HOST:PORT")
    p.add_argument("--watch", type=float, metavar="SECONDS",
                   help="redraw every SECONDS until Ctrl-C (default: print once)")
    p.add_argument("--count", type=int, metavar="N",
                   help="with --watch: stop after N views (default: until Ctrl-C)")
    p.add_argument("--json", action="store_true",
                   help="print the figures as JSON (with --watch: one object per line)")
    p.add_argument("--token", default=os.environ.get("KVSTORE_TOKEN"),
                   help="the daemon's auth token (default: $KVSTORE_TOKEN)")
    p.add_argument("--namespace", default=None,
                   help="connect in this namespace (default: the token's only one; a token "
                        "of several needs none for stats)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.watch is not None and not args.watch > 0:
        return _fail("--watch must be a positive number of seconds")
    if args.count is not None and args.count < 1:
        return _fail("--count must be at least 1")
    from kvstore.client import connect

    try:
        client = connect(args.url, token=args.token, namespace=args.namespace, timeout_s=10.0,
                         shared_memory=False)
    except KVStoreError as e:
        return _fail(str(e))
    try:
        return _views(client, args)
    except KeyboardInterrupt:
        return 0
    except KVStoreError as e:
        return _fail(str(e))
    finally:
        client.close()


def _fail(message: str) -> int:
    print(f"kvstore stats: {message}", file=sys.stderr)
    return 2


def _views(client: Any, args: argparse.Namespace) -> int:
    views = 1 if args.watch is None else args.count
    live = None
    if args.watch is not None and not args.json:
        from rich.console import Console

        console = Console()
        if console.is_terminal:  # redrawn in place; elsewhere each view is printed
            from rich.live import Live

            live = Live(console=console, auto_refresh=False)
            live.start()
    previous: Sample | None = None
    next_s = time.monotonic()
    shown = 0
    try:
        while views is None or shown < views:
            if shown:
                time.sleep(max(0.0, next_s - time.monotonic()))
            sample = Sample(client.stats(), time.monotonic())
            next_s = sample.taken_s + (args.watch or 0.0)
            doc = figures(sample, previous, args.url)
            if args.json:
                print(json.dumps(doc), flush=True)
            elif live is not None:
                live.update(render(doc), refresh=True)
            else:
                _print(render(doc))
            previous = sample
            shown += 1
    finally:
        if live is not None:
            live.stop()
    return 0


# -- figures ------------------------------------------------------------------------------------


def _rate(hit: int | None, total: int | None) -> float | None:
    return None if hit is None or not total else hit / total


def _counters(stats: dict[str, Any]) -> dict[str, int | None]:
    prefix = stats.get("prefix") or {}  # absent from daemons older than this command
    return {"lookups": prefix.get("lookups"),
            "tokens_queried": prefix.get("tokens_queried"),
            "tokens_hit": prefix.get("tokens_hit"),
            "block_gets": stats.get("queries"),
            "block_get_hits": stats.get("hits")}


def _hit_rates(counters: dict[str, int | None]) -> dict[str, Any]:
    return {**counters,
            "token_hit_rate": _rate(counters["tokens_hit"], counters["tokens_queried"]),
            "block_get_hit_rate": _rate(counters["block_get_hits"], counters["block_gets"])}


def figures(sample: Sample, previous: Sample | None, url: str) -> dict[str, Any]:
    """The view as plain data (what ``--json`` prints)."""
    stats = sample.stats
    tiers = {}
    for name, tier in stats.get("tiers", {}).items():
        capacity, used = tier.get("capacity_bytes", 0), tier.get("used_bytes", 0)
        tiers[name] = {"capacity_bytes": capacity, "used_bytes": used,
                       "used_fraction": used / capacity if capacity else 0.0,
                       "blocks": tier.get("blocks", 0), "get_hits": tier.get("hits", 0)}
    since_start = _counters(stats)
    interval = None
    if previous is not None and _same_run(previous.stats, stats):
        before = _counters(previous.stats)
        delta = {k: None if v is None or before[k] is None else v - before[k]
                 for k, v in since_start.items()}
        interval = {"seconds": sample.taken_s - previous.taken_s, **_hit_rates(delta)}
    prefix = stats.get("prefix") or {}
    return {"url": url, "ts": time.time(), "uptime_s": stats.get("uptime_s"),
            "tenant": stats.get("tenant"),
            "clients": stats.get("clients"), "blocks": stats.get("blocks"),
            "block_tokens": prefix.get("block_tokens"),
            "evictions": stats.get("evictions"), "demotions": stats.get("demotions"),
            "promotions": stats.get("promotions"), "tiers": tiers,
            "since_start": _hit_rates(since_start), "interval": interval,
            "cluster": stats.get("cluster")}  # a node of a pool: its peers and counts


def _same_run(before: dict[str, Any], after: dict[str, Any]) -> bool:
    """False if the daemon restarted between the two answers (counters began again)."""
    started = before.get("started_at"), after.get("started_at")
    if None not in started:
        return started[0] == started[1]
    return (after.get("queries") or 0) >= (before.get("queries") or 0)


# -- the table ----------------------------------------------------------------------------------


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _count(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    minutes, s = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{s:02d}s" if hours else f"{minutes}m{s:02d}s"


def render(doc: dict[str, Any]) -> Any:
    """The view as rich tables: the tiers, then the hit rates."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    if doc.get("tenant") is not None:  # a tenant's own view: its quota is its capacity
        header = Text(f"kvstored {doc['url']}: up {_duration(doc['uptime_s'])}, tenant "
                      f"{doc['tenant']} (its own blocks, quotas and reads)", style="bold")
    else:
        header = Text(f"kvstored {doc['url']}: up {_duration(doc['uptime_s'])}, "
                      f"{_count(doc['clients'])} clients, {_count(doc['blocks'])} blocks, "
                      f"{_count(doc['evictions'])} evictions, {_count(doc['demotions'])} "
                      "demotions", style="bold")
    tiers = Table()
    for column in ("tier", "capacity", "used", "use", "blocks", "get hits"):
        tiers.add_column(column, justify="left" if column == "tier" else "right")
    for name, tier in doc["tiers"].items():
        tiers.add_row(name, format_bytes(tier["capacity_bytes"]),
                      format_bytes(tier["used_bytes"]), _percent(tier["used_fraction"]),
                      _count(tier["blocks"]), _count(tier["get_hits"]))

    since, interval = doc["since_start"], doc["interval"]
    block = doc["block_tokens"]
    rates = Table(title=f"hit rate (tokens = blocks x {block if block else '?'})",
                  title_justify="left")
    rates.add_column("")
    rates.add_column("since start", justify="right")
    if interval is not None:
        rates.add_column(f"last {interval['seconds']:.1f} s", justify="right")
    rows = [("token hit rate", "token_hit_rate", _percent),
            ("lookups (requests)", "lookups", _count),
            ("tokens queried", "tokens_queried", _count),
            ("tokens hit", "tokens_hit", _count),
            ("block get hit rate", "block_get_hit_rate", _percent),
            ("block gets", "block_gets", _count)]
    for label, key, fmt in rows:
        cells = [fmt(since[key])] + ([fmt(interval[key])] if interval is not None else [])
        rates.add_row(label, *cells)
    parts = [header, tiers, rates]
    pool = doc.get("cluster")
    if pool:
        parts.append(Text(
            f"pool {pool['name']!r} as node {pool['node_id']}: peers "
            f"{', '.join(pool['peers']) or 'none'}; blocks read from peers "
            f"{_count(pool.get('remote_hits'))} (misses {_count(pool.get('remote_misses'))}), "
            f"handed to peers {_count(pool.get('spilled'))} (dropped "
            f"{_count(pool.get('spill_dropped'))}), held for peers "
            f"{_count(pool.get('received'))}"
            + ("" if pool.get("redis_ok", True) else "; Redis unreachable")))
    return Group(*parts)


def _print(renderable: Any) -> None:
    from rich.console import Console

    Console(width=100).print(renderable)

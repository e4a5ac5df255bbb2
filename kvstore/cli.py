"""The `kvstore` command line.

- ``kvstore demo``: multi-turn chat through a prefill and a decode engine around a store
  (it lives in `engines.demo`; see below).
- ``kvstore hitrate``: replay request traces through the store's index and policies
  (`kvstore.hitrate_cli`); library code, so registered here, not as a plugin.
- ``kvstore size``: KV sizing arithmetic (`kvstore.size_cli`).
- ``kvstore stats URL``: a live view of a running kvstored (`kvstore.stats_cli`).

Subcommands outside the library plug in through the ``kvstore.commands`` entry point
group: each entry is a ``register(subparsers)`` function that adds its parser and sets
``run`` as its default. The library never imports them itself (data flows one way:
engines -> kvstore), and a missing optional dependency of one plugin leaves the others
working.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points

from kvstore import __version__, hitrate_cli, size_cli, stats_cli

PLUGIN_GROUP = "kvstore.commands"


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, str]]:
    """The parser, and the plugins that failed to load (name -> why)."""
    parser = argparse.ArgumentParser(
        prog="kvstore",
        description="kvstore: a multi-tier (HBM, DRAM, NVMe) KV-cache store for LLM serving.")
    parser.add_argument("--version", action="version", version=f"kvstore {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    hitrate_cli.register(commands)
    size_cli.register(commands)
    stats_cli.register(commands)
    broken: dict[str, str] = {}
    for entry in sorted(entry_points(group=PLUGIN_GROUP), key=lambda e: e.name):
        try:
            entry.load()(commands)
        except ImportError as e:  # an optional dependency of that command is missing
            broken[entry.name] = str(e)
            failed = commands.add_parser(entry.name, help=f"(unavailable: {e})")
            failed.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    return parser, broken


def main(argv: list[str] | None = None) -> int:
    parser, broken = build_parser()
    args = parser.parse_args(argv)
    if args.command in broken:
        print(f"kvstore {args.command}: cannot load ({broken[args.command]}); install the "
              "engines with: pip install -e '.[engines]'", file=sys.stderr)
        return 2
    from kvstore.errors import KVStoreError

    try:
        return args.run(args)
    except (KVStoreError, ValueError) as e:  # bad sizes, unusable paths: a message, no trace
        print(f"kvstore {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

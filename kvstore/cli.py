"""The `kvstore` command line.

- ``kvstore demo``: replays a multi-turn chat workload through a Store with DRAM and NVMe
  tiers and reports what the prefix cache saved. (Until the engines of issue 4 land, the
  KV blocks are synthetic bytes in the real layout of SmolLM2-135M; the store, the keys,
  the tiers and the policy are the real ones.)
- ``kvstore hitrate``, ``kvstore stats``, ``kvstore size``: later issues (5).
"""

from __future__ import annotations

import argparse
import sys

from kvstore import __version__

LATER = {
    "hitrate": "replay request traces and report the hit rate a cache size buys (issue 5)",
    "stats": "live view of a running kvstored (issue 5)",
    "size": "KV sizing arithmetic for a model and a link (issue 5)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvstore",
        description="kvstore: a multi-tier (HBM, DRAM, NVMe) KV-cache store for LLM serving.")
    parser.add_argument("--version", action="version", version=f"kvstore {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    demo = commands.add_parser(
        "demo", help="replay a multi-turn chat workload through a DRAM+NVMe store",
        description="Replays a built-in multi-turn chat workload (a shared system prompt, "
                    "several users, follow-up turns carrying the conversation so far) "
                    "through an embedded Store: each request matches its cached prefix, "
                    "fetches those KV blocks and publishes the rest. Prints the hit rate, "
                    "where blocks live, and that the NVMe tier survives a reopen.")
    from kvstore.demo import add_arguments

    add_arguments(demo)
    for name, text in LATER.items():
        later = commands.add_parser(name, help=f"(not yet) {text}", description=text)
        later.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in LATER:
        print(f"kvstore {args.command}: not yet: {LATER[args.command]}", file=sys.stderr)
        return 2
    from kvstore.demo import run
    from kvstore.errors import KVStoreError

    try:
        return run(args)
    except KVStoreError as e:  # a bad size, an unusable --nvme-path: say so, no traceback
        print(f"kvstore {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

"""The ``kvstore demo`` subcommand, plugged into the `kvstore` CLI, light enough to import
for ``--help`` (torch and the engines load only when the demo runs: `engines.demo`)."""

from __future__ import annotations

import argparse
from typing import Any

from engines.demo_args import DESCRIPTION, add_arguments


def _run(args: argparse.Namespace) -> int:
    from engines.demo import run

    return run(args)


def register(commands: Any) -> None:
    """Add ``demo`` to the `kvstore` CLI's subcommands (the entry point's hook)."""
    demo = commands.add_parser(
        "demo", help="multi-turn chat through prefill/decode engines and a KV store",
        description=DESCRIPTION,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(demo)
    demo.set_defaults(run=_run)

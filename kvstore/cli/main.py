"""The `kvstore` command line.

- ``kvstore demo``: multi-turn chat through a prefill and a decode engine around a store
  (it lives in `engines.demo`; see below).
- ``kvstore hitrate``: replay request traces through the store's index and policies
  (`kvstore.cli.hitrate`); library code, so registered here, not as a plugin.
- ``kvstore size``: KV sizing arithmetic (`kvstore.cli.size`).
- ``kvstore stats URL``: a live view of a running kvstored (`kvstore.cli.stats`).

Subcommands outside the library plug in through the ``kvstore.commands`` entry point
group: each entry is a ``register(subparsers)`` function that adds its parser and sets
``run`` as its default. The library never imports them itself (data flows one way:
engines -> kvstore), and a missing optional dependency of one plugin leaves the others
working.

A mistake in a subcommand's arguments (an unknown flag, a value its parser or its `run`
refuses with `ConfigError`) is answered as argparse answers a single parser: that
subcommand's usage, then ``kvstore NAME: error: ...``, exit 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from kvstore import __version__
from kvstore.cli import hitrate as hitrate_cli
from kvstore.cli import size as size_cli
from kvstore.cli import stats as stats_cli
from kvstore.errors import ConfigError, KVStoreError

PLUGIN_GROUP = "kvstore.commands"


class CommandParser(argparse.ArgumentParser):
    """A subcommand's parser: an argument it does not know is its own error.

    Left to argparse, a subparser hands what it does not know up to the top-level parser,
    which then prints its own usage (``usage: kvstore [-h] [--version] COMMAND``) instead
    of the flags the subcommand does take.
    """

    def parse_known_args(self, args: Sequence[str] | None = None,
                         namespace: argparse.Namespace | None = None,
                         ) -> tuple[argparse.Namespace, list[str]]:
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


@dataclass(frozen=True)
class CommandLine:
    parser: argparse.ArgumentParser
    commands: dict[str, argparse.ArgumentParser]  # each subcommand's own parser
    broken: dict[str, str]  # plugins that failed to load: name -> why


BUILTIN = ("hitrate", "size", "stats")


def build_parser(*, plugins: bool = True) -> CommandLine:
    """The command line; ``plugins=False`` leaves the plugin commands out (finding them
    reads every installed package's metadata: a fifth of a quick command's time)."""
    parser = argparse.ArgumentParser(
        prog="kvstore",
        description="kvstore: a multi-tier (HBM, DRAM, NVMe) KV-cache store for LLM serving.")
    parser.add_argument("--version", action="version", version=f"kvstore {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND",
                                     parser_class=CommandParser)
    commands.required = True
    hitrate_cli.register(commands)
    size_cli.register(commands)
    stats_cli.register(commands)
    broken: dict[str, str] = {}
    found = ()
    if plugins:
        from importlib.metadata import entry_points

        found = entry_points(group=PLUGIN_GROUP)
    for entry in sorted(found, key=lambda e: e.name):
        try:
            entry.load()(commands)
        except ImportError as e:  # an optional dependency of that command is missing
            broken[entry.name] = str(e)
            failed = commands.add_parser(entry.name, help=f"(unavailable: {e})")
            failed.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    return CommandLine(parser, dict(commands.choices), broken)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    cli = build_parser(plugins=command not in BUILTIN)
    args = cli.parser.parse_args(argv)
    if args.command in cli.broken:
        print(f"kvstore {args.command}: cannot load ({cli.broken[args.command]}); install the "
              "engines with: pip install -e '.[engines]'", file=sys.stderr)
        return 2
    try:
        return args.run(args)
    except ConfigError as e:  # a bad value: the subcommand's usage, as argparse gives it
        cli.commands[args.command].error(str(e))
    except (KVStoreError, ValueError) as e:  # a bad trace, an unusable path: a message
        print(f"kvstore {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

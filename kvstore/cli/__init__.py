"""The ``kvstore`` command: `main` dispatches to its subcommands, one module each
(``hitrate``, ``size``, ``stats``; ``demo`` comes from the engines as a plugin)."""

from kvstore.cli.main import main

__all__ = ["main"]

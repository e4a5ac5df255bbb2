"""The `kvstored` command line."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvstored",
        description="Serve one kvstore.Store (HBM, DRAM, NVMe tiers) to many processes and "
                    "hosts. The network daemon arrives with issue 3; until then use the "
                    "embedded kvstore.Store.")
    parser.add_argument("--listen", default="127.0.0.1:7400", help="HOST:PORT to serve on")
    return parser


def main(argv: list[str] | None = None) -> int:
    build_parser().parse_args(argv)
    print("kvstored: not yet: the daemon is issue 3; use the embedded kvstore.Store for now",
          file=sys.stderr)
    return 2

"""The arguments of ``kvstore demo`` (and ``python -m engines.demo``): argparse alone, so
that ``--help`` loads neither torch nor the engines."""

from __future__ import annotations

import argparse

from engines.config import PRESET_NAMES

DESCRIPTION = (
    "Multi-turn chat served by a prefill and a decode engine around a KV store. A "
    "conductor routes each request (colocated on the decode engine, or prefill -> store "
    "-> decode) by where its KV is and what its cost model measured; the workload is a "
    "shared system prompt, several users and follow-up turns. Prints each reply with its "
    "TTFT, inter-token latency, cached tokens and route, then a summary: hit rate, TTFT "
    "with and without the cache, and whether every disaggregated reply equals the "
    "reference generation.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="smollm2-135m",
                        help=f"model: a preset ({', '.join(PRESET_NAMES)}), a checkpoint "
                             "directory or a .gguf file")
    parser.add_argument("--device", default="cpu", help="torch device for the engines")
    add_store_arguments(parser, dram="256MiB", nvme="1GiB")
    parser.add_argument("--users", type=int, default=3, choices=range(1, 5), metavar="1-4",
                        help="concurrent conversations")
    parser.add_argument("--turns", type=int, default=3, choices=range(1, 5), metavar="1-4",
                        help="turns per conversation")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="reply length cap")
    parser.add_argument("--interval", type=float, default=0.3,
                        help="seconds between the users' arrivals within a turn")
    parser.add_argument("--kv-codec", default="none", choices=("none", "fp8"),
                        help="how the engines store KV blocks: none (as computed, lossless) "
                             "or fp8 (e4m3 with per-head scales: half the bytes, lossy; a "
                             "namespace of its own)")
    parser.add_argument("--seed", type=int, default=0, help="seed of random presets")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def add_store_arguments(parser: argparse.ArgumentParser, *, dram: str, nvme: str) -> None:
    """The store the engines share (`engines.demo.open_store` reads these): a daemon's
    URL, or an embedded store's tiers (``dram``, ``nvme``: their default sizes)."""
    parser.add_argument("--url", default=None,
                        help="use this kvstored daemon (kvstore://HOST:PORT), or a pool of "
                             "them (kvstore+cluster://REDIS_HOST:PORT/DB?cluster=NAME), "
                             "instead of an embedded store")
    parser.add_argument("--dram", default=dram, help="embedded store: DRAM tier size")
    parser.add_argument("--nvme", default=nvme, help="embedded store: NVMe tier size (0: none)")
    parser.add_argument("--nvme-path", default=None,
                        help="embedded store: NVMe directory (default: a temporary one)")

"""`kvstore demo`: a multi-turn chat workload through an embedded DRAM+NVMe Store.

Each request is a conversation so far (shared system prompt + the user's turns). The
demo hashes it into chained block keys, asks the store for the longest cached prefix,
fetches those blocks (verifying every byte), and publishes the blocks it had to
"compute". KV blocks are deterministic pseudo-random fp16 bytes in the real layout of
SmolLM2-135M (30 layers, 3 KV heads, head dim 64), so a fetched block can be checked.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from typing import Any

import numpy as np

from kvstore.config import StoreConfig
from kvstore.keys import prefix_hashes
from kvstore.layout import KVLayout
from kvstore.store import Store
from kvstore.units import format_bytes, parse_size

LAYOUT = KVLayout(num_layers=30, num_kv_heads=3, head_dim=64, block_tokens=16, dtype="float16")
NAMESPACE = LAYOUT.namespace("smollm2-135m-instruct")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--users", type=int, default=12, help="concurrent conversations")
    parser.add_argument("--turns", type=int, default=6, help="turns per conversation")
    parser.add_argument("--system-tokens", type=int, default=1024,
                        help="tokens of the system prompt every request shares")
    parser.add_argument("--dram", default="48MiB", help="DRAM tier size (e.g. 48MiB)")
    parser.add_argument("--nvme", default="512MiB", help="NVMe tier size (0 for none)")
    parser.add_argument("--nvme-path", default=None,
                        help="NVMe tier directory (default: a temporary directory)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def kv_block(key: bytes) -> np.ndarray:
    """The (synthetic) KV bytes of a block: fp16 noise seeded by the block's key."""
    seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
    rng = np.random.default_rng(seed)
    return rng.standard_normal(LAYOUT.block_bytes // 2, dtype=np.float32).astype(np.float16)


def workload(args: argparse.Namespace) -> list[tuple[int, list[int]]]:
    """(user, tokens) per request: the conversation so far, users interleaved turn by turn."""
    rng = np.random.default_rng(args.seed)
    system = rng.integers(0, 49152, args.system_tokens).tolist()
    history = {user: list(system) for user in range(args.users)}
    requests = []
    for _turn in range(args.turns):
        for user in rng.permutation(args.users).tolist():
            history[user] += rng.integers(0, 49152, int(rng.integers(40, 400))).tolist()
            requests.append((user, list(history[user])))
            history[user] += rng.integers(0, 49152, int(rng.integers(20, 200))).tolist()
    return requests


def replay(store: Store, requests: list[tuple[int, list[int]]], progress: Any) -> dict:
    input_tokens = hit_tokens = fetched_bytes = published = corrupt = 0
    fetch_s = publish_s = 0.0
    for _user, tokens in requests:
        keys = prefix_hashes(tokens, block_tokens=LAYOUT.block_tokens, namespace=NAMESPACE)
        num_cached = store.match_prefix(keys)
        start = time.perf_counter()
        blocks = store.get_many(keys[:num_cached])
        fetch_s += time.perf_counter() - start
        for key, block in zip(keys, blocks, strict=False):
            if block is None:  # evicted between match and fetch: recompute from here
                break
            if block != kv_block(key).tobytes():
                corrupt += 1
            fetched_bytes += len(block)
            hit_tokens += LAYOUT.block_tokens
        missing = keys[num_cached:]
        start = time.perf_counter()
        published += store.put_many(missing, [kv_block(k) for k in missing])
        publish_s += time.perf_counter() - start
        input_tokens += len(tokens)
        progress()
    return {"requests": len(requests), "input_tokens": input_tokens,
            "cached_tokens": hit_tokens, "token_hit_rate": hit_tokens / max(input_tokens, 1),
            "fetched_bytes": fetched_bytes, "fetch_gbps": fetched_bytes / max(fetch_s, 1e-9) / 1e9,
            "published_blocks": published, "corrupt_blocks": corrupt}


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    console = Console(stderr=args.json)
    nvme_bytes = parse_size(args.nvme, what="--nvme")
    tmp = tempfile.TemporaryDirectory(prefix="kvstore-demo-") if nvme_bytes else None
    nvme_path = args.nvme_path or (tmp.name if tmp else None)
    config = StoreConfig(dram_bytes=args.dram, nvme_path=nvme_path if nvme_bytes else None,
                         nvme_bytes=nvme_bytes, max_value_bytes=LAYOUT.block_bytes,
                         nvme_segment_bytes="16MiB")
    requests = workload(args)
    try:
        with Store(config) as store:
            with Progress(console=console, transient=True,
                          disable=args.json or not console.is_terminal) as bar:
                task = bar.add_task("replaying chat turns", total=len(requests))
                result = replay(store, requests, lambda: bar.advance(task))
            store.flush()  # close would flush too; flushing first lets stats show it
            stats = store.stats()
            tiers = {name: {"blocks": t["blocks"], "used_bytes": t["used_bytes"],
                            "capacity_bytes": t["capacity_bytes"], "hits": t["hits"]}
                     for name, t in stats["tiers"].items()}
            durable_blocks = stats["tiers"].get("nvme", {}).get("blocks", 0)
        result.update(tiers=tiers, evictions=stats["evictions"], demotions=stats["demotions"],
                      promotions=stats["promotions"], block_bytes=LAYOUT.block_bytes)
        if nvme_bytes:
            with Store(config) as reopened:  # everything was flushed on close
                result["recovered_blocks"] = reopened.stats()["blocks"]
                result["blocks_on_nvme_at_close"] = durable_blocks
    finally:
        if tmp is not None:
            tmp.cleanup()
    if args.json:
        print(json.dumps(result, indent=2))
        return 0 if result["corrupt_blocks"] == 0 else 1
    table = Table(title="kvstore demo: multi-turn chat through DRAM + NVMe")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_row("requests", str(result["requests"]))
    table.add_row("token hit rate", f"{result['token_hit_rate']:.1%}")
    table.add_row("cached / input tokens", f"{result['cached_tokens']} / {result['input_tokens']}")
    table.add_row("KV fetched", f"{format_bytes(result['fetched_bytes'])} "
                               f"at {result['fetch_gbps']:.2f} GB/s")
    for name, tier in tiers.items():
        table.add_row(f"{name}: blocks / used / hits",
                      f"{tier['blocks']} / {format_bytes(tier['used_bytes'])} / {tier['hits']}")
    table.add_row("evictions / demotions / promotions",
                  f"{result['evictions']} / {result['demotions']} / {result['promotions']}")
    if "recovered_blocks" in result:
        table.add_row("blocks recovered from NVMe after reopen",
                      f"{result['recovered_blocks']} of {result['blocks_on_nvme_at_close']}")
    table.add_row("corrupt blocks served", str(result["corrupt_blocks"]))
    console.print(table)
    print("(KV bytes are synthetic until the engines of issue 4 land.)", file=sys.stderr)
    return 0 if result["corrupt_blocks"] == 0 else 1

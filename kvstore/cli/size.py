"""`kvstore size`: the KV sizing arithmetic operators otherwise do by hand.

From a model's KV shape (a known name, or layers / KV heads / head dim) and a dtype:

    bytes per token   = 2 (K and V) * layers * KV heads * head dim * dtype bytes
    KV per request    = bytes per token * --tokens
    transfer time     = KV per request * 8 / (--link-gbps * 1e9)   (gigabits per second)
    tokens that fit   = tier size // bytes per token               (--hbm, --dram, --nvme)
    requests that fit = tokens that fit // --tokens

Llama-3-70B (80 layers, 8 KV heads, head dim 128, fp16): 327,680 bytes per token, and
1.34 GB (1,342,177,280 bytes) for 4,096 tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from kvstore.errors import ConfigError
from kvstore.layout import DTYPE_BYTES, KVLayout
from kvstore.model_shapes import MODEL_SHAPES, kv_layout
from kvstore.units import format_bytes, parse_size

TIERS = ("hbm", "dram", "nvme")


def register(commands: Any) -> None:
    p = commands.add_parser(
        "size", help="KV sizing: bytes per token, per request, link time, tokens per tier",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", metavar="NAME",
                   help=f"a known KV shape: {', '.join(MODEL_SHAPES)} (or give the next three)")
    p.add_argument("--layers", type=int, help="transformer layers")
    p.add_argument("--kv-heads", type=int, help="KV heads (grouped-query: fewer than heads)")
    p.add_argument("--head-dim", type=int, help="head dimension")
    p.add_argument("--dtype", default="float16", choices=sorted(DTYPE_BYTES),
                   help="KV element type (default float16)")
    p.add_argument("--tokens", type=int, default=4096,
                   help="tokens per request (default 4096)")
    p.add_argument("--link-gbps", type=float, action="append", default=[], metavar="GBPS",
                   help="a link's speed in gigabits per second (repeatable), e.g. 100 for "
                        "a 100 GbE / RDMA NIC, 512 for PCIe Gen5 x16")
    for tier in TIERS:
        p.add_argument(f"--{tier}", metavar="SIZE",
                       help=f"{tier.upper()} capacity in bytes (80GiB, 2TB)")
    p.add_argument("--block-tokens", type=int, default=16,
                   help="tokens per stored block, for the block size (default 16)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.set_defaults(run=run)


def layout_of(args: argparse.Namespace) -> KVLayout:
    given = [args.layers, args.kv_heads, args.head_dim]
    if args.model is not None:
        if any(v is not None for v in given):
            raise ConfigError("give --model or --layers/--kv-heads/--head-dim, not both")
        try:
            return kv_layout(args.model, dtype=args.dtype, block_tokens=args.block_tokens)
        except KeyError as e:
            raise ConfigError(e.args[0]) from None
    if any(v is None for v in given):
        raise ConfigError("give --model NAME, or all of --layers, --kv-heads and --head-dim")
    return KVLayout(num_layers=args.layers, num_kv_heads=args.kv_heads,
                    head_dim=args.head_dim, block_tokens=args.block_tokens, dtype=args.dtype)


def figures(args: argparse.Namespace) -> dict[str, Any]:
    layout = layout_of(args)
    if args.tokens <= 0:
        raise ConfigError(f"--tokens must be positive, got {args.tokens}")
    if any(not g > 0 for g in args.link_gbps):
        raise ConfigError("--link-gbps must be positive")
    request_bytes = layout.bytes_per_token * args.tokens
    doc: dict[str, Any] = {
        "layout": {"layers": layout.num_layers, "kv_heads": layout.num_kv_heads,
                   "head_dim": layout.head_dim, "dtype": layout.dtype,
                   "block_tokens": layout.block_tokens},
        "bytes_per_token": layout.bytes_per_token, "block_bytes": layout.block_bytes,
        "tokens": args.tokens, "request_bytes": request_bytes,
        "links": [{"gbps": g, "transfer_s": request_bytes * 8 / (g * 1e9)}
                  for g in args.link_gbps],
        "tiers": {}}
    for tier in TIERS:
        value = getattr(args, tier)
        if value is None:
            continue
        nbytes = parse_size(value.strip(), what=f"--{tier}")
        tokens = nbytes // layout.bytes_per_token
        doc["tiers"][tier] = {"bytes": nbytes, "tokens": tokens,
                              "requests": tokens // args.tokens}
    return doc


def run(args: argparse.Namespace) -> int:
    doc = figures(args)
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    out = sys.stdout
    lay = doc["layout"]
    print(f"KV of {lay['layers']} layers x {lay['kv_heads']} KV heads x head dim "
          f"{lay['head_dim']}, {lay['dtype']}:", file=out)
    print(f"  bytes per token      {doc['bytes_per_token']:,}", file=out)
    print(f"  per {lay['block_tokens']}-token block   {doc['block_bytes']:,} "
          f"({format_bytes(doc['block_bytes'])})", file=out)
    print(f"  per request          {doc['request_bytes']:,} bytes = "
          f"{doc['request_bytes'] / 1e9:.2f} GB ({format_bytes(doc['request_bytes'])}) "
          f"for {doc['tokens']:,} tokens", file=out)
    for link in doc["links"]:
        print(f"  over {link['gbps']:g} Gbit/s    {link['transfer_s'] * 1e3:,.1f} ms "
              f"per request", file=out)
    for tier, fit in doc["tiers"].items():
        print(f"  {tier.upper():<5} {format_bytes(fit['bytes']):>11}  holds "
              f"{fit['tokens']:,} tokens = {fit['requests']:,} requests", file=out)
    return 0

#!/usr/bin/env python3
"""`kvstore serve` under load: a trace replayed against the HTTP API with its arrival times
and lengths, per serving mode and request rate (issue 20).

    workloads  trace   Mooncake's conversation trace, scaled: each 512-token hash block
                       becomes ``512 / --scale`` tokens of ids drawn from the hash id (a
                       shared hash id is a shared prefix), lengths and replies scaled alike,
                       arrivals re-timed to each rate keeping the trace's gaps' shape
               short   prompts under 512 tokens (scaled the same way), short replies,
                       Poisson arrivals: where disaggregation is said to lose
    modes      colocated (no chunking), chunked (colocated, --max-num-batched-tokens),
               disaggregated, auto (the conductor's cost model per request)

Each mode is a `kvstore serve` subprocess (real SmolLM2-135M-Instruct by default); every
run's prompts are salted so that no run finds another's prefixes. Per run: TTFT and
inter-token latency p50/p90/p99 (as the client sees the server-sent events), output
tokens per second, the prefix hit rate (prompt tokens the server fetched from its KV
store, from its /metrics), the routes taken, and goodput: the share of requests meeting
both objectives, TTFT <= ``--ttft-slo`` and mean inter-token latency <= ``--itl-slo``.
Replies run to their length (``ignore_eos``). JSON on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import re
import statistics
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

_REPO = Path(__file__).resolve().parents[1]
for path in (_REPO, _REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from store_bench import emit, log, machine_info  # noqa: E402

from tests.serving.process import ServeProcess  # noqa: E402

TRACE = Path("/work/shared/data/mooncake_conversation_trace.jsonl")
MODEL_NAME = "kvstore-bench"  # the name the servers serve the model under
MODES = {"colocated": ["--mode", "colocated", "--prefill-engines", "0"],
         "chunked": ["--mode", "colocated", "--prefill-engines", "0"],
         "disaggregated": ["--mode", "disaggregated"],
         "auto": ["--mode", "auto"]}
VOCAB = 49152  # SmolLM2's; ids drawn from [100, --vocab-size)


def trace_requests(path: Path, count: int, scale: int, salt: str, vocab: int = VOCAB
                   ) -> list[dict[str, Any]]:
    """The trace's first ``count`` requests, scaled: ``prompt`` ids, ``max_tokens``,
    ``at`` (seconds from the first, as in the trace)."""
    block = 512 // scale
    rows = []
    with path.open() as f:
        for line in f:
            if len(rows) == count:
                break
            rows.append(json.loads(line))
    out = []
    for row in rows:
        ids = row["hash_ids"]
        length = max(1, row["input_length"] // scale)
        prompt: list[int] = []
        for hash_id in ids:
            rng = random.Random(f"{salt}:{hash_id}")
            prompt += [rng.randrange(100, vocab) for _ in range(block)]
        out.append({"prompt": prompt[:length], "max_tokens": max(1, row["output_length"] //
                                                                   scale),
                    "at": (row["timestamp"] - rows[0]["timestamp"]) / 1000})
    return out


def short_requests(count: int, salt: str, vocab: int = VOCAB) -> list[dict[str, Any]]:
    """Prompts of 32-255 tokens with no shared prefix, replies of 8-24 tokens; ``at`` one
    second apart on average (Poisson), re-timed per rate."""
    rng = random.Random(salt)
    out, at = [], 0.0
    for _ in range(count):
        n = rng.randrange(32, 256)
        out.append({"prompt": [rng.randrange(100, vocab) for _ in range(n)],
                    "max_tokens": rng.randrange(8, 25), "at": at})
        at += rng.expovariate(1.0)
    return out


def retimed(requests: list[dict[str, Any]], rate: float) -> list[dict[str, Any]]:
    """Arrivals scaled so that the run's mean rate is ``rate`` requests per second (all at
    once spread evenly if the trace gives them one instant)."""
    span = requests[-1]["at"] - requests[0]["at"]
    n = len(requests)
    if span <= 0:
        return [{**r, "at": i / rate} for i, r in enumerate(requests)]
    factor = (n - 1) / rate / span
    return [{**r, "at": (r["at"] - requests[0]["at"]) * factor} for r in requests]


class Server(ServeProcess):
    def __init__(self, mode: str, args: argparse.Namespace, port: int) -> None:
        flags = list(MODES[mode])
        if mode == "chunked":
            flags += ["--max-num-batched-tokens", str(args.chunk_tokens)]
        if mode == "auto":  # the objectives goodput is measured against
            flags += ["--ttft-slo", str(args.ttft_slo), "--itl-slo", str(args.itl_slo)]
        if args.skip_tokenizer_init:
            flags.append("--skip-tokenizer-init")
        if args.num_pages:
            flags += ["--num-pages", str(args.num_pages)]
        super().__init__(port, Path(args.workdir) / f"serve-{mode}.log", "--model", args.model,
                         "--served-model-name", MODEL_NAME, "--device", args.device,
                         "--dram", args.dram, "--max-model-len", str(args.max_model_len),
                         "--log-level", args.log_level, *flags)

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
            text = r.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            match = re.fullmatch(r"(kvstore_serve_\w+)(\{.*\})? (\S+)", line)
            if match:
                out[match.group(1) + (match.group(2) or "")] = float(match.group(3))
        return out



async def one(client: Any, request: dict[str, Any], start: float) -> dict[str, Any]:
    """One request at its time, streamed through the openai client: its token times."""
    import openai

    await asyncio.sleep(max(0.0, start + request["at"] - time.perf_counter()))
    sent = time.perf_counter()
    stamps: list[float] = []
    try:
        stream = await client.completions.create(
            model=MODEL_NAME, prompt=request["prompt"], max_tokens=request["max_tokens"],
            temperature=0, stream=True, extra_body={"ignore_eos": True})
        async for chunk in stream:
            if chunk.choices and (chunk.choices[0].text  # (ids only: a chunk a token)
                                  or chunk.choices[0].finish_reason is None):
                stamps.append(time.perf_counter())
    except openai.APIError as e:
        return {"error": str(e)[:300]}
    if not stamps:
        return {"error": "no token"}
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    return {"ttft_s": stamps[0] - sent, "itl_s": gaps, "tokens": len(stamps),
            "mean_itl_s": statistics.mean(gaps) if gaps else 0.0,
            "prompt_tokens": len(request["prompt"])}


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99)}


async def replay(server: Server, requests: list[dict[str, Any]], args: argparse.Namespace
                 ) -> dict[str, Any]:
    import openai

    before = server.metrics()
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0,
                                timeout=600)
    start = time.perf_counter()
    try:
        results = await asyncio.gather(*[one(client, r, start) for r in requests])
    finally:
        await client.close()
    wall_s = time.perf_counter() - start
    after = server.metrics()
    done = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    fetched = delta('kvstore_serve_prompt_tokens_total{source="fetched"}')
    computed = delta('kvstore_serve_prompt_tokens_total{source="computed"}')
    routes = {route: sum(delta(f'kvstore_serve_requests_total{{finish_reason="{reason}",'
                               f'route="{route}"}}') for reason in ("length", "stop"))
              for route in ("colocated", "disaggregated")}
    good = [r for r in done if r["ttft_s"] <= args.ttft_slo
            and r["mean_itl_s"] <= args.itl_slo]
    return {"requests": len(requests), "errors": len(errors), "first_error": errors[:1],
            "wall_s": wall_s,
            "ttft_s": percentiles([r["ttft_s"] for r in done]),
            "itl_s": percentiles([g for r in done for g in r["itl_s"]]),
            "output_tokens_per_s": sum(r["tokens"] for r in done) / wall_s,
            "prefix_hit_rate": fetched / (fetched + computed) if fetched + computed else 0.0,
            "routes": routes, "goodput": len(good) / len(requests),
            # per request: TTFT (s), mean inter-token latency (s), prompt and reply tokens,
            # so goodput can be worked out afterwards against other objectives
            "per_request": [[round(r["ttft_s"], 4), round(r["mean_itl_s"], 5),
                             r["prompt_tokens"], r["tokens"]] for r in done]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", type=Path, default=TRACE,
                        help="Mooncake's conversation trace (JSONL)")
    parser.add_argument("--workloads", default="trace,short")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--rates", default="0.25,0.5,1", help="requests per second")
    parser.add_argument("--requests", type=int, default=24, help="requests per run")
    parser.add_argument("--scale", type=int, default=32,
                        help="divide the trace's lengths by this (512-token blocks: 16)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--skip-tokenizer-init", action="store_true",
                        help="the server takes and answers token ids (a model without a "
                             "tokenizer: --model llama3-8b on a GPU)")
    parser.add_argument("--device", default="cpu", help="the engines' torch device")
    parser.add_argument("--vocab-size", type=int, default=VOCAB,
                        help="prompt ids are drawn from [100, this)")
    parser.add_argument("--dram", default="1GiB", help="the server's store: DRAM tier")
    parser.add_argument("--num-pages", type=int, default=None,
                        help="KV cache pages per engine (default: the server's)")
    parser.add_argument("--log-level", default="WARNING",
                        help="the server's (INFO logs each routing decision)")
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument("--chunk-tokens", type=int, default=64,
                        help="the chunked mode's --max-num-batched-tokens")
    parser.add_argument("--ttft-slo", type=float, default=2.0, help="seconds")
    parser.add_argument("--itl-slo", type=float, default=0.25, help="seconds")
    parser.add_argument("--port", type=int, default=8300)
    parser.add_argument("--workdir", default="/tmp")
    parser.add_argument("--json-out")
    args = parser.parse_args(argv)
    workloads = args.workloads.split(",")
    if "trace" in workloads and not args.trace.exists():
        parser.error(f"{args.trace}: no such trace (Mooncake's conversation trace, "
                     "github.com/kvcache-ai/Mooncake, FAST25-release/traces)")
    unknown = set(args.modes.split(",")) - set(MODES)
    if unknown:
        parser.error(f"--modes: unknown {sorted(unknown)}; known {sorted(MODES)}")
    started_s = time.perf_counter()
    rates = [float(r) for r in args.rates.split(",")]
    doc: dict[str, Any] = {
        "machine": machine_info(None), "model": args.model, "scale": args.scale,
        "objectives": {"ttft_s": args.ttft_slo, "mean_itl_s": args.itl_slo},
        "chunk_tokens": args.chunk_tokens, "runs": {}}
    for n, mode in enumerate(args.modes.split(",")):
        log(f"starting kvstore serve --mode {mode} ...")
        server = Server(mode, args, args.port + n)
        try:
            for workload in workloads:
                for rate in rates:
                    salt = f"{mode}:{workload}:{rate}:{os.getpid()}"
                    requests = (trace_requests(args.trace, args.requests, args.scale, salt,
                                               args.vocab_size)
                                if workload == "trace"
                                else short_requests(args.requests, salt, args.vocab_size))
                    run = asyncio.run(replay(server, retimed(requests, rate), args))
                    doc["runs"].setdefault(mode, {}).setdefault(workload, {})[str(rate)] = run
                    log(f"{mode} {workload} {rate}/s: TTFT p50 "
                        f"{run['ttft_s'].get('p50', 0):.2f} s, ITL p50 "
                        f"{run['itl_s'].get('p50', 0) * 1e3:.0f} ms, goodput "
                        f"{run['goodput']:.2f}, hits {run['prefix_hit_rate']:.2f}, routes "
                        f"{run['routes']}, errors {run['errors']}")
        finally:
            server.close()
    emit(doc, started_s, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

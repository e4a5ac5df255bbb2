"""Drive real vLLM through a script of steps, for the connector's tests and benchmark.

    python -m kvstore.integrations.vllm_driver SCRIPT.json

SCRIPT is ``{"model": DIR, "engine": {LLM kwargs}, "steps": [...]}``; each step is one of

    {"op": "start", "connector": {extra config} | null, "role": "kv_both"}   a new LLM
    {"op": "generate", "prompts": [[ids], ...], "max_tokens": N,
     "kill_pid": PID, "kill_after_s": S}      (optionally SIGKILL a process meanwhile)
    {"op": "reset_prefix_cache"}
    {"op": "stop"}                                                           del the LLM
    {"op": "store_stats", "url": URL}                 a kvstored's stats, as a result

and the line printed after ``RESULTS_MARK`` is a JSON list of results: per generate, the
output token ids and ``num_cached_tokens`` of every prompt and the seconds it took.
vLLM starts its engine with spawn, hence the ``__main__`` guard.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
import threading
import time
from typing import Any

RESULTS_MARK = "kvstore-vllm-driver-results: "


def run(script: dict[str, Any]) -> list[dict[str, Any]]:
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    llm = None
    results: list[dict[str, Any]] = []
    for step in script["steps"]:
        op = step["op"]
        if op == "start":
            kwargs = dict(model=script["model"], skip_tokenizer_init=True, enforce_eager=True,
                          seed=0, disable_log_stats=False, **script.get("engine", {}))
            if step.get("connector") is not None:
                kwargs["kv_transfer_config"] = KVTransferConfig(
                    kv_connector="KVStoreConnector",
                    kv_connector_module_path="kvstore.integrations.vllm",
                    kv_role=step.get("role", "kv_both"),
                    kv_connector_extra_config=step["connector"])
            llm = LLM(**kwargs)
        elif op == "generate":
            assert llm is not None, "generate before start"
            params = SamplingParams(max_tokens=step.get("max_tokens", 8), temperature=0.0,
                                    ignore_eos=True)
            killer = None
            if step.get("kill_pid"):
                killer = threading.Timer(step.get("kill_after_s", 0.0), os.kill,
                                         (step["kill_pid"], signal.SIGKILL))
                killer.start()
            started = time.perf_counter()
            outputs = llm.generate([{"prompt_token_ids": p} for p in step["prompts"]],
                                   params, use_tqdm=False)
            seconds = time.perf_counter() - started
            if killer is not None:
                killer.join()
            results.append({"seconds": seconds,
                            "tokens": [list(o.outputs[0].token_ids) for o in outputs],
                            "num_cached_tokens": [o.num_cached_tokens for o in outputs]})
        elif op == "store_stats":
            import kvstore

            with kvstore.connect(step["url"]) as client:
                results.append({"stats": client.stats()})
        elif op == "reset_prefix_cache":
            assert llm is not None and llm.reset_prefix_cache()
        elif op == "stop":
            del llm
            llm = None
            gc.collect()
        else:
            raise ValueError(f"unknown step {op!r}")
    return results


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    with open(args[0]) as f:
        script = json.load(f)
    results = run(script)
    print(RESULTS_MARK + json.dumps(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

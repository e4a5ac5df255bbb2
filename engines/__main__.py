"""``python -m engines prefill|decode --url URL --model SPEC``: an engine in its own process.

It connects to a `kvstored` daemon and serves JSON lines on stdin/stdout, one request per
line, so a conductor (or a test) in another process drives it:

    prefill  in:  {"id": "r1", "prompt": [ids...], "max_new_tokens": 1, "temperature": 0,
                   "top_p": 1, "seed": null, "stop_token_ids": [2]}
             out: {"id": "r1", "first_token": 42, "num_cached_tokens": 0,
                   "num_published_blocks": 3, "ttft_s": 0.05}
    decode   in:  the same, plus an optional "first_token" from a prefill engine
             out: {"id": "r1", "tokens": [...], "num_cached_tokens": 48, ...}

A reply stops at ``max_new_tokens`` unless the request lists ``stop_token_ids`` (a chat
model's end-of-turn ids: SmolLM2's ``<|im_end|>`` is 2). A bad line gets ``{"id": ...,
"error": "..."}`` (its id when it had one) and the engine goes on. The default model is
``tiny``, random weights (no text): pass ``--model smollm2-135m`` for the real one.
`kvstore serve` runs its engines itself (an HTTP API); these processes are for driving
engines by hand or from another program.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from engines.decode import DecodeEngine
from engines.prefill import PrefillEngine
from engines.presets import load_model
from engines.sampling import SamplingParams


def sampling_of(request: dict[str, Any]) -> SamplingParams:
    return SamplingParams(max_new_tokens=int(request.get("max_new_tokens", 32)),
                          temperature=float(request.get("temperature", 0.0)),
                          top_p=float(request.get("top_p", 1.0)), seed=request.get("seed"),
                          stop_token_ids=tuple(request.get("stop_token_ids", ())))


def serve(role: str, engine: PrefillEngine | DecodeEngine, line: str) -> dict[str, Any]:
    request = json.loads(line)
    if not isinstance(request, dict) or not isinstance(request.get("prompt"), list):
        raise ValueError("a request is a JSON object with a \"prompt\" list of token ids")
    request_id = str(request.get("id", ""))
    prompt = [int(t) for t in request["prompt"]]
    if role == "prefill":
        assert isinstance(engine, PrefillEngine)
        result = engine.prefill(prompt, sampling_of(request), request_id=request_id)
        return {"id": request_id, "first_token": result.first_token,
                "num_cached_tokens": result.num_cached_tokens,
                "num_published_blocks": result.num_published_blocks, "ttft_s": result.ttft_s}
    assert isinstance(engine, DecodeEngine)
    first = request.get("first_token")
    done = engine.generate(prompt, sampling_of(request),
                           first_token=None if first is None else int(first))
    return {"id": request_id, "tokens": done.output,
            "num_cached_tokens": done.num_cached_tokens,
            "finish_reason": done.finish_reason.value if done.finish_reason else None,
            "first_token_s": done.first_token_s}


def _request_id(line: str) -> str | None:
    """The id of a request line, if it has one (for its error reply)."""
    try:
        request = json.loads(line)
    except ValueError:
        return None
    return str(request["id"]) if isinstance(request, dict) and "id" in request else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engines", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("role", choices=("prefill", "decode"))
    parser.add_argument("--url", required=True, help="the kvstored daemon, kvstore://HOST:PORT")
    parser.add_argument("--token", default=None, help="the daemon's tenant token, if any")
    parser.add_argument("--model", default="tiny",
                        help="preset (tiny and llama3-8b: random weights; smollm2-135m: the "
                             "real SmolLM2-135M-Instruct), checkpoint dir or .gguf "
                             "(default: tiny)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-pages", type=int, default=None,
                        help="pages in the engine's KV cache (default: fits the longest prompt)")
    parser.add_argument("--kv-codec", default="none", choices=("none", "fp8"),
                        help="store KV blocks as computed (none) or as fp8 (half the bytes, "
                             "lossy); prefill and decode engines must agree")
    args = parser.parse_args(argv)

    import kvstore
    from kvstore.errors import KVStoreError

    try:
        model = load_model(args.model, device=args.device).model
    except Exception as e:  # a missing package, file or preset
        print(f"python -m engines: cannot load --model {args.model}: {e}", file=sys.stderr)
        return 2
    try:
        client = kvstore.connect(args.url, token=args.token)
    except (KVStoreError, OSError, ValueError) as e:
        print(f"python -m engines: cannot use --url {args.url}: {e}", file=sys.stderr)
        return 2
    engine_class = PrefillEngine if args.role == "prefill" else DecodeEngine
    with client, engine_class(model, client, num_pages=args.num_pages,
                              kv_codec=args.kv_codec) as engine:
        print(json.dumps({"ready": args.role, "model": model.model_id}), flush=True)
        for line in sys.stdin:
            if not line.strip():
                continue
            try:
                reply = serve(args.role, engine, line)
            except (ValueError, TypeError, KeyError) as e:
                reply = {"id": _request_id(line), "error": f"{type(e).__name__}: {e}"}
            print(json.dumps(reply), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

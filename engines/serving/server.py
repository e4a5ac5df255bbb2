"""Starting `kvstore serve`: the model, the store, the engines and their conductor, then
the HTTP server (uvicorn) until SIGINT or SIGTERM; everything closed on the way out."""

from __future__ import annotations

import argparse
import contextlib
import logging
from typing import Any

log = logging.getLogger(__name__)

# What a preset is called in the API when --served-model-name is not given.
SERVED_NAMES = {"smollm2-135m": "SmolLM2-135M-Instruct"}


class StartError(Exception):
    """The server cannot start as asked (said in one line, no traceback)."""


def serve(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console(stderr=True)
    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        with contextlib.ExitStack() as stack:
            app = build(args, console, stack)
            return _listen(app, args, console)
    except StartError as e:
        console.print(f"[red]kvstore serve: {e}[/red]")
        return 2


def build(args: argparse.Namespace, console: Any, stack: contextlib.ExitStack) -> Any:
    """The FastAPI app over freshly started engines (closed by ``stack``)."""
    from engines.conductor import Conductor
    from engines.cost_model import calibrate, planner_for
    from engines.decode import DecodeEngine
    from engines.demo import open_store
    from engines.prefill import PrefillEngine
    from engines.presets import load_model
    from engines.serving.api import create_app
    from engines.serving.backend import Backend
    from kvstore.errors import KVStoreError

    if args.decode_engines < 1:
        raise StartError("--decode-engines must be at least 1")
    if args.prefill_engines < 0 or (args.mode == "disaggregated" and not args.prefill_engines):
        raise StartError("--mode disaggregated needs --prefill-engines 1 or more")
    if args.max_num_seqs < 1:
        raise StartError("--max-num-seqs must be at least 1")
    if args.max_num_batched_tokens is not None and (
            args.max_num_batched_tokens < args.max_num_seqs):
        raise StartError("--max-num-batched-tokens must be at least --max-num-seqs (each "
                         "decoding request takes a token a step)")
    with console.status(f"loading {args.model} ..."):
        try:
            loaded = load_model(args.model, device=args.device)
        except Exception as e:  # a missing package, file or preset: one line
            raise StartError(f"cannot load --model {args.model}: {e}") from e
    model, tokenizer = loaded.model, loaded.tokenizer
    if tokenizer is None:
        raise StartError(f"--model {args.model} has no tokenizer (a random preset?): text "
                         "cannot be served; use smollm2-135m or a checkpoint with one")
    limit = model.config.max_position_tokens
    max_model_len = args.max_model_len or limit
    if not 1 < max_model_len <= limit:
        raise StartError(f"--max-model-len must be in 2..{limit} (the model's), got "
                         f"{max_model_len}")
    block_bytes = model.config.kv_layout(16, model.dtype).block_bytes
    try:
        store, close_store = open_store(args, block_bytes)
    except (KVStoreError, OSError, ValueError) as e:
        where = f"--url {args.url}" if args.url else "the embedded store"
        raise StartError(f"cannot open {where}: {e}") from e
    stack.callback(close_store)
    pages = args.num_pages or 2 * -(-max_model_len // 16)
    with console.status("starting the engines and measuring the cost model ..."):
        decode = [DecodeEngine(model, store, num_pages=pages, max_batch=args.max_num_seqs,
                               kv_codec=args.kv_codec,
                               max_step_tokens=args.max_num_batched_tokens)
                  for _ in range(args.decode_engines)]
        prefill = [PrefillEngine(model, store, num_pages=pages, kv_codec=args.kv_codec)
                   for _ in range(args.prefill_engines)]
        cost = calibrate(model, decode[0].io, lengths=[16, 128, 320], num_blocks=8)
        planner = planner_for(decode[0].io, cost)
        for engine in [*prefill, *decode]:
            engine.planner = planner
        conductor = stack.enter_context(Conductor(prefill, decode, cost=cost, mode=args.mode))
    name = args.served_model_name or _served_name(args.model)
    backend = Backend(conductor, tokenizer, model_name=name, max_model_len=max_model_len)
    backend.metrics.watch(conductor)
    app = create_app(backend, api_key=args.api_key)
    console.print(f"[green]serving {name}[/green] ({args.model}, {args.device}, mode "
                  f"{args.mode}: {len(prefill)} prefill, {len(decode)} decode engines; store "
                  f"{args.url or 'embedded'}) on http://{args.host}:{args.port}/v1")
    return app


def _listen(app: Any, args: argparse.Namespace, console: Any) -> int:
    import uvicorn

    config = uvicorn.Config(app, host=args.host, port=args.port,
                            log_level=args.log_level.lower(), timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    server.run()
    if not server.started:  # (the port taken, say: uvicorn logged why)
        console.print(f"[red]kvstore serve: could not listen on {args.host}:{args.port}[/red]")
        return 1
    return 0


def _served_name(model: str) -> str:
    return SERVED_NAMES.get(model, model)

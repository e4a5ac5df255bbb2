"""Starting `kvstore serve`: the model's shape and tokenizer, the shared store, the engine
processes (`engines.processes`) and their conductor, then the HTTP server (uvicorn) until
SIGINT or SIGTERM; everything stopped on the way out."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import tempfile
from dataclasses import replace
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
    """The FastAPI app over freshly started engine processes (stopped by ``stack``)."""
    import torch

    from engines.conductor import Conductor, Objectives
    from engines.presets import default_dtype, load_shape
    from engines.processes import EngineProcess, EngineSpec, EngineStartError
    from engines.serving.api import create_app
    from engines.serving.backend import Backend

    if args.decode_engines < 1:
        raise StartError("--decode-engines must be at least 1")
    if args.prefill_engines < 0 or (args.mode == "disaggregated" and not args.prefill_engines):
        raise StartError("--mode disaggregated needs --prefill-engines 1 or more")
    if (args.ttft_slo is None) != (args.itl_slo is None):
        raise StartError("--ttft-slo and --itl-slo go together")
    if args.ttft_slo is not None and not (args.ttft_slo > 0 and args.itl_slo > 0):
        raise StartError("--ttft-slo and --itl-slo must be positive seconds")
    if args.max_num_seqs < 1:
        raise StartError("--max-num-seqs must be at least 1")
    if args.max_num_batched_tokens is not None and (
            args.max_num_batched_tokens < args.max_num_seqs):
        raise StartError("--max-num-batched-tokens must be at least --max-num-seqs (each "
                         "decoding request takes a token a step)")
    devices = {role: getattr(args, f"{role}_device") or args.device
               for role in ("prefill", "decode")}
    for role, name in devices.items():
        flag = f"--{role}-device" if getattr(args, f"{role}_device") else "--device"
        try:
            device = torch.device(name)
        except RuntimeError as e:
            raise StartError(f"{flag} {name}: {e}") from e
        if device.type == "cuda" and not torch.cuda.is_available():
            raise StartError(f"{flag} {name}: CUDA is not available")
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise StartError(f"{flag} {name}: this machine has {torch.cuda.device_count()} "
                             "GPUs")
    if len({torch.device(name).type for name in devices.values()}) != 1:
        raise StartError("--prefill-device and --decode-device must be the same kind of "
                         "device (CPU engines keep float32 KV, GPU engines bfloat16: they "
                         "would share no blocks)")
    device = torch.device(devices["decode"])
    # The model's shape and tokenizer, here; its weights live in the engine processes.
    with console.status(f"reading {args.model} ..."):
        try:
            config, tokenizer = load_shape(args.model)
        except Exception as e:  # a missing package, file or preset: one line
            raise StartError(f"cannot load --model {args.model}: {e}") from e
    if args.skip_tokenizer_init:
        tokenizer = None
    elif tokenizer is None:
        raise StartError(f"--model {args.model} has no tokenizer (a random preset?): text "
                         "cannot be served; use smollm2-135m or a checkpoint with one, or "
                         "--skip-tokenizer-init to serve token ids")
    limit = config.max_position_tokens
    max_model_len = args.max_model_len or limit
    if not 1 < max_model_len <= limit:
        raise StartError(f"--max-model-len must be in 2..{limit} (the model's), got "
                         f"{max_model_len}")
    store_url, store = _shared_store(args, config.kv_layout(16, default_dtype(device))
                                     .block_bytes, stack)
    pages = args.num_pages or 2 * -(-max_model_len // 16)
    spec = EngineSpec(role="decode", model=args.model, store_url=store_url,
                      device=devices["decode"], num_pages=pages, max_batch=args.max_num_seqs,
                      max_step_tokens=args.max_num_batched_tokens, kv_codec=args.kv_codec,
                      log_level=args.log_level)
    # The first decode engine measures the cost model and, where the store tells tiers,
    # each tier's fetch cost (a fetch planner) alone (the others' start would skew them);
    # then the others start together, planning with its costs.
    first = EngineProcess(replace(spec, calibrate_lengths=(16, 128, 320)), "d0", store)
    try:
        with console.status("starting the first engine and measuring the cost model ..."):
            _start([first], stack)
        spec = replace(spec, planner_costs=first.planner_costs)
        rest = ([EngineProcess(spec, f"d{i}", store) for i in range(1, args.decode_engines)]
                + [EngineProcess(replace(spec, role="prefill", device=devices["prefill"]),
                                 f"p{i}", store)
                   for i in range(args.prefill_engines)])
        with console.status(f"starting {len(rest)} more engine processes ..."):
            _start(rest, stack)
    except EngineStartError as e:
        raise StartError(str(e)) from e
    assert first.cost is not None, "the first engine measured the cost model"
    tiers = (first.planner_costs or {}).get("tiers")
    log.info("fetch planner: %s", f"each tier's fetch cost (s a fetch, s a block) {tiers}"
             if tiers else "none (the store tells no tiers, or they could not be measured): "
             "every cached block is loaded")
    decode = [first, *[w for w in rest if w.spec.role == "decode"]]
    prefill = [w for w in rest if w.spec.role == "prefill"]
    objectives = (Objectives(args.ttft_slo, args.itl_slo) if args.ttft_slo is not None
                  else None)
    # A pool's client (--url kvstore+cluster://...) tells where each prefix lives in one
    # round trip: the conductor asks it, not each engine.
    pool = store if hasattr(store, "locate") else None
    conductor = Conductor(prefill, decode, cost=first.cost, mode=args.mode,
                          objectives=objectives, pool=pool)
    name = args.served_model_name or _served_name(args.model)
    backend = Backend(conductor, tokenizer, model_name=name, max_model_len=max_model_len,
                      vocab_size=config.vocab_size, eos_token_ids=config.eos_token_ids)
    backend.metrics.watch(conductor)
    app = create_app(backend, api_key=args.api_key)
    where = (args.device if len(set(devices.values())) == 1 else
             f"prefill on {devices['prefill']}, decode on {devices['decode']}")
    console.print(f"[green]serving {name}[/green] ({args.model}, {where}, mode "
                  f"{args.mode}: {len(prefill)} prefill, {len(decode)} decode engine "
                  f"processes; store {args.url or store_url + ' (embedded)'}) on "
                  f"http://{args.host}:{args.port}/v1")
    return app


def _start(workers: list[Any], stack: contextlib.ExitStack) -> None:
    """Start ``workers`` together and wait for each (each stopped by ``stack``)."""
    for worker in workers:
        worker.start()
        stack.callback(worker.close)
    for worker in workers:
        worker.wait_ready()


def _shared_store(args: argparse.Namespace, block_bytes: int,
                  stack: contextlib.ExitStack) -> tuple[str, Any]:
    """(URL, this process's client) of the store the engine processes share: ``--url``,
    or a kvstored served from a thread of this process (`daemon.embedded`: DRAM, and
    NVMe if asked), which same-host engines reach through shared memory."""
    import kvstore
    from kvstore.errors import KVStoreError
    from kvstore.units import parse_size

    url = args.url
    try:
        if url is None:
            from daemon.embedded import EmbeddedDaemon

            nvme_bytes = parse_size(args.nvme, what="--nvme")
            nvme_path = None
            if nvme_bytes:
                nvme_path = args.nvme_path or stack.enter_context(
                    tempfile.TemporaryDirectory(prefix="kvstore-serve-"))
            daemon = EmbeddedDaemon(dram_bytes=parse_size(args.dram, what="--dram"),
                                    nvme_path=nvme_path, nvme_bytes=nvme_bytes,
                                    max_value_bytes=block_bytes)
            stack.callback(daemon.close)
            url = daemon.url
        client = kvstore.connect(url)
    except (KVStoreError, OSError, ValueError) as e:
        where = f"--url {args.url}" if args.url else "the embedded store"
        raise StartError(f"cannot open {where}: {e}") from e
    stack.callback(client.close)
    return url, client


def _listen(app: Any, args: argparse.Namespace, console: Any) -> int:
    import uvicorn

    config = uvicorn.Config(app, host=args.host, port=args.port,
                            log_level=args.log_level.lower(), timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    # uvicorn raises the signal that stopped it again once it is done, to its handler
    # from before: the default one would end this process on the spot, leaving the
    # engines and the store (its shared memory) to nobody. Here the stack stops them.
    stopped_by: list[int] = []
    before = {sig: signal.signal(sig, lambda number, _: stopped_by.append(number))
              for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    if stopped_by:
        console.print("stopping the engines and the store ...")
    if not server.started:  # (the port taken, say: uvicorn logged why)
        console.print(f"[red]kvstore serve: could not listen on {args.host}:{args.port}[/red]")
        return 1
    return 0


def _served_name(model: str) -> str:
    return SERVED_NAMES.get(model, model)

#!/usr/bin/env python3
"""The forward of a few tokens over a long cached context on a GPU, beside the time to read
the model's weights once from HBM (`llama3-8b` preset: Llama 3 8B's shapes, seeded random
weights, bf16).

    decode   one token over ``context`` cached ones, then its greedy sample on the host:
             a decode step as the engine takes it (its inter-token latency, batch of one)
    batch    a decode step of ``--batch`` sequences, each over ``context`` cached tokens
    tail     16 new tokens over ``context`` cached ones, logits of the last: the forward
             behind the time to first token of a prompt whose prefix came from the store
    bound    the weights every forward reads (all but the embedding table, which a
             forward reads a row of), over HBM's read bandwidth measured in the same run
             (a reduction over a buffer of 4 GiB: the most a kernel reads per second)

Each arm runs on a cache of its own: ``paged``, as the engines run (a decode step, and a
forward of several sequences up to 64 tokens, in graphs holding paged attention,
`engines.paged_attention`; one sequence's tail with eager SDPA between the graph pieces),
and ``eager`` (attention eager between the pieces for every forward, as before paged
attention). The figures repeat one context length, except ``decode_growing``: one
sequence's decode steps each over one more cached token, as a server's are (a kernel
that plans per shape pays for it there: ``--sdpa-cudnn`` lets eager attention use cuDNN's,
which the engines keep off). Medians of ``--steps``
timed forwards after a warm-up, over ``--repeats`` runs (the median run). JSON on stdout:
each figure, the bound and their ratio (issue 18's target: the decode step and the tail
within 1.3x of the bound).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

import torch  # noqa: E402

from benchmarks.store_bench import emit, log  # noqa: E402
from benchmarks.torch_trace import traced  # noqa: E402
from engines import paged_attention  # noqa: E402
from engines.model import LlamaModel  # noqa: E402
from engines.paged_cache import SequenceKV  # noqa: E402
from engines.presets import load_model  # noqa: E402

TARGET = 1.3  # issue 18: the decode step and the cached tail within 1.3x of the bound
TAIL_TOKENS = 16
PREFILL_CHUNK = 8192  # a long context is prefilled in chunks of this many tokens


def hbm_read_gbps(repeats: int = 10) -> float:
    """The most a kernel reads from HBM per second: a sum over 4 GiB of bf16."""
    buffer = torch.ones(2 << 30, dtype=torch.bfloat16, device="cuda")
    buffer.sum(dtype=torch.float32)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        buffer.sum(dtype=torch.float32)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    nbytes = buffer.numel() * buffer.element_size()
    del buffer
    torch.cuda.empty_cache()
    return nbytes / min(times) / 1e9


def forward_weight_bytes(model: LlamaModel) -> int:
    """Bytes of the weights a forward reads whole (not the embedding table, of which it
    reads a row a token, unless it is also the output head)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.model.embed_tokens.weight
    return total - (0 if model.lm_head is None else embed.numel() * embed.element_size())


def prompt_of(model: LlamaModel, n: int, seed: int) -> list[int]:
    return torch.randint(0, model.config.vocab_size, (n,),
                         generator=torch.Generator().manual_seed(seed)).tolist()


def timed(step, count: int) -> float:
    """Median seconds of ``count`` calls of ``step`` (each ends on the host: a sample)."""
    times = []
    for _ in range(count):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_context(model: LlamaModel, context: int, batch: int, steps: int,
                  profile_dir: str | None = None) -> dict[str, Any]:
    """Decode, batched decode and tail times over ``context`` cached tokens, per arm."""
    out: dict[str, Any] = {"context": context}
    for arm in ("paged", "eager"):
        model.paged_attention = arm == "paged"
        out[arm] = bench_arm(model, context, batch, steps,
                             None if profile_dir is None else (profile_dir, f"{arm}-{context}"))
        torch.cuda.empty_cache()
    model.paged_attention = True
    return out


def bench_arm(model: LlamaModel, context: int, batch: int, steps: int,
              profile: tuple[str, str] | None = None) -> dict[str, Any]:
    """One arm's figures, on a cache of its own (its graphs made as the model says). With
    ``profile`` (a directory, a name): then three decode steps and three tails under
    torch's profiler, their Chrome trace written as ``DIR/NAME.json.gz``."""
    page_tokens = 16
    room = context + steps + 2 * TAIL_TOKENS + 8
    cache = model.new_cache(num_pages=-(-room // page_tokens) * batch, cuda_graphs=True)
    seqs = [SequenceKV() for _ in range(batch)]
    prompt = prompt_of(model, context, seed=context)
    for seq in seqs:
        assert cache.reserve(seq, room)
        for at in range(0, context, PREFILL_CHUNK):
            model.forward(cache, [(seq, prompt[at:at + PREFILL_CHUNK])])
    torch.cuda.synchronize()
    one = seqs[0]
    tail_tokens = prompt_of(model, TAIL_TOKENS, seed=1)

    def decode() -> None:
        logits = model.forward(cache, [(one, [1])])
        int(logits[0].argmax())
        one.num_tokens -= 1  # the same context every step

    def decode_batch() -> None:
        logits = model.forward(cache, [(seq, [1]) for seq in seqs])
        logits.argmax(dim=-1).tolist()
        for seq in seqs:
            seq.num_tokens -= 1

    def tail() -> None:
        logits = model.forward(cache, [(one, tail_tokens)])
        int(logits[0].argmax())
        one.num_tokens -= TAIL_TOKENS

    def decode_growing() -> None:  # one more cached token each step, as in a server
        logits = model.forward(cache, [(one, [1])])
        int(logits[0].argmax())

    figures: dict[str, Any] = {}
    arms = [("decode", decode), ("tail", tail)] + ([("batch", decode_batch)] if batch > 1
                                                    else []) + [("decode_growing",
                                                                 decode_growing)]
    for name, step in arms:
        step()  # captures this bucket's graphs
        torch.cuda.synchronize()
        figures[f"{name}_ms"] = round(timed(step, steps) * 1e3, 3)
    if profile is not None:
        traced(*profile, lambda: [step() for step in (decode, decode, decode, tail, tail, tail)])
    # whether the batched step's graphs held attention
    figures["fused"] = cache.has_graphs and model.graphs(cache).for_tokens(batch, batch).fused
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama3-8b")
    parser.add_argument("--contexts", default="2048,8192,32768")
    parser.add_argument("--batch", type=int, default=8,
                        help="sequences in the batched decode step (1: no batched arm)")
    parser.add_argument("--steps", type=int, default=30, help="timed forwards per figure")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sdpa-cudnn", action="store_true",
                        help="let the eager forward's SDPA use cuDNN's attention too (the "
                             "engines keep it off: it plans per shape; this measures that)")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="in the first run, three decode steps and three tails per "
                             "context and arm under torch's profiler: Chrome traces in DIR")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)
    if args.sdpa_cudnn:
        from torch.nn.attention import SDPBackend

        import engines.model

        engines.model.SDPA_BACKENDS = [SDPBackend.CUDNN_ATTENTION, *engines.model.SDPA_BACKENDS]
    if not torch.cuda.is_available():
        print("decode_bench needs a CUDA GPU", file=sys.stderr)
        return 2
    started = time.perf_counter()
    log(f"loading {args.model}")
    model = load_model(args.model, device="cuda").model
    weights = forward_weight_bytes(model)
    doc: dict[str, Any] = {"benchmark": "decode_bench", "model": model.model_id, "machine": {},
                           "dtype": str(model.dtype), "gpu": torch.cuda.get_device_name(),
                           "triton": paged_attention.available(torch.device("cuda")),
                           "sdpa_cudnn": args.sdpa_cudnn,
                           "weight_bytes": weights, "runs": [], "contexts": []}
    for run in range(args.repeats):
        read = hbm_read_gbps()
        bound_ms = weights / read / 1e6
        log(f"run {run + 1}: HBM read {read:.0f} GB/s, weights' read {bound_ms:.2f} ms")
        doc["runs"].append({"hbm_read_gbps": round(read, 1), "bound_ms": round(bound_ms, 3),
                            "contexts": [bench_context(model, int(c), args.batch, args.steps,
                                                       args.profile if run == 0 else None)
                                         for c in args.contexts.split(",")]})
    bounds = [r["bound_ms"] for r in doc["runs"]]
    doc["bound_ms"] = statistics.median(bounds)
    for i, context in enumerate(args.contexts.split(",")):
        summary: dict[str, Any] = {"context": int(context)}
        for arm in ("paged", "eager"):
            for name in ("decode_ms", "tail_ms", "batch_ms", "decode_growing_ms"):
                values = [r["contexts"][i][arm].get(name) for r in doc["runs"]]
                if None in values:
                    continue
                median = statistics.median(values)
                summary[f"{arm}_{name}"] = median
                if name != "batch_ms":
                    summary[f"{arm}_{name[:-3]}_over_bound"] = round(median / doc["bound_ms"], 3)
        doc["contexts"].append(summary)
    doc["target_over_bound"] = TARGET
    emit(doc, started, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

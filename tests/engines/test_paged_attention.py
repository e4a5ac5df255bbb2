"""Paged attention in Triton: the tiles' table on the host, the kernels against SDPA on the
GPU, and the forward's graphs that hold it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from engines import paged_attention
from engines.paged_attention import (
    PagedAttention,
    fill_tiles,
    splits_for,
    supports,
    tile_rows_for,
)
from engines.paged_cache import SequenceKV
from engines.presets import load_model


def test_tiles_cut_each_sequence_into_runs_of_tile_rows_in_row_order():
    tiles = torch.full((4, 12), 7, dtype=torch.long)
    # (cached tokens, new tokens): a decode row, a tail of 5 (tiles of 2: 2, 2, 1), a
    # fresh prompt of 3.
    fill_tiles(tiles, [(100, 1), (40, 5), (0, 3)], tile_rows=2)
    assert tiles[:, :6].tolist() == [[0, 1, 1, 1, 2, 2],       # sequence
                                     [0, 1, 3, 5, 6, 8],       # first row
                                     [1, 2, 2, 1, 2, 1],       # rows
                                     [100, 40, 42, 44, 0, 2]]  # first row's position
    assert tiles[:, 6:].tolist() == [[0] * 6] * 4  # no tile: the programs there do nothing


def test_tile_rows_splits_and_supported_shapes():
    assert tile_rows_for(32, 8) == 16 and tile_rows_for(9, 3) == 16
    assert tile_rows_for(64, 2) == 2 and tile_rows_for(128, 1) == 1
    assert splits_for(1) == 32 and splits_for(16) == 32 and splits_for(64) == 8
    assert splits_for(512) == 1
    assert supports(32, 8, 128) and supports(9, 3, 64)
    assert not supports(32, 8, 96) and not supports(12, 8, 128) and not supports(4, 2, 8)
    assert not paged_attention.available(torch.device("cpu"))


def reference(q, kv, pages, start, n):
    """SDPA of ``q`` (``[n, heads, dim]``) over a sequence's first ``start + n`` tokens."""
    flat = kv[:, pages].reshape(2, -1, kv.shape[3], kv.shape[4])[:, :start + n].float()
    mask = None if n == 1 or start == 0 else causal_lower_right(n, start + n)
    out = F.scaled_dot_product_attention(
        q.float().transpose(0, 1)[None], flat[0].transpose(0, 1)[None],
        flat[1].transpose(0, 1)[None], attn_mask=mask, is_causal=n > 1 and start == 0,
        enable_gqa=True)
    return out[0].transpose(0, 1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("heads", [(32, 8, 128), (4, 2, 32), (9, 3, 64)])
def test_paged_attention_is_sdpa_over_each_sequences_pages(dtype, heads):
    """A ragged batch over scattered pages: decode rows over long and short contexts (many
    splits, some empty), a tail of 37 tokens (three tiles), a fresh prompt; padding rows
    come out zero."""
    if not paged_attention.available(torch.device("cuda")):
        pytest.skip("Triton is not installed")
    num_heads, num_kv_heads, dim = heads
    page_tokens, num_pages = 16, 400
    g = torch.Generator(device="cuda").manual_seed(0)
    kv = torch.randn(2, num_pages + 1, page_tokens, num_kv_heads, dim, device="cuda",
                     generator=g).to(dtype)
    order = torch.randperm(num_pages, generator=torch.Generator().manual_seed(1)).tolist()
    # (cached tokens, new tokens), each sequence on pages taken from a shuffled pool
    chunks = [(3000, 1), (5, 1), (700, 37), (0, 20), (63, 1)]
    batch, at = [], 0
    for start, n in chunks:
        need = -(-(start + n) // page_tokens)
        batch.append((SequenceKV(pages=order[at:at + need], num_tokens=start), n))
        at += need
    rows = sum(n for _, n in chunks)
    num_rows = 64
    attention = PagedAttention(num_rows=num_rows, num_heads=num_heads,
                               num_kv_heads=num_kv_heads, head_dim=dim,
                               page_tokens=page_tokens, device=torch.device("cuda"))
    qkv = torch.randn(num_rows, num_heads + 2 * num_kv_heads, dim, device="cuda",
                      generator=g).to(dtype)
    q = qkv[:, :num_heads]  # strided, as the forward's queries are
    tiles = torch.zeros(4, num_rows, dtype=torch.long)
    fill_tiles(tiles, chunks, attention.tile_rows)
    width = max(len(seq.pages) for seq, _ in batch)
    pages = torch.zeros(num_rows, width, dtype=torch.int32)
    for i, (seq, _) in enumerate(batch):
        pages[i, :len(seq.pages)] = torch.tensor(seq.pages)
    valid = torch.zeros(num_rows, dtype=torch.long)
    valid[:rows] = 1
    out = torch.full((num_rows, num_heads, dim), float("nan"), dtype=dtype, device="cuda")
    attention(q, kv, tiles.cuda(), pages.cuda(), valid.cuda(), out)
    tolerance = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    row = 0
    for (seq, n), (start, _) in zip(batch, chunks, strict=True):
        want = reference(q[row:row + n], kv, seq.pages, start, n)
        torch.testing.assert_close(out[row:row + n].float(), want, rtol=tolerance,
                                   atol=tolerance)
        row += n
    assert not out[rows:].any()


@pytest.mark.gpu
def test_short_forwards_hold_their_attention_in_the_graphs_unless_turned_off(monkeypatch):
    from engines import cuda_graphs

    monkeypatch.setattr(cuda_graphs, "FUSE_PACED", True)
    model = load_model("tiny", device="cuda", dtype=torch.float32).model
    if not paged_attention.available(torch.device("cuda")):
        pytest.skip("Triton is not installed")
    cache = model.new_cache(num_pages=8, cuda_graphs=True)
    graphs = model.graphs(cache)
    # several sequences up to 64 tokens, or one sequence's decode step: fused; a tail of
    # one sequence, or more tokens: eager SDPA
    assert graphs.for_tokens(2, 2).fused and graphs.for_tokens(64, 3).fused
    assert graphs.for_tokens(1).fused and not graphs.for_tokens(16, 1).fused
    # a lone tail whose layers wait for a load runs each layer as one graph (FUSE_PACED)
    assert graphs.for_tokens(16, 1, paced=True).fused
    assert not graphs.for_tokens(65, 1, paced=True).fused
    assert not graphs.for_tokens(65, 2).fused
    eager_attention = load_model("tiny", device="cuda", dtype=torch.float32).model
    eager_attention.paged_attention = False
    other = eager_attention.new_cache(num_pages=8, cuda_graphs=True)
    assert not eager_attention.graphs(other).for_tokens(2, 2).fused


@pytest.mark.gpu
def test_bf16_decode_over_a_long_context_matches_the_eager_forward():
    """Llama-style heads (a group of 4 query heads a KV head) in bf16: a 2,000-token prompt,
    then decode steps of two sequences, graphs with paged attention against the eager
    forward (SDPA), to bf16's rounding."""
    from engines.config import ModelConfig

    config = ModelConfig(name="gqa4", vocab_size=512, hidden_size=256,
                         intermediate_size=512, num_layers=2, num_heads=8, num_kv_heads=2,
                         head_dim=32, rope_theta=10000.0, rms_norm_eps=1e-5,
                         max_position_tokens=8192)
    from engines.model import LlamaModel

    model = LlamaModel.random(config, seed=3, dtype=torch.bfloat16, device="cuda")
    prompts = [torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (2000, 300)]
    logits = []
    for graphs in (False, True):
        cache = model.new_cache(num_pages=160, cuda_graphs=graphs)
        seqs = [SequenceKV(), SequenceKV()]
        out = []
        for seq, prompt in zip(seqs, prompts, strict=True):
            cache.reserve(seq, len(prompt) + 8)
            out.append(model.forward(cache, [(seq, prompt)]))
        for step in range(8):
            out.append(model.forward(cache, [(seqs[0], [step]), (seqs[1], [step + 1])]))
        logits.append(out)
    for eager, graphed in zip(*logits, strict=True):
        torch.testing.assert_close(graphed.float(), eager.float(), rtol=0.05, atol=0.05)


@pytest.mark.gpu
def test_graphs_whose_paged_kernels_fail_run_attention_eagerly(monkeypatch, caplog):
    """A failure of the paged kernels (a compile error, say) costs the graphs their
    attention, not the forward: it gives the eager logits, and says why."""
    model = load_model("tiny", device="cuda", dtype=torch.float32).model
    if not paged_attention.available(torch.device("cuda")):
        pytest.skip("Triton is not installed")

    def broken(*args, **kwargs):
        raise ValueError("no kernel today")

    monkeypatch.setattr(PagedAttention, "__call__", broken)
    prompt = torch.randint(0, 512, (20,), generator=torch.Generator().manual_seed(5)).tolist()

    def batch():  # two sequences: a forward the fused graphs would take
        return [(SequenceKV(pages=[0, 1]), prompt[:12]), (SequenceKV(pages=[2]), prompt[12:])]

    want = model.forward(model.new_cache(num_pages=4), batch())
    cache = model.new_cache(num_pages=4, cuda_graphs=True)
    with caplog.at_level("WARNING", logger="engines.cuda_graphs"):
        got = model.forward(cache, batch())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert "paged attention failed in the graphs of 32 tokens (ValueError" in caplog.text
    graphs = model.graphs(cache)
    assert graphs.captured == {32: True} and not graphs.paged
    assert not graphs.for_tokens(20, 2).fused


INTERPRETED_FORWARD = r"""
import torch
from engines import paged_attention as pa
from engines.paged_cache import SequenceKV, to_device
from engines.presets import load_model

model = load_model("tiny").model  # fp32 on the CPU
config = model.config


def paged_forward(cache, batch):
    # The fused graphs' forward, kernels interpreted on the CPU: each layer's attention by
    # PagedAttention over the tables BucketGraphs.start builds, for the forward's bucket
    # (a lone decode step's: one row, its splits).
    from engines.cuda_graphs import bucket_for
    lengths = [len(tokens) for _, tokens in batch]
    tokens = [t for _, chunk in batch for t in chunk]
    n = len(tokens)
    rows = bucket_for(n)
    positions = torch.cat([torch.arange(s.num_tokens, s.num_tokens + k)
                           for (s, _), k in zip(batch, lengths)])
    slots = torch.cat([s.slots(s.num_tokens, s.num_tokens + k, cache.page_tokens)
                       for (s, _), k in zip(batch, lengths)])
    attend = pa.PagedAttention(num_rows=rows, num_heads=config.num_heads,
                               num_kv_heads=config.num_kv_heads, head_dim=config.head_dim,
                               page_tokens=cache.page_tokens, device=torch.device("cpu"))
    tiles = torch.zeros(4, rows, dtype=torch.long)
    pa.fill_tiles(tiles, [(s.num_tokens, k) for (s, _), k in zip(batch, lengths)],
                  attend.tile_rows)
    width = max(-(-(s.num_tokens + k) // cache.page_tokens) for (s, _), k in zip(batch, lengths))
    tables = pa.page_tables([s.pages for s, _ in batch], width, pin=False)
    valid = torch.zeros(rows, dtype=torch.long)
    valid[:n] = 1
    h = torch.zeros(rows, config.hidden_size)
    h[:n] = model.embed(torch.tensor(tokens))
    cos, sin = model.rope_tables(torch.cat([positions, torch.zeros(rows - n, dtype=torch.long)]))
    pad_slots = torch.cat([slots, torch.full((rows - n,), cache.num_pages * cache.page_tokens)])
    out = torch.empty(rows, config.num_heads, config.head_dim)
    for i in range(config.num_layers):
        q = model.layer_in(cache, i, h, cos, sin, pad_slots)
        attend(q, cache.kv[i], tiles, tables, valid, out)
        h = model.layer_out(i, h, out)
    ends = torch.tensor(lengths).cumsum(0) - 1
    for (s, _), k in zip(batch, lengths):
        s.num_tokens += k
    return model._logits(model.model.norm(h[:n][ends]))


def caches():
    # pages handed out interleaved, so that no sequence's pages are consecutive; one spare
    # page at the end for the padding rows (as a graph cache has)
    from engines.paged_cache import PagedKVCache
    eager = model.new_cache(num_pages=40)
    paged = PagedKVCache(config, num_pages=40, page_tokens=16, dtype=torch.float32)
    paged.kv = [torch.zeros(2, 41, 16, config.num_kv_heads, config.head_dim)
                for _ in range(config.num_layers)]
    return eager, paged


g = torch.Generator().manual_seed(0)
prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (150, 37, 90)]
eager, paged = caches()
pages = [list(range(j, 39, 3))[:11] for j in range(3)]
worst = 0.0
for cache, run in ((eager, "eager"), (paged, "paged")):
    seqs = [SequenceKV(pages=list(p)) for p in pages]
    steps = [[(seqs[0], prompts[0][:100])], [(seqs[1], prompts[1])],
             [(seqs[0], prompts[0][100:101]), (seqs[1], [5]), (seqs[2], prompts[2][:40])],
             [(seqs[0], prompts[0][101:]), (seqs[2], prompts[2][40:41])],
             [(seqs[0], [1]), (seqs[1], [2]), (seqs[2], [3])], [(seqs[1], [4])]]
    logits = []
    for step in steps:
        if run == "eager" or sum(len(t) for _, t in step) > 64:
            logits.append(model.forward(cache, step))
        else:
            logits.append(paged_forward(cache, step))
    if run == "eager":
        want = logits
    else:
        for got, ref in zip(logits, want):
            worst = max(worst, (got - ref).abs().max().item())
print("worst", worst)
assert worst < 1e-4, worst
"""


def test_the_fused_forwards_tables_give_the_eager_logits_interpreted_on_the_cpu(tmp_path):
    """The tables a fused forward builds (tiles from each sequence's cached tokens, page
    tables of scattered pages, valid rows) and the kernels, run by Triton's interpreter
    on the CPU: decode rows, tails over a cached prefix and fresh prompts in one batch give
    the eager forward's logits. (Needs Triton: skipped where it is not installed.)"""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys

    script = tmp_path / "interpreted.py"
    script.write_text(INTERPRETED_FORWARD)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            timeout=600, cwd=root,
                            env={**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": root})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "worst" in result.stdout

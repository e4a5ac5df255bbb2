"""Piecewise CUDA graphs of the forward: the same logits and cache as the eager forward."""

from __future__ import annotations

import pytest
import torch

from engines.cuda_graphs import BUCKETS, bucket_for
from engines.paged_cache import PagedKVCache, SequenceKV
from engines.presets import load_model


def test_bucket_for_is_the_smallest_bucket_that_holds_the_tokens():
    assert [bucket_for(n) for n in (1, 2, 3, 4, 5, 16, 17, 512)] == [1, 2, 4, 4, 8, 16, 32,
                                                                     512]
    assert bucket_for(BUCKETS[-1] + 1) is None
    assert all(bucket_for(n) >= n for n in range(1, BUCKETS[-1] + 1))


def test_a_cpu_cache_has_no_graphs_and_no_pad_page():
    model = load_model("tiny").model
    cache = model.new_cache(num_pages=4, cuda_graphs=True)
    assert not cache.has_graphs and cache.pad_slot is None
    assert cache.kv[0].shape[1] == 4
    with pytest.raises(ValueError, match="cuda_graphs"):
        model.graphs(cache)


@pytest.fixture(scope="module")
def model():
    return load_model("tiny", device="cuda", dtype=torch.float32).model


def prompt_of(n: int, seed: int) -> list[int]:
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run_both(model, chunks_of, num_pages=64, paced=True):
    """Forwards over an eager cache and a graph cache, chunk after chunk (each step a batch
    of (sequence index, tokens)); returns both caches, their sequences and the logits.
    ``paced``: with layer hooks, as a forward that a load paces (a lone tail then runs
    fused graphs); without, a lone tail runs eager SDPA between the graph pieces."""
    runs = []
    for graphs in (False, True):
        cache = model.new_cache(num_pages=num_pages, cuda_graphs=graphs)
        seqs = [SequenceKV() for _ in range(max(i for step in chunks_of for i, _ in step) + 1)]
        logits: list[torch.Tensor] = []
        calls: list[tuple[str, int]] = []
        record = calls.append  # bound now, not when the hook runs
        for step in chunks_of:
            for i, tokens in step:
                assert cache.reserve(seqs[i], seqs[i].num_tokens + len(tokens))
            logits.append(model.forward(
                cache, [(seqs[i], tokens) for i, tokens in step],
                before_layer=(lambda layer, log=record: log(("before", layer))) if paced
                else None,
                after_layer=lambda layer, log=record: log(("after", layer))))
        runs.append((cache, seqs, logits, calls))
    return runs


@pytest.mark.gpu
@pytest.mark.parametrize("paced", [True, False])
@pytest.mark.parametrize("fuse_paced", [True, False])
def test_graphs_give_the_eager_logits_and_cache_for_tails_over_a_cached_prefix(
        model, paced, fuse_paced, monkeypatch):
    from engines import cuda_graphs

    monkeypatch.setattr(cuda_graphs, "FUSE_PACED", fuse_paced)
    prompt = prompt_of(1000, 1)
    # A 600-token prompt (eager: over the largest bucket, the pad page there all the same),
    # a 150-token chunk, tails of 1, 3, 16 and 17 tokens, then decode steps: buckets
    # 192, 1, 4, 16, 32 and 1 again.
    steps, at = [], 0
    for n in (600, 150, 1, 3, 16, 17, 1, 1):
        steps.append([(0, prompt[at:at + n])])
        at += n
    (eager, eager_seqs, eager_logits, eager_calls), (graph, seqs, logits, calls) = run_both(
        model, steps, paced=paced)
    assert model.graphs(graph).captured == {192: True, 1: True, 4: True, 16: True,
                                            32: True}
    for got, want in zip(logits, eager_logits, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert calls == eager_calls
    assert calls[:2] == ([("before", 0), ("after", 0)] if paced
                         else [("after", 0), ("after", 1)])
    num = seqs[0].num_tokens
    assert num == eager_seqs[0].num_tokens == at
    for layer in range(model.config.num_layers):
        got = graph.gather(layer, graph.plan(seqs[0], num), num)
        want = eager.gather(layer, eager.plan(eager_seqs[0], num), num)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
        # No page but the sequence's and the pad page was written.
        others = sorted(set(range(graph.num_pages)) - set(seqs[0].pages))
        assert not graph.kv[layer][:, others].any()


@pytest.mark.gpu
def test_graphs_give_the_eager_logits_for_a_ragged_batch(model):
    """Several sequences in one forward (a decode step admitting a tail): each attends
    over its own pages, the padding rows change none of them."""
    a, b, c = prompt_of(40, 2), prompt_of(70, 3), prompt_of(33, 4)
    steps = [[(0, a[:32])], [(1, b[:64])], [(0, a[32:33]), (1, b[64:]), (2, c)],
             [(0, a[33:34]), (1, [7]), (2, [9])]]
    (_, _, eager_logits, _), (graph, _, logits, _) = run_both(model, steps)
    for got, want in zip(logits, eager_logits, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert model.graphs(graph).captured == {32: True, 64: True, 4: True}


@pytest.mark.gpu
def test_layer_i_of_the_graphs_runs_after_before_layer_i_on_the_gpu(model):
    """The prefix's KV of each layer arrives late, on a side stream (as a fetch's copies
    do), and before_layer(i) makes the forward's stream wait for it: the tail's logits are
    those over the real prefix, not over what the pages held when the forward launched."""
    prompt = prompt_of(64, 6)
    eager = model.new_cache(num_pages=4)
    want = model.forward(eager, [(SequenceKV(pages=[0, 1, 2, 3], num_tokens=0), prompt)])
    cache = model.new_cache(num_pages=4, cuda_graphs=True)
    seq = SequenceKV(pages=[0, 1, 2, 3])
    model.forward(cache, [(seq, prompt[:48])])
    prefix = [kv[:, :3].clone() for kv in cache.kv]

    def tail(before_layer=None):
        for kv in cache.kv:
            kv[:, :3].zero_()
        seq.num_tokens = 48
        return model.forward(cache, [(seq, prompt[48:])], before_layer=before_layer)

    side = torch.cuda.Stream()

    def arrive(layer: int) -> None:
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            torch.cuda._sleep(2_000_000)  # ~1 ms: long after the host queued the layer
            cache.kv[layer][:, :3].copy_(prefix[layer])
        event = torch.cuda.Event()
        event.record(side)
        torch.cuda.current_stream().wait_event(event)

    assert not torch.allclose(tail()[0], want[-1], atol=1e-3)  # zeroed prefix: other logits
    torch.testing.assert_close(tail(arrive)[0], want[-1], rtol=1e-5, atol=1e-5)
    assert model.graphs(cache).captured == {64: True, 16: True}


@pytest.mark.gpu
def test_capture_all_captures_every_bucket(model):
    import kvstore
    from engines.prefill import PrefillEngine

    with kvstore.Store(kvstore.StoreConfig(dram_bytes="16MiB", hbm_bytes=0)) as store, \
            PrefillEngine(model, store, num_pages=8) as engine:
        engine.capture_graphs()
        assert model.graphs(engine.cache).captured == {b: True for b in BUCKETS}


@pytest.mark.gpu
def test_each_model_keeps_its_own_graphs_of_a_cache_while_the_cache_lives(model):
    cache = model.new_cache(num_pages=4, cuda_graphs=True)
    assert cache.kv[0].shape[1] == 5 and cache.pad_slot == 4 * 16
    other = load_model("tiny", device="cuda", dtype=torch.float32, seed=1).model
    graphs = model.graphs(cache)
    assert model.graphs(cache) is graphs and other.graphs(cache) is not graphs
    del graphs, cache
    assert not model._graphs and not other._graphs  # they went with the cache
    plain = PagedKVCache(model.config, num_pages=4, page_tokens=16, dtype=torch.float32,
                         device="cuda")
    assert not plain.has_graphs and plain.kv[0].shape[1] == 4


@pytest.mark.gpu
def test_a_forward_whose_capture_fails_runs_eagerly(model, monkeypatch, caplog):
    """A piece the capture refuses (here a host sync inside it) leaves that bucket eager:
    the forward still gives the eager logits, and says why."""
    prompt = prompt_of(20, 5)
    eager = model.new_cache(num_pages=4)
    want = model.forward(eager, [(SequenceKV(pages=[0, 1]), prompt)])
    layer_out = model.layer_out

    def syncing_layer_out(layer, h, attention):
        h = layer_out(layer, h, attention)
        h.sum().item()  # a host sync: not allowed while a stream is being captured
        return h

    monkeypatch.setattr(model, "layer_out", syncing_layer_out)
    cache = model.new_cache(num_pages=4, cuda_graphs=True)
    with caplog.at_level("WARNING", logger="engines.cuda_graphs"):
        got = model.forward(cache, [(SequenceKV(pages=[0, 1]), prompt)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert "capturing the forward of 32 tokens failed" in caplog.text
    assert "runs eagerly" in caplog.text
    assert model.graphs(cache).captured == {32: False}
    # The failed capture left the CUDA random generators usable (a sampler's draw raised
    # "Offset increment outside graph capture" after it, before the fix).
    draws = torch.multinomial(torch.ones(8, device="cuda"), 4)
    assert draws.shape == (4,) and torch.randn(3, device="cuda").isfinite().all()

"""The model against transformers' LlamaForCausalLM: same checkpoint, same logits."""

from __future__ import annotations

import os

import pytest
import torch

from engines.checkpoint import load_hf_checkpoint, save_hf_checkpoint
from engines.config import ModelConfig, ModelLoadError, RopeScaling
from engines.model import LlamaModel
from engines.paged_cache import PagedKVCache, SequenceKV
from engines.sampling import SamplingParams

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def write_checkpoint(path, *, tie: bool = False, rope_scaling: dict | None = None,
                     seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        rope_theta=10000.0, tie_word_embeddings=tie, rope_scaling=rope_scaling)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    hf = write_checkpoint(path)
    config, weights = load_hf_checkpoint(path)
    return hf, LlamaModel.from_state_dict(config, weights)


def test_config_read_from_checkpoint(pair):
    _, ours = pair
    c = ours.config
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_size) == (3, 4, 2,
                                                                                      16, 64)
    assert not c.tie_embeddings and ours.lm_head is not None


def test_prefill_and_chunks_match_transformers(pair):
    hf, ours = pair
    tokens = torch.randint(0, 320, (1, 70), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = hf(tokens).logits[0]
    cache = ours.new_cache(num_pages=8, page_tokens=16)
    seq = SequenceKV()
    assert cache.reserve(seq, 70)
    # Three chunks: a prompt, a tail after a cached prefix, then single decode tokens.
    got = [ours.forward(cache, [(seq, tokens[0, :33].tolist())], all_logits=True),
           ours.forward(cache, [(seq, tokens[0, 33:67].tolist())], all_logits=True)]
    got += [ours.forward(cache, [(seq, [t])], all_logits=True) for t in tokens[0, 67:].tolist()]
    torch.testing.assert_close(torch.cat(got), want, rtol=0, atol=2e-5)
    assert seq.num_tokens == 70


def test_greedy_generation_matches_transformers(pair):
    hf, ours = pair
    prompt = torch.randint(0, 320, (1, 21), generator=torch.Generator().manual_seed(4))
    want = hf.generate(prompt, max_new_tokens=12, do_sample=False)[0, 21:].tolist()
    assert ours.generate(prompt[0].tolist(), 12) == want


def test_ragged_batch_equals_one_at_a_time(pair):
    _, ours = pair
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 320, (n,), generator=gen).tolist() for n in (3, 17, 40)]
    cache = ours.new_cache(num_pages=16, page_tokens=16)
    seqs = [SequenceKV() for _ in prompts]
    for seq, p in zip(seqs, prompts, strict=True):
        assert cache.reserve(seq, len(p) + 1)
    together = ours.forward(cache, list(zip(seqs, prompts, strict=True)))
    alone = [ours.forward(ours.new_cache(num_pages=4, page_tokens=16),
                          [(reserved(ours, len(p)), p)])[0] for p in prompts]
    torch.testing.assert_close(together, torch.stack(alone), rtol=0, atol=1e-5)


def reserved(model: LlamaModel, num_tokens: int) -> SequenceKV:
    seq = SequenceKV()
    seq.pages = list(range(-(-num_tokens // 16)))
    return seq


def test_tied_embeddings_and_llama3_rope(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    hf = write_checkpoint(tmp_path, tie=True, rope_scaling=scaling, seed=1)
    config, weights = load_hf_checkpoint(tmp_path)
    assert config.tie_embeddings and config.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 64)
    ours = LlamaModel.from_state_dict(config, weights)
    assert ours.lm_head is None
    tokens = torch.randint(0, 320, (1, 200), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = hf(tokens).logits[0, -1]
    cache = ours.new_cache(num_pages=13, page_tokens=16)
    seq = SequenceKV()
    cache.reserve(seq, 200)
    torch.testing.assert_close(ours.forward(cache, [(seq, tokens[0].tolist())])[0], want,
                               rtol=0, atol=2e-5)


def test_saved_checkpoint_loads_back_the_same(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    write_checkpoint(tmp_path / "a", tie=True, rope_scaling=scaling, seed=2)
    config, weights = load_hf_checkpoint(tmp_path / "a")
    save_hf_checkpoint(config, weights, tmp_path / "b")
    again, weights_again = load_hf_checkpoint(tmp_path / "b")
    assert again == config.__class__(**{**config.__dict__, "name": "b"})
    assert weights_again.keys() == weights.keys()
    assert all(torch.equal(weights[k], weights_again[k]) for k in weights)
    with pytest.raises(ValueError, match="one dtype"):
        save_hf_checkpoint(config, {**weights, "x": torch.zeros(2, dtype=torch.float16)},
                           tmp_path / "c")


def test_seeded_sampling_is_reproducible(pair):
    _, ours = pair
    params = SamplingParams(max_new_tokens=16, temperature=0.9, top_p=0.8, seed=11)
    first = ours.generate([1, 2, 3, 4], sampling=params)
    assert first == ours.generate([1, 2, 3, 4], sampling=params)
    other = ours.generate([1, 2, 3, 4], sampling=SamplingParams(
        max_new_tokens=16, temperature=0.9, top_p=0.8, seed=12))
    assert first != other


def test_bad_checkpoints_raise_model_load_error(tmp_path, pair):
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        load_hf_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ModelLoadError, match="not a Llama"):
        load_hf_checkpoint(tmp_path)
    _, ours = pair
    weights = dict(ours.state_dict())
    weights.pop("model.norm.weight")
    with pytest.raises(ModelLoadError, match="lacks"):
        LlamaModel.from_state_dict(ours.config, weights)


def test_invalid_config_and_params_are_rejected():
    with pytest.raises(ValueError, match="multiple of"):
        ModelConfig(name="x", vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1,
                    num_heads=3, num_kv_heads=2, head_dim=4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)


def test_paged_cache_pages_are_owned_once():
    config = ModelConfig(name="x", vocab_size=8, hidden_size=8, intermediate_size=8,
                         num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4)
    cache = PagedKVCache(config, num_pages=4, page_tokens=16, dtype=torch.float32)
    seq = SequenceKV()
    assert cache.reserve(seq, 40) and len(seq.pages) == 3
    assert not cache.reserve(SequenceKV(), 40)  # one page left: nothing taken
    assert cache.num_free_pages == 1
    pages = list(seq.pages)
    cache.release(seq)
    assert cache.num_free_pages == 4
    with pytest.raises(ValueError, match="not allocated"):
        cache.free(pages[:1])


def test_paged_cache_hands_out_the_lowest_free_pages():
    """Requests get the lowest free pages, so that a cache that is not fragmented gives
    each request consecutive pages, which attention reads as a view (`plan` a slice)."""
    config = ModelConfig(name="x", vocab_size=8, hidden_size=8, intermediate_size=8,
                         num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4)
    cache = PagedKVCache(config, num_pages=6, page_tokens=16, dtype=torch.float32)
    for _ in range(3):  # the same request again and again, as a benchmark sends it
        seq = SequenceKV()
        assert cache.reserve(seq, 4 * 16)
        assert seq.pages == [0, 1, 2, 3] and cache.plan(seq, 4 * 16) == slice(0, 4)
        cache.release(seq)
    first, second = SequenceKV(), SequenceKV()
    cache.reserve(first, 2 * 16)
    cache.reserve(second, 2 * 16)
    cache.release(first)
    third = SequenceKV()
    cache.reserve(third, 3 * 16)  # pages 0 and 1 are free again, then 4
    assert third.pages == [0, 1, 4]
    assert isinstance(cache.plan(third, 3 * 16), torch.Tensor)  # not consecutive: gathered


def test_the_forward_keeps_sdpa_off_cudnn_and_restores_the_flags(monkeypatch):
    """cuDNN's attention builds a plan per new shape, and every decode step's is new: the
    forward runs SDPA with cuDNN's kernel off, and gives the process its flags back."""
    from engines.presets import load_model

    model = load_model("tiny").model
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(*args, **kwargs):
        seen.append((torch.backends.cuda.cudnn_sdp_enabled(),
                     torch.backends.cuda.flash_sdp_enabled()))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    was = torch.backends.cuda.cudnn_sdp_enabled()  # (other code in the process may set it)
    torch.backends.cuda.enable_cudnn_sdp(True)
    try:
        cache = model.new_cache(num_pages=4)
        seq = SequenceKV(pages=[0, 1])
        model.forward(cache, [(seq, list(range(20)))])
        model.forward(cache, [(seq, [7])])
        assert seen and set(seen) == {(False, True)}
        assert len(seen) == 2 * model.config.num_layers
        assert torch.backends.cuda.cudnn_sdp_enabled()  # as it was before the forwards
    finally:
        torch.backends.cuda.enable_cudnn_sdp(was)


def test_overlapping_forwards_on_threads_give_the_process_its_sdpa_flags_back(monkeypatch):
    """Two engines' forwards on threads of one process, overlapping: cuDNN's kernel stays
    off while either runs, and the process has its own setting back after both."""
    import threading

    from engines.presets import load_model

    models = [load_model("tiny", seed=s).model for s in (0, 1)]
    inside = threading.Barrier(2, timeout=30)
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(*args, **kwargs):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        if len(seen) <= 2:
            inside.wait()  # both forwards are inside before either goes on
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    was = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(True)
    try:
        def run(model):
            model.forward(model.new_cache(num_pages=4), [(SequenceKV(pages=[0, 1]),
                                                          list(range(20)))])

        threads = [threading.Thread(target=run, args=(m,)) for m in models]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert len(seen) == 2 * models[0].config.num_layers and not any(seen)
        assert torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(was)

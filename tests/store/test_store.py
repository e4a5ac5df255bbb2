"""The Store API of DESIGN.md: behaviour, tier movement, bad input, threads."""

from __future__ import annotations

import ctypes
import threading

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings

import kvstore
from kvstore import (
    BufferSizeError,
    InvalidKeyError,
    InvalidValueError,
    StorageError,
    Store,
    StoreClosedError,
    StoreConfig,
)
from tests.conftest import make_key, make_value

KiB = 1024
MiB = 1024 * KiB


def chain(n: int, salt: str = "") -> list[bytes]:
    return kvstore.prefix_hashes(np.arange(16 * n) + hash(salt) % 1000, block_tokens=16,
                                 namespace="test" + salt)


def test_issue_example_leaf_first_eviction():
    # DRAM only, room for 3 blocks; chain A->B->C, then an unrelated D: C goes, not A.
    with Store(StoreConfig(dram_bytes=3 * 4096, max_value_bytes=4096)) as store:
        a, b, c = chain(3)
        (d,) = chain(1, salt="other")
        assert store.put_many([a, b, c], [b"a" * 4096, b"b" * 4096, b"c" * 4096]) == 3
        assert store.put(d, b"d" * 4096)
        assert store.match_prefix([a, b, c]) == 2
        assert not store.contains(c) and store.contains(d)
        assert store.stats()["evictions"] == 1


def test_plain_lru_evicts_the_root_instead():
    config = StoreConfig(dram_bytes=3 * 4096, max_value_bytes=4096, eviction_policy="lru")
    with Store(config) as store:
        a, b, c = chain(3)
        (d,) = chain(1, salt="other")
        store.put_many([a, b, c], [b"x" * 4096] * 3)
        store.put(d, b"d" * 4096)
        assert store.match_prefix([a, b, c]) == 0


def test_api_round_trip_and_stats():
    with Store(StoreConfig(dram_bytes=8 * MiB, max_value_bytes=1 * MiB)) as store:
        keys = chain(4)
        values = [make_value(i, 1000 + i) for i in range(4)]
        assert store.put_many(keys, values) == 4
        assert store.get_many(keys) == values
        assert store.get(keys[0]) == values[0]
        out = bytearray(1001)
        assert store.get_into(keys[1], out) and bytes(out) == values[1]
        assert store.tier_of(keys[2]) == "dram"
        assert store.tier_of(make_key("nope")) is None
        assert store.match_prefix([*keys, make_key("x")]) == 4
        assert store.delete(keys[1]) and not store.delete(keys[1])
        assert store.match_prefix(keys) == 1
        assert store.get(keys[1]) is None
        stats = store.stats()
        assert stats["queries"] == 7 and stats["hits"] == 6
        assert stats["hit_rate"] == pytest.approx(6 / 7)
        dram = stats["tiers"]["dram"]
        assert dram["blocks"] == 3 and dram["hits"] == 6
        assert 0 < dram["used_bytes"] <= dram["capacity_bytes"]
        for field in ("evictions", "demotions", "promotions", "checksum_failures"):
            assert stats[field] == 0


def test_tensor_values_are_stored_as_raw_bytes():
    with Store(StoreConfig(dram_bytes=4 * MiB, max_value_bytes=1 * MiB)) as store:
        tensor = torch.randn(8, 16, 64).to(torch.bfloat16)
        key = make_key("t")
        assert store.put(key, tensor)
        assert store.get(key) == tensor.view(torch.int16).numpy().tobytes()
        out = torch.empty_like(tensor)
        assert store.get_into(key, out)
        assert torch.equal(out, tensor)
        strided = torch.arange(64, dtype=torch.float32).reshape(8, 8).t()
        assert store.put(make_key("s"), strided)
        assert store.get(make_key("s")) == strided.contiguous().numpy().tobytes()


def test_bad_input_raises_and_changes_nothing(tmp_path):
    with Store(StoreConfig(dram_bytes=1 * MiB, max_value_bytes=64 * KiB)) as store:
        key = make_key("k")
        store.put(key, b"v" * 100)
        before = store.stats()
        with pytest.raises(InvalidKeyError):
            store.put(b"too short", b"v")
        with pytest.raises(InvalidKeyError):
            store.get("not bytes")  # type: ignore[arg-type]
        with pytest.raises(InvalidValueError):
            store.put(make_key("big"), b"x" * (64 * KiB + 1))
        with pytest.raises(InvalidValueError):
            store.put(make_key("obj"), object())
        with pytest.raises(BufferSizeError):
            store.get_into(key, bytearray(99))
        with pytest.raises(BufferSizeError):
            store.get_into(key, b"v" * 100)  # read-only
        # put_many checks everything first: a bad value in the middle stores nothing.
        keys = chain(3)
        with pytest.raises(InvalidValueError):
            store.put_many(keys, [b"a", b"x" * (64 * KiB + 1), b"c"])
        with pytest.raises(InvalidKeyError):
            store.put_many([keys[0], b"bad"], [b"a", b"b"])
        with pytest.raises(InvalidValueError):
            store.put_many(keys, [b"a"])
        assert store.match_prefix(keys) == 0
        after = store.stats()
        assert after["tiers"] == before["tiers"] and after["blocks"] == 1
        assert store.get(key) == b"v" * 100
    with pytest.raises(StoreClosedError):
        store.get(key)
    with pytest.raises(StoreClosedError):
        store.put(key, b"v")
    store.close()  # idempotent


def test_bad_config_is_refused(tmp_path):
    with pytest.raises(kvstore.ConfigError):
        StoreConfig(dram_bytes=0)
    with pytest.raises(kvstore.ConfigError):
        StoreConfig(nvme_path=str(tmp_path))  # nvme_bytes missing
    with pytest.raises(kvstore.ConfigError):
        StoreConfig(dram_bytes="lots")
    with pytest.raises(kvstore.ConfigError):
        StoreConfig(dram_bytes=-1)
    with pytest.raises(kvstore.ConfigError):
        StoreConfig(eviction_policy="random")
    with pytest.raises(kvstore.ConfigError):
        StoreConfig(write_tier="hbm")
    assert StoreConfig(dram_bytes="2MiB", max_value_bytes="1MiB").dram_bytes == 2 * MiB
    with pytest.raises(kvstore.ConfigError, match="max_value_bytes"):
        StoreConfig(dram_bytes="2MiB", max_value_bytes="4MiB")
    if not torch.cuda.is_available():
        with pytest.raises(kvstore.ConfigError, match="CUDA"):
            Store(StoreConfig(hbm_bytes="64MiB"))


def test_unwritable_nvme_path_raises_storage_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_bytes(b"not a directory")
    config = StoreConfig(dram_bytes=1 * MiB, max_value_bytes=64 * KiB,
                         nvme_path=str(blocker / "sub"), nvme_bytes=16 * MiB)
    with pytest.raises(StorageError):
        Store(config)
    assert blocker.read_bytes() == b"not a directory"


def nvme_config(tmp_path, **changes):
    base = StoreConfig(dram_bytes=4 * 64 * KiB, max_value_bytes=64 * KiB,
                       nvme_path=str(tmp_path / "nvme"), nvme_bytes=16 * MiB,
                       nvme_segment_bytes=1 * MiB)
    return base.replace(**changes)


def test_full_dram_demotes_to_nvme_and_hits_promote(tmp_path):
    with Store(nvme_config(tmp_path)) as store:
        keys = chain(8)
        values = [make_value(i, 64 * KiB) for i in range(8)]
        assert store.put_many(keys, values) == 8
        # The chain's head stays in DRAM; blocks that would have pushed out their own
        # ancestors went straight to NVMe.
        assert [store.tier_of(k) for k in keys] == ["dram"] * 4 + ["nvme"] * 4
        assert store.stats()["demotions"] == 0
        # Another block evicts the DRAM leaf (the head's last block), demoting it.
        assert store.put(make_key("other"), make_value("other", 64 * KiB))
        assert store.tier_of(keys[3]) == "nvme" and store.tier_of(keys[2]) == "dram"
        stats = store.stats()
        assert stats["demotions"] == 1 and stats["evictions"] == 1
        assert store.get(keys[7]) == values[7]
        assert store.tier_of(keys[7]) == "dram"
        assert store.stats()["promotions"] == 1
        assert store.stats()["tiers"]["nvme"]["hits"] == 1
        assert store.get_many(keys) == values
        for tier in store.stats()["tiers"].values():
            assert tier["used_bytes"] <= tier["capacity_bytes"]


def test_promote_on_hit_off(tmp_path):
    with Store(nvme_config(tmp_path, promote_on_hit=False)) as store:
        keys = chain(8)
        store.put_many(keys, [make_value(i, 64 * KiB) for i in range(8)])
        assert store.get(keys[7]) == make_value(7, 64 * KiB)
        assert store.tier_of(keys[7]) == "nvme"
        assert store.stats()["promotions"] == 0


def test_second_use_admission_filter(tmp_path):
    with Store(nvme_config(tmp_path, nvme_admission="second-use")) as store:
        keys = chain(5)
        values = [make_value(i, 64 * KiB) for i in range(5)]
        store.put_many(keys[:4], values[:4])
        assert store.get(keys[3]) == values[3]  # keys[3] now used twice
        store.put(keys[4], values[4])  # evicts the LRU leaf: keys[4]'s parent keys[3]? no: 4 is new
        store.put(make_key("x"), make_value("x", 64 * KiB))
        store.put(make_key("y"), make_value("y", 64 * KiB))
        nvme_keys = [k for k in keys if store.tier_of(k) == "nvme"]
        # Only blocks used at least twice were written to NVMe; the rest were dropped.
        assert nvme_keys == [keys[3]] or all(
            store.placement.uses(store.placement.lookup(k)) >= 2 for k in nvme_keys)
        assert store.stats()["demotions"] == len(nvme_keys)
        assert store.stats()["evictions"] >= 3


def test_nvme_only_store(tmp_path):
    config = StoreConfig(dram_bytes=0, max_value_bytes=64 * KiB, nvme_path=str(tmp_path / "n"),
                         nvme_bytes=8 * MiB, nvme_segment_bytes=1 * MiB)
    with Store(config) as store:
        keys = chain(3)
        assert store.put_many(keys, [b"a" * 5000, b"b" * 10, b""]) == 3
        assert store.get(keys[0]) == b"a" * 5000 and store.get(keys[2]) == b""
        assert store.tier_of(keys[1]) == "nvme"
    with Store(config) as store:
        assert store.match_prefix(keys) == 3


def test_reopen_recovers_flushed_blocks_with_their_chain(tmp_path):
    config = nvme_config(tmp_path)
    keys = chain(6)
    values = [make_value(i, 10 * KiB) for i in range(6)]
    with Store(config) as store:
        store.put_many(keys, values)
        store.delete(keys[5])
        store.flush()
    with Store(config) as store:
        assert store.match_prefix(keys) == 5
        assert all(store.tier_of(k) == "nvme" for k in keys[:5])
        assert store.get_many(keys) == [*values[:5], None]
        # The parent links came back: the chain's tail is the leaf.
        core, nvme_tier = store.placement, list(store.capacities()).index("nvme")
        assert core.children_in(core.lookup(keys[0]), nvme_tier) == 1


def test_overwrite_after_flush_never_resurrects_old_value(tmp_path):
    config = nvme_config(tmp_path)
    key = make_key("k")
    with Store(config) as store:
        store.put(key, b"old" * 100)
        store.flush()
        store.put(key, b"new" * 100)
        store.flush()
    with Store(config) as store:
        assert store.get(key) == b"new" * 100


def test_corrupt_nvme_record_is_a_miss_never_a_hit(tmp_path):
    config = nvme_config(tmp_path, dram_bytes=0)
    keys = chain(3)
    values = [make_value(i, 20 * KiB) for i in range(3)]
    with Store(config) as store:
        store.put_many(keys, values)
    segments = sorted((tmp_path / "nvme").glob("seg-*"))
    data = bytearray(segments[0].read_bytes())
    position = data.find(values[1][:64])
    assert position > 0
    data[position + 100] ^= 0xFF
    segments[0].write_bytes(bytes(data))
    with Store(config) as store:
        got = store.get_many(keys)
        assert got[1] is None
        assert got[0] == values[0] and got[2] == values[2]


def test_pinned_blocks_are_never_evicted():
    with Store(StoreConfig(dram_bytes=2 * 4096, max_value_bytes=4096)) as store:
        a, b = make_key("a"), make_key("b")
        store.put(a, b"a" * 4096)
        store.put(b, b"b" * 4096)
        pins = [store.placement.pin(store.placement.lookup(k), 30) for k in (a, b)]
        assert not store.put(make_key("c"), b"c" * 4096)  # everything is pinned: refused
        assert store.contains(a) and store.contains(b)
        store.placement.unpin(store.placement.lookup(a), pins[0])
        assert store.put(make_key("c"), b"c" * 4096)
        assert not store.contains(a) and store.contains(b)


def test_mixed_sizes_reclaim_slabs_of_other_classes():
    with Store(StoreConfig(dram_bytes=4 * 64 * KiB, max_value_bytes=64 * KiB)) as store:
        for i in range(64):
            assert store.put(make_key(("small", i)), make_value(i, 4 * KiB))
        # Every slab now serves the 4 KiB class; a 64 KiB value must still find room.
        assert store.put(make_key("big"), make_value("big", 64 * KiB))
        assert store.get(make_key("big")) == make_value("big", 64 * KiB)
        dram = store.stats()["tiers"]["dram"]
        assert dram["used_bytes"] <= dram["capacity_bytes"]


def test_threads_share_a_store():
    config = StoreConfig(dram_bytes=2 * MiB, max_value_bytes=256 * KiB)
    errors: list[str] = []
    with Store(config) as store:
        def worker(w: int) -> None:
            for i in range(150):
                key, value = make_key((w, i)), make_value((w, i), 1000 + 97 * i)
                store.put(key, value)
                got = store.get(key)
                if got is not None and got != value:
                    errors.append(f"worker {w} item {i}: wrong bytes")
                other = store.get(make_key(((w + 1) % 4, i)))
                if other is not None and other != make_value(((w + 1) % 4, i), 1000 + 97 * i):
                    errors.append(f"worker {w} read another's item {i} wrong")

        threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors[:5]
        dram = store.stats()["tiers"]["dram"]
        assert dram["used_bytes"] <= dram["capacity_bytes"]
        assert store.stats()["evictions"] > 0


def test_delete_of_an_evicted_key_still_on_disk_stays_deleted(tmp_path):
    config = StoreConfig(dram_bytes=0, max_value_bytes=16 * KiB, nvme_path=str(tmp_path / "n"),
                         nvme_bytes=512 * KiB, nvme_segment_bytes=64 * KiB)
    key = make_key("k")
    with Store(config) as store:
        store.put(key, b"v1" * 100)
        store.flush()
        i = 0
        while store.contains(key):  # push it out of the index; its record stays on disk
            store.put(make_key(i), make_value(i, 16 * KiB))
            i += 1
        for j in range(i - 6, i):  # free room, so that a reopen would have space for it
            assert store.delete(make_key(j))
        assert not store.delete(key)
    with Store(config) as store:
        assert store.get(key) is None


def test_reopen_after_heavy_nvme_eviction_recovers_exactly_what_was_flushed(tmp_path):
    # Evicted records stay on disk until compaction; they must not come back at reopen
    # (they would count against capacity and push out blocks that were live at flush).
    config = StoreConfig(dram_bytes=256 * KiB, max_value_bytes=16 * KiB,
                         nvme_path=str(tmp_path / "n"), nvme_bytes=4 * MiB,
                         nvme_segment_bytes=256 * KiB)
    with Store(config) as store:
        for i in range(1200):
            store.put(make_key(i), make_value(i, 16 * KiB))
        store.flush()
        nvme_tier = list(store.capacities()).index("nvme")
        on_nvme = {i for i in range(1200) if store.contains(make_key(i))
                   and store.placement.is_in(store.placement.lookup(make_key(i)), nvme_tier)}
        assert store.stats()["evictions"] > 100 and len(on_nvme) > 10
    with Store(config) as store:
        present = {i for i in range(1200) if store.contains(make_key(i))}
        assert present == on_nvme
        for i in present:
            assert store.get(make_key(i)) == make_value(i, 16 * KiB)


def test_get_many_counts_and_returns_what_get_does(tmp_path):
    # Values in DRAM, values only on NVMe, a large value and a miss: get_many's batch path
    # and per-key get must agree on values, stats and promotions.
    def run(batched: bool) -> tuple[list[bytes | None], dict]:
        config = nvme_config(tmp_path / str(batched), dram_bytes=4 * 64 * KiB,
                             max_value_bytes=256 * KiB)
        keys = chain(10, salt=str(batched))
        values = [make_value(i, 64 * KiB if i != 3 else 100 * KiB) for i in range(10)]
        with Store(config) as store:
            assert store.put_many(keys, values) == 10
            lookup = [*keys, make_key("missing")]
            got = store.get_many(lookup) if batched else [store.get(k) for k in lookup]
            stats = store.stats()
            stats = {k: stats[k] for k in ("queries", "hits", "promotions")} | {
                t: stats["tiers"][t]["hits"] for t in ("dram", "nvme")}
        assert got == [*values, None]
        return got, stats

    assert run(True)[1] == run(False)[1]


def test_put_many_overwrite_replaces_every_copy(tmp_path):
    config = nvme_config(tmp_path, dram_bytes=2 * 4096, max_value_bytes=4096)
    keys = chain(4)
    with Store(config) as store:
        store.put_many(keys, [b"old" + bytes(4093)] * 4)  # two of them go down to NVMe
        assert {store.tier_of(k) for k in keys} == {"dram", "nvme"}
        assert store.put_many(keys, [b"new" + bytes(4093)] * 4) == 4
        assert store.get_many(keys) == [b"new" + bytes(4093)] * 4
        assert store.stats()["blocks"] == 4
    with Store(config) as store:
        assert store.get_many(keys) == [b"new" + bytes(4093)] * 4


def test_a_slot_dropped_while_pinned_keeps_the_old_value_until_unpinned():
    with Store(StoreConfig(dram_bytes=1 * MiB, max_value_bytes=64 * KiB)) as store:
        key = make_key("pinned")
        old = make_value("old", 50 * KiB)
        store.put(key, old)
        offset, nbytes, pin = store.pin_host(key)
        used = store.stats()["tiers"]["dram"]["used_bytes"]
        store.put(key, make_value("new", 50 * KiB))  # overwrite while a reader copies
        store.delete(make_key("other"))
        pool = store.host_pool.array
        assert pool[offset:offset + nbytes].tobytes() == old  # the old slot is untouched
        assert store.stats()["tiers"]["dram"]["used_bytes"] == 2 * used  # both slots held
        assert store.unpin_host(key, pin) is True  # the copy made under the pin is whole
        assert store.stats()["tiers"]["dram"]["used_bytes"] == used  # old slot freed
        assert store.get(key) == make_value("new", 50 * KiB)
        assert store.stats()["torn_reads"] == 0
        # A pin whose block was deleted, released twice: the second is refused.
        offset, nbytes, pin = store.pin_host(key)
        store.delete(key)
        assert store.unpin_host(key, pin) is True
        assert store.unpin_host(key, pin) is False
        assert store.stats()["tiers"]["dram"]["used_bytes"] == 0


def test_pins_of_a_batch_equal_pins_one_by_one(tmp_path):
    """pin_host_many / unpin_host_many (a loan's batch, under one hold of the lock) give
    what pin_host / unpin_host of each key give, and count the same hits, queries and
    torn reads: a block only on NVMe and an absent key are not pinned (None, uncounted),
    a pin given back twice is refused the second time (a torn read)."""
    def run(batched: bool) -> tuple[list, list[bool], dict]:
        config = nvme_config(tmp_path / str(batched), dram_bytes=2 * 64 * KiB)
        keys = chain(3, salt="pins")
        with Store(config) as store:
            assert store.put_many(keys, [make_value(i, 64 * KiB) for i in range(3)]) == 3
            tiers = [store.tier_of(k) for k in keys]
            assert sorted(tiers) == ["dram", "dram", "nvme"]
            on_disk = keys[tiers.index("nvme")]
            a, b = (k for k, t in zip(keys, tiers, strict=True) if t == "dram")
            asked = [a, on_disk, make_key("absent"), b, a]
            before = store.stats()
            pins = (store.pin_host_many(asked) if batched
                    else [store.pin_host(k) for k in asked])
            given = [(k, p[2]) for k, p in zip(asked, pins, strict=True) if p is not None]
            given.append(given[0])  # one pin given back twice
            back = (store.unpin_host_many(given) if batched
                    else [store.unpin_host(k, pin) for k, pin in given])
            after = store.stats()
            counted = {name: after[name] - before[name]
                       for name in ("hits", "queries", "torn_reads")}
            slots = [None if p is None else p[:2] for p in pins]
            for (offset, nbytes), key in [(s, k) for s, k in zip(slots, asked, strict=True)
                                          if s is not None]:
                assert store.host_pool.array[offset:offset + nbytes].tobytes() == \
                    store.get(key)
            return slots, back, counted

    slots, back, counted = run(batched=True)
    assert [s is None for s in slots] == [False, True, True, False, False]
    assert back == [True, True, True, False]
    assert counted == {"hits": 3, "queries": 3, "torn_reads": 1}
    assert (slots, back, counted) == run(batched=False)


def test_get_many_into_equals_get_into_and_stops_at_a_miss(tmp_path):
    # DRAM and NVMe blocks mixed in one chain: the batch path and per-key get_into must
    # fill the same bytes and count the same hits and promotions.
    def run(batched: bool) -> tuple[int, list[bytes], dict]:
        config = nvme_config(tmp_path / str(batched), dram_bytes=4 * 64 * KiB)
        keys = chain(8, salt=str(batched))
        with Store(config) as store:
            assert store.put_many(keys, [make_value(i, 64 * KiB) for i in range(8)]) == 8
            assert {store.tier_of(k) for k in keys} == {"dram", "nvme"}
            lookup = [*keys[:6], make_key("missing"), keys[6]]
            outs = [np.zeros(64 * KiB, np.uint8) for _ in lookup]
            if batched:
                copied = store.get_many_into(lookup, outs)
            else:
                copied = 0
                while copied < len(lookup) and store.get_into(lookup[copied], outs[copied]):
                    copied += 1
            stats = store.stats()
        counted = {k: stats[k] for k in ("queries", "hits", "promotions")}
        return copied, [o.tobytes() for o in outs[:copied]], counted

    copied, got, counted = run(True)
    assert copied == 6 and got == [make_value(i, 64 * KiB) for i in range(6)]
    assert (copied, got, counted) == run(False)


def test_get_many_into_bad_input_changes_nothing():
    with Store(StoreConfig(dram_bytes=1 * MiB, max_value_bytes=64 * KiB)) as store:
        keys = chain(3)
        store.put_many(keys, [make_value(i, 4096) for i in range(3)])
        with pytest.raises(BufferSizeError):
            store.get_many_into(keys, [bytearray(4096), bytearray(4096), bytearray(10)])
        with pytest.raises(InvalidValueError):
            store.get_many_into(keys, [bytearray(4096)])
        assert store.stats()["queries"] == 0
        for key in keys:  # no pin was left behind: every block can go
            assert store.delete(key)
        assert store.get_many_into(keys, [bytearray(4096)] * 3) == 0


def test_borrow_yields_the_slots_pinned_until_released(tmp_path):
    config = nvme_config(tmp_path, dram_bytes=4 * 64 * KiB)
    keys = chain(6)
    values = [make_value(i, 64 * KiB) for i in range(6)]
    with Store(config) as store:
        assert store.put_many(keys, values) == 6
        in_dram = [store.tier_of(k) == "dram" for k in keys]
        leading = in_dram.index(False)  # borrow stops at the first block only on NVMe
        with store.borrow(keys) as borrowed:
            assert len(borrowed) == len(borrowed.addresses) == leading > 0
            # The addresses are the blocks' bytes in place (what copy kernels read).
            assert [ctypes.string_at(a, 64 * KiB) for a in borrowed.addresses] == values[:leading]
            assert [v.ctypes.data for v in borrowed.views] == borrowed.addresses
            assert [bytes(v) for v in borrowed.views] == values[:leading]
            # Overwritten and deleted while borrowed: the borrowed slots keep the old bytes.
            store.put(keys[0], make_value("new", 64 * KiB))
            assert store.delete(keys[1]) or leading < 2
            assert bytes(borrowed.views[0]) == values[0]
        assert borrowed.intact is True
        assert store.get(keys[0]) == make_value("new", 64 * KiB)
        with store.borrow([make_key("missing"), *keys]) as borrowed:
            assert borrowed.views == [] and borrowed.addresses == []


BOUNDED_SIZES = (0, 4 * KiB, 64 * KiB, 64 * KiB + 1, 100 * KiB, 256 * KiB)


@pytest.fixture(scope="module", params=["dram", "nvme"])
def bounded_store(request, tmp_path_factory):
    """Values of every size around the batch path's limit (64 KiB), held in DRAM, or on
    NVMe only (every read takes get's path); and the model of what each key holds."""
    config = StoreConfig(dram_bytes=4 * MiB if request.param == "dram" else 0,
                         max_value_bytes=256 * KiB, nvme_bytes=8 * MiB,
                         nvme_path=str(tmp_path_factory.mktemp("bounded") / "nvme"),
                         nvme_segment_bytes=1 * MiB)
    model = {make_key(("bounded", n)): make_value(("bounded", n), n) for n in BOUNDED_SIZES}
    model[make_key("bounded-miss")] = None
    with Store(config) as store:
        for key, value in model.items():
            if value is not None:
                assert store.put(key, value)
        yield store, model


@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(picks=st.lists(st.integers(0, len(BOUNDED_SIZES)), max_size=24),
       max_bytes=st.sampled_from([0, 1, 4 * KiB, 64 * KiB, 100 * KiB, 300 * KiB, MiB]))
def test_get_many_with_max_bytes_reads_the_leading_values_that_fit(bounded_store, picks,
                                                                   max_bytes):
    """The values of the longest run of leading keys whose values (a key given twice
    counts twice) add up to at most ``max_bytes``, the first value whatever its size."""
    store, model = bounded_store
    keys = [list(model)[i] for i in picks]
    expected: list[bytes | None] = []
    total = 0
    for key in keys:
        value = model[key]
        if value is not None and total and total + len(value) > max_bytes:
            break  # a miss adds no bytes: never the cut
        expected.append(value)
        total += 0 if value is None else len(value)
    got = store.get_many(keys, max_bytes=max_bytes)
    assert [v if v is None else len(v) for v in got] == [
        v if v is None else len(v) for v in expected]
    assert got == expected
    assert store.get_many(keys) == [model[k] for k in keys]

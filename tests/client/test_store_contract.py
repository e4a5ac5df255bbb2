"""The Store API contract, passed by the embedded Store and by clients of a real daemon
subprocess: over shared memory, over TCP, and (in test_async_client) asyncio; and by a
client of one node of a 3-node pool that has room for little, its blocks living on the
other two (pooled capacity: `daemon.cluster`)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import kvstore
from kvstore import BufferSizeError, InvalidKeyError, InvalidValueError, KVStoreError
from kvstore.client import session as client_session
from kvstore.tiers.base import REMOTE_TIER_BIT
from tests.conftest import make_key, make_value

KiB = 1024
MiB = 1024 * KiB
_namespaces = itertools.count()


@pytest.fixture(scope="module")
def pool3(tmp_path_factory):
    """A 3-node pool: n1 with 8 MiB of DRAM beside its peers' 64 MiB each."""
    from tests.cluster.conftest import Pool

    pool = Pool(tmp_path_factory.mktemp("pool"))
    try:
        pool.start("n0", "--dram", "64MiB", "--max-value", "4MiB")
        node = pool.start("n1", "--dram", "8MiB", "--max-value", "4MiB")
        pool.start("n2", "--dram", "64MiB", "--max-value", "4MiB")
        with kvstore.connect(node.url, shared_memory=False) as admin:
            pool.wait_peers("n1", {"n0", "n2"}, admin)
            yield pool
            assert admin.stats()["cluster"]["spilled"] > 0  # blocks went to the peers
    finally:
        pool.close()


@pytest.fixture(params=["embedded", "shm", "shm-pin", "tcp", "pool", "cluster-client"])
def api(request, tmp_path, shared_daemon, monkeypatch):
    if request.param in ("pool", "cluster-client"):
        pool = request.getfixturevalue("pool3")
        namespace = f"contract-{next(_namespaces)}"
        if request.param == "pool":  # a client of n1; what it writes pushes n1's out
            store = kvstore.connect(pool.nodes["n1"].url, namespace=namespace,
                                    shared_memory=False)
            filler = chain(12, f"fill-{next(_namespaces)}")
            store.put_many(filler, [make_value(("fill", i), 1 * MiB) for i in range(12)])
        else:  # the pool itself, each block read from the node that holds it
            store = kvstore.connect(
                f"kvstore+cluster://127.0.0.1:{pool.redis_port}/0?cluster=test",
                namespace=namespace)
        yield store
        store.close()
        return
    if request.param == "embedded":
        store = kvstore.Store(kvstore.StoreConfig(
            dram_bytes="64MiB", nvme_path=str(tmp_path / "nvme"), nvme_bytes="64MiB",
            max_value_bytes="4MiB"))
    else:
        if request.param == "shm-pin":  # the pool without its directory: every read pins
            monkeypatch.setattr(client_session, "_shared_directory", lambda name: None)
        # A namespace per test: the daemon is shared by the module, the keys are not.
        store = kvstore.connect(shared_daemon.url, namespace=f"contract-{next(_namespaces)}",
                                shared_memory=request.param != "tcp")
        # The path under test is the one taken: the pool is mapped exactly for "shm*", and
        # its directory read exactly for "shm".
        session = store._idle[0].session
        assert (session.pool is not None) == (request.param != "tcp")
        assert (session.directory is not None) == (request.param == "shm")
    yield store
    store.close()


def chain(n: int, salt: str) -> list[bytes]:
    return kvstore.prefix_hashes(np.arange(16 * n), block_tokens=16, namespace=salt)


@pytest.mark.parametrize("nbytes", [0, 100, 4 * KiB, 300 * KiB, 4 * MiB])
def test_put_get_roundtrip(api, nbytes):
    key, value = make_key(nbytes), make_value(nbytes, nbytes)
    assert api.put(key, value) is True
    assert api.get(key) == value
    assert api.contains(key) and api.tier_of(key) in ("dram", "nvme")


def test_value_types(api):
    base = make_value("types", 64 * KiB)
    values = {
        "bytes": base, "bytearray": bytearray(base), "memoryview": memoryview(base),
        "numpy": np.frombuffer(base, dtype=np.float16).reshape(64, -1),
        "tensor": torch.frombuffer(bytearray(base), dtype=torch.bfloat16).reshape(8, -1),
    }
    for name, value in values.items():
        assert api.put(make_key(name), value)
        assert api.get(make_key(name)) == base, name


TIER_BIT = {"hbm": 1, "dram": 2, "nvme": 4}


def test_tier_bits_say_the_tiers_tier_of_names(api):
    if not hasattr(api, "tier_bits"):
        pytest.skip("a pool's cluster-aware client tells no tiers (no fetch planner on it)")
    keys = chain(3, f"bits-{next(_namespaces)}")
    assert api.put_many(keys[:2], [make_value(("bits", i), 64 * KiB) for i in range(2)]) == 2
    bits = api.tier_bits(keys)
    assert bits[2] == 0 and api.tier_bits([]) == []
    for key, held in zip(keys[:2], bits, strict=False):
        tier = api.tier_of(key)  # (None: only a peer of the pool holds it)
        assert held & -held == (TIER_BIT[tier] if tier else REMOTE_TIER_BIT), (tier, held)


def test_put_in_tier_stores_in_that_tier_only(api):
    if not hasattr(api, "put_in_tier"):
        pytest.skip("a pool's cluster-aware client has no tiers of its own")
    tiers = list(api.capacities()) if hasattr(api, "capacities") else api.tiers
    for tier in ("dram", "nvme"):
        if tier not in tiers:
            continue
        key, value = make_key(("in-tier", tier)), make_value(("in-tier", tier), 64 * KiB)
        assert api.put_in_tier(tier, [key], [value]) == 1
        assert api.tier_bits([key]) == [TIER_BIT[tier]] and api.tier_of(key) == tier
        assert api.get(key) == value
    with pytest.raises(KVStoreError, match="tier"):
        api.put_in_tier("hbm", [make_key("no hbm")], [b"v"])


def test_missing_keys(api):
    key = make_key("absent")
    assert api.get(key) is None
    assert api.get_into(key, bytearray(10)) is False
    assert api.contains(key) is False
    assert api.tier_of(key) is None
    assert api.delete(key) is False
    assert api.match_prefix([key, make_key("x")]) == 0


@pytest.mark.parametrize("nbytes", [1000, 512 * KiB])
def test_get_into_buffers(api, nbytes):
    key, value = make_key("into"), make_value("into", nbytes)
    api.put(key, value)
    out = np.zeros(nbytes, dtype=np.uint8)
    assert api.get_into(key, out) is True and out.tobytes() == value
    buf = bytearray(nbytes)
    assert api.get_into(key, buf) is True and bytes(buf) == value
    tensor = torch.zeros(nbytes // 2, dtype=torch.float16)
    assert api.get_into(key, tensor) is True and tensor.numpy().tobytes() == value


def test_get_into_wrong_size_raises_and_changes_nothing(api):
    key, value = make_key("size"), make_value("size", 4096)
    api.put(key, value)
    with pytest.raises(BufferSizeError):
        api.get_into(key, bytearray(4095))
    with pytest.raises(BufferSizeError):
        api.get_into(key, bytes(4096))  # read-only
    assert api.get(key) == value


def test_chains_match_prefix_and_batches(api):
    keys = chain(8, "batch")
    values = [make_value(i, 10 * KiB + i) for i in range(8)]
    assert api.put_many(keys, values) == 8
    assert api.get_many(keys) == values
    assert api.match_prefix(keys) == 8
    assert api.delete(keys[3]) is True
    assert api.match_prefix(keys) == 3
    assert api.get_many(keys) == [*values[:3], None, *values[4:]]
    assert api.put_many([], []) == 0
    assert api.get_many([]) == []


def test_large_chain_over_the_shared_pool(api):
    keys = chain(6, "large")
    values = [make_value(("large", i), 1 * MiB) for i in range(6)]
    assert api.put_many(keys, values) == 6
    assert api.get_many(keys) == values


def test_overwrite_and_delete(api):
    key = make_key("over")
    api.put(key, b"old" * 1000)
    api.put(key, b"new" * 2000)
    assert api.get(key) == b"new" * 2000
    assert api.delete(key) is True
    assert api.get(key) is None


def test_bad_input_raises_and_changes_nothing(api):
    key = make_key("bad")
    api.put(key, b"kept")
    with pytest.raises(InvalidKeyError):
        api.put(b"short", b"x")
    with pytest.raises(InvalidKeyError):
        api.get("a string key of 16")  # type: ignore[arg-type]
    with pytest.raises(InvalidValueError):
        api.put(key, bytes(4 * MiB + 1))
    with pytest.raises(InvalidValueError):
        api.put(key, object())
    with pytest.raises(InvalidValueError):
        api.put_many([key], [b"a", b"b"])
    with pytest.raises(InvalidKeyError):
        api.put_many([key, b"bad"], [b"a", b"b"])
    assert api.get(key) == b"kept"


def test_flush_and_stats(api):
    keys = chain(3, "stats")
    api.put_many(keys, [b"v" * 5000] * 3)
    api.get(keys[0])
    api.get(make_key("miss"))
    api.flush()
    stats = api.stats()
    for field in ("tiers", "queries", "hits", "hit_rate", "evictions", "demotions",
                  "promotions", "checksum_failures"):
        assert field in stats
    assert stats["hits"] >= 1 and stats["queries"] >= 2
    for tier in stats["tiers"].values():
        assert {"capacity_bytes", "used_bytes", "blocks", "hits"} <= set(tier)
        assert tier["used_bytes"] <= tier["capacity_bytes"]


def test_closed_raises(api):
    api.close()
    with pytest.raises(KVStoreError):
        api.get(make_key("closed"))

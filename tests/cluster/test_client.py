"""The cluster-aware client (``kvstore+cluster://``) against a real pool: it reads each
block from the node that holds it, with no relay hop, and locates chains for routing."""

from __future__ import annotations

import signal

import pytest

import kvstore
from kvstore.cluster.client import ClusterClient, parse_cluster_url
from kvstore.cluster.index import Location
from kvstore.errors import KVStoreError, StoreConnectionError
from tests.cluster.conftest import CLUSTER, Pool, wait_until
from tests.cluster.test_pool import chain, connect, value


def cluster_url(pool: Pool) -> str:
    return f"kvstore+cluster://127.0.0.1:{pool.redis_port}/0?cluster={CLUSTER}"


def test_cluster_urls_parse_or_say_what_is_expected() -> None:
    assert parse_cluster_url("kvstore+cluster://h:7/2?cluster=x") == ("redis://h:7/2", "x")
    assert parse_cluster_url("kvstore+cluster://:pw@h:7/0") == ("redis://:pw@h:7/0", "default")
    for bad in ("kvstore://h:7", "kvstore+cluster://h:7/0?clutser=x", "kvstore+cluster://"):
        with pytest.raises(KVStoreError, match="cluster"):
            parse_cluster_url(bad)


@pytest.mark.timeout(120)
def test_reads_go_straight_to_the_holder(pool: Pool) -> None:
    nodes = {n: pool.start(n, "--dram", "64MiB") for n in ("n0", "n1", "n2")}
    keys = chain(20, 8)
    with connect(nodes["n0"]) as c0:
        c0.put_many(keys, [value(k) for k in keys])
    pool.wait_published("n0", keys)
    with kvstore.connect(cluster_url(pool), shared_memory=False) as cc:
        assert isinstance(cc, ClusterClient)
        before = {n: connect(d).stats() for n, d in nodes.items()}
        assert cc.get_many(keys) == [value(k) for k in keys]
        assert cc.get(keys[2]) == value(keys[2])
        assert cc.match_prefix(keys + chain(21, 2)) == 8 and cc.contains(keys[7])
        assert cc.tier_of(keys[0]) == "dram"
        after = {n: connect(d).stats() for n, d in nodes.items()}
        # Only n0 was asked, and nobody relayed: no remote lookups on n1 or n2.
        assert after["n0"]["queries"] - before["n0"]["queries"] >= 9
        for n in ("n1", "n2"):
            assert after[n]["queries"] == before[n]["queries"]
            assert after[n]["cluster"]["remote_hits"] == 0
        assert cc.locate(keys) == [Location("n0", (2,) * 8)]
        assert cc.locate(chain(22, 3)) == []


@pytest.mark.timeout(120)
def test_writes_spread_by_chain_and_read_back_at_once(pool: Pool) -> None:
    for n in ("n0", "n1", "n2"):
        pool.start(n, "--dram", "64MiB")
    with kvstore.connect(cluster_url(pool), shared_memory=False) as cc:
        chains = [chain(30 + i, 4) for i in range(12)]
        for keys in chains:
            assert cc.put_many(keys, [value(k) for k in keys]) == 4
            assert cc.get_many(keys) == [value(k) for k in keys]  # before the index knows
        homes = set()
        for keys in chains:
            wait_until(lambda keys=keys: cc.locate(keys), what="published")
            (where,) = cc.locate(keys)  # a chain stays together on one node
            assert where.leading == 4
            homes.add(where.node_id)
        assert len(homes) >= 2  # rendezvous hashing spreads chains over the nodes
        key = chains[0][0]
        assert cc.put(key, b"other bytes") and cc.get(key) == b"other bytes"
        assert cc.delete(key) and cc.get(key) is None and not cc.contains(key)
        stats = cc.stats()
        assert set(stats["nodes"]) == {"n0", "n1", "n2"}
        assert stats["tiers"]["dram"]["blocks"] >= 12 * 4 - 1


@pytest.mark.timeout(120)
def test_a_killed_holder_is_a_miss_and_writes_go_to_the_others(pool: Pool) -> None:
    nodes = {n: pool.start(n, "--dram", "64MiB") for n in ("n0", "n1")}
    keys = chain(40, 3)
    with connect(nodes["n0"]) as c0:
        c0.put_many(keys, [value(k) for k in keys])
    pool.wait_published("n0", keys)
    with kvstore.connect(cluster_url(pool), shared_memory=False, timeout_s=5.0) as cc:
        assert cc.get(keys[0]) == value(keys[0])
        nodes["n0"].signal(signal.SIGKILL)
        assert cc.get_many(keys) == [None] * 3  # refused: a miss, and n0 is skipped
        other = chain(41, 2)
        assert cc.put_many(other, [value(k) for k in other]) == 2  # on n1
        assert cc.get_many(other) == [value(k) for k in other]


def test_no_live_node_is_a_clear_error(pool: Pool) -> None:
    with pytest.raises(StoreConnectionError, match="no live node"):
        kvstore.connect(cluster_url(pool))

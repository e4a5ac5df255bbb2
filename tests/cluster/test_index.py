"""The pool's block index against a real redis-server (and a real 3-master Redis Cluster)
started by the test on free ports."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.cluster import RedisCluster

from kvstore.cluster.index import ClusterIndex, Location, batch_commands
from tests.cluster.conftest import RedisClusterServers
from tests.daemon.test_registry import RedisServer


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


@pytest.fixture
def index(tmp_path: Path) -> Iterator[ClusterIndex]:
    server = RedisServer(tmp_path)
    server.start()
    client = redis.Redis(port=server.port)
    try:
        yield ClusterIndex(client, "test")
    finally:
        client.close()
        server.kill()


def test_locate_gives_each_live_node_its_leading_blocks_and_tiers(index) -> None:
    chain = [key(i) for i in range(10)]
    assert index.publish("a", [(k, 2) for k in chain[:6]]) == 6  # DRAM
    index.publish("b", [(k, 6) for k in chain[:3]] + [(chain[4], 4)])  # a gap at 3
    index.publish("c", [(k, 2) for k in chain[1:]])  # not the first block: holds no prefix
    index.publish("dead", [(k, 2) for k in chain])
    found = index.locate(chain, ["a", "b", "c"])
    assert found == [Location("a", (2,) * 6), Location("b", (6, 6, 6))]
    assert index.locate(chain, []) == [] and index.locate([], ["a"]) == []


def test_runs_cross_the_script_s_pieces_and_stop_at_each_node_s_first_gap(index) -> None:
    """The script reads a hash in pieces of 1, 4, 16, 64 and 256 blocks: a run ending
    on, just before and just after a piece's edge, and one past several 256-block pieces,
    come back exactly, with each block's own tier bits."""
    chain = [key(i) for i in range(1200)]
    ends = {"on": 85, "before": 20, "after": 22, "long": 1100, "whole": 1200}
    for node, end in ends.items():
        index.publish(node, [(k, 1 + i % 7) for i, k in enumerate(chain[:end])]
                      + [(k, 2) for k in chain[end + 1:]])  # held again after the gap
    found = {f.node_id: f.tiers for f in index.locate(chain, list(ends))}
    assert {node: len(tiers) for node, tiers in found.items()} == ends
    assert all(tiers == tuple(1 + i % 7 for i in range(len(tiers)))
               for tiers in found.values())
    with pytest.raises(ValueError, match="16 bytes"):
        index.locate([key(1), b"short"], ["on"])


def test_a_node_s_hash_is_a_hash_table_however_few_blocks_it_holds(index) -> None:
    """A small hash would be a listpack, whose lookups scan it (8.4 ms against 3.2 ms for
    4,500 blocks over 8 nodes); the encoding field makes it a hash table at once, and is
    never taken for a block."""
    index.publish("n", [(key(1), 2)])
    assert index.client.object("encoding", index.client.keys("*blocks*")[0]) == b"hashtable"
    assert index.holdings("n") == {key(1): 2}
    index.publish("n", [(key(1), 0)])
    assert index.holdings("n") == {} and index.locate([key(1)], ["n"]) == []


def test_a_batch_applies_in_order_and_removes(index) -> None:
    a, b = key(1), key(2)
    index.publish("n", [(a, 2), (b, 2), (a, 6), (b, 0)])  # a: DRAM then DRAM+NVMe; b gone
    assert index.holdings("n") == {a: 6}
    index.publish("n", [(a, 0)])
    assert index.holdings("n") == {}
    index.publish("n", [(b, 4)])
    index.forget_node("n")
    assert index.locate([b], ["n"]) == []


def test_every_batch_is_one_event_on_the_stream(index) -> None:
    a, b = key(1), key(2)
    index.publish("n", [(a, 2), (b, 6)])
    index.publish("m", [(a, 0)])
    events = index.events()
    assert [(node, stored, removed) for _, node, stored, removed in events] == [
        ("n", [(a, 2), (b, 6)], []), ("m", [], [a])]
    assert index.events(after=events[0][0])[0][1] == "m"


def test_bad_changes_are_refused_before_anything_is_sent(index) -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        index.publish("n", [(b"short", 2)])
    with pytest.raises(ValueError, match="a byte"):
        index.publish("n", [(key(1), 300)])
    assert index.holdings("n") == {} and index.events() == []


def test_a_thousand_block_lookup_is_one_round_trip(index) -> None:
    chain = [key(i) for i in range(1000)]
    for node in ("a", "b", "c"):
        index.publish(node, [(k, 2) for k in chain[:700]])
    index.locate(chain, ["a", "b", "c"])  # (the first call loads the script)
    sent: list[int] = []
    connection = index.client.connection_pool.get_connection()
    original = connection.send_packed_command

    def counting(command, check_health=True):  # one packed send per round trip
        sent.append(1)
        return original(command, check_health)

    connection.send_packed_command = counting
    index.client.connection_pool.release(connection)
    found = index.locate(chain, ["a", "b", "c"])
    assert [f.leading for f in found] == [700, 700, 700]
    assert len(sent) == 1


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    servers = RedisClusterServers(tmp_path)
    try:
        yield servers.client
    finally:
        servers.kill()


def test_the_index_on_a_three_master_redis_cluster(redis_cluster) -> None:
    index = ClusterIndex(redis_cluster, "test")
    nodes = [f"node-{i}" for i in range(6)]
    slots = {redis_cluster.keyslot(f"kvstore:test:blocks:{{{n}}}") for n in nodes}
    assert len(slots) > 1, "the nodes' hashes should spread over the shards"
    chain = [key(i) for i in range(1000)]
    for i, node in enumerate(nodes):
        index.publish(node, [(k, 2) for k in chain[:100 * (i + 1)]])
    found = index.locate(chain, nodes)
    assert [(f.node_id, f.leading) for f in found] == [
        (n, 100 * (i + 1)) for i, n in reversed(list(enumerate(nodes)))]
    assert len(index.events()) == len(nodes)


def test_batch_commands_keep_each_key_s_last_change() -> None:
    commands, touched = batch_commands("p", "n", [(key(1), 2), (key(1), 0), (key(2), 4)])
    assert touched == 2
    assert [c[0] for c in commands] == ["HSET", "HDEL", "XADD"]
    assert commands[0][1] == "p:blocks:{n}" and commands[1][2:] == (key(1),)

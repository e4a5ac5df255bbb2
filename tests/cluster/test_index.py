"""The pool's block index against a real redis-server (and a real 3-master Redis Cluster)
started by the test on free ports."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.cluster import RedisCluster

from kvstore.cluster.index import ClusterIndex, Location, batch_commands
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


def _free_ports(n: int) -> list[int]:
    """``n`` free loopback ports whose cluster bus ports (port + 10000) are free too."""
    ports: list[int] = []
    while len(ports) < n:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port + 10000 > 65535 or port in ports:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        ports.append(port)
    return ports


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    if shutil.which("redis-cli") is None:
        pytest.skip("redis-cli is not on PATH: cannot create a Redis Cluster")
    ports = _free_ports(3)
    procs = []
    try:
        for port in ports:
            work = tmp_path / str(port)
            work.mkdir()
            procs.append(subprocess.Popen(
                ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                 "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                 "--save", "", "--appendonly", "no", "--dir", str(work)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for port in ports:
            deadline = time.monotonic() + 10
            while True:
                try:
                    redis.Redis(port=port, socket_connect_timeout=0.2).ping()
                    break
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        subprocess.run(["redis-cli", "--cluster", "create",
                        *[f"127.0.0.1:{p}" for p in ports], "--cluster-replicas", "0",
                        "--cluster-yes"], check=True, capture_output=True, timeout=60)
        deadline = time.monotonic() + 20
        while b"cluster_state:ok" not in redis.Redis(port=ports[0]).execute_command(
                "CLUSTER", "INFO"):
            if time.monotonic() > deadline:
                pytest.fail("the Redis Cluster did not come up")
            time.sleep(0.1)
        client = RedisCluster(host="127.0.0.1", port=ports[0])
        yield client
        client.close()
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


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

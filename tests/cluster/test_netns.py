"""The pool across hosts: each node in a network namespace of its own, with its own address,
Redis in another, the client in a third, joined by a bridge (`tests.cluster.netns`). A
node reaches a peer only at the address the peer registered, over that network: loopback
is every host's own. Failures of a host are misses within the client's deadline, never an
error or a hang: its process killed, or its link cut (packets lost, nothing refused)."""

from __future__ import annotations

import json
import shutil
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from kvstore.errors import AuthError
from tests.cluster.conftest import CLUSTER, TTL_S, NetPool, wait_until
from tests.cluster.netns import Agent, Network, Remote, netns_unavailable
from tests.cluster.test_pool import TOKENS, chain, value
from tests.daemon.conftest import DaemonProcess

CLIENT_TIMEOUT_S = 10.0
# A peer call's deadline is 2 s (PeerLinks), a read on a pooled connection gets 1 s more;
# then the lookup, and the agent's round trip.
LOST_HOST_MISS_S = 5.0


@pytest.fixture
def network() -> Iterator[Network]:
    why = netns_unavailable()
    if why is not None:
        pytest.skip(why)
    with Network() as made:
        yield made


@pytest.fixture
def pool(tmp_path: Path, network: Network) -> Iterator[NetPool]:
    made = NetPool(tmp_path, network)
    try:
        yield made
    finally:
        made.close()


@pytest.fixture
def client_host(network: Network) -> Iterator[Agent]:
    """Where the clients run: a host that holds no node."""
    with Agent(network.add_host("client")) as agent:
        yield agent


def connect(agent: Agent, daemon: DaemonProcess, token: str | None = None) -> Remote:
    """A client on ``agent``'s host (values in the frames: the daemon is on another)."""
    return agent.make("kvstore:connect", daemon.url, token, shared_memory=False,
                      timeout_s=CLIENT_TIMEOUT_S)


@pytest.mark.timeout(120)
def test_a_block_put_through_one_host_is_read_through_another(
        pool: NetPool, client_host: Agent) -> None:
    a = pool.start("a", "--dram", "64MiB")
    b = pool.start("b", "--dram", "64MiB")
    entry = json.loads(pool.redis.get(f"kvstore:{CLUSTER}:node:a"))
    assert entry["addresses"]["control"] == f"{pool.host('a').ip}:{a.port}"
    keys = chain(21, 8)
    ca, cb = connect(client_host, a), connect(client_host, b)
    assert ca.put_many(keys, [value(k) for k in keys]) == len(keys)
    pool.wait_published("a", keys)
    pool.wait_peers("b", {"a"}, cb)
    assert cb.match_prefix(keys) == len(keys)
    assert cb.get(keys[0]) == value(keys[0])
    assert cb.get_many(keys[1:]) == [value(k) for k in keys[1:]]
    assert cb.stats()["cluster"]["remote_hits"] == len(keys)
    # B fetched them from A over the bridge, from its own address, and kept no copy:
    # with A gone they are misses.
    assert f"peer hello peer={pool.host('b').ip}:" in a.output()
    assert cb.stats()["tiers"]["dram"]["blocks"] == 0
    a.signal(signal.SIGKILL)
    assert cb.get_many(keys) == [None] * len(keys)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("failure", ["link_cut", "sigkill"])
def test_a_lost_host_is_a_miss_within_the_deadline_and_leaves_lookups_within_its_ttl(
        pool: NetPool, client_host: Agent, failure: str) -> None:
    a = pool.start("a", "--dram", "64MiB")
    b = pool.start("b", "--dram", "64MiB")
    c = pool.start("c", "--dram", "64MiB")
    keys = chain(22, 5)
    # Two client processes: one waits on B while the other watches C.
    with Agent(client_host.host) as watcher:
        ca, cb, cc = connect(client_host, a), connect(client_host, b), connect(watcher, c)
        assert ca.put_many(keys, [value(k) for k in keys]) == len(keys)
        pool.wait_published("a", keys)
        pool.wait_peers("b", {"a", "c"}, cb)
        pool.wait_peers("c", {"a", "b"}, cc)
        assert cb.get(keys[0]) == value(keys[0])  # B now has a connection to A
        if failure == "link_cut":
            pool.network.cut(pool.host("a"))  # A's packets are lost: B's read times out
        else:
            a.signal(signal.SIGKILL)  # A's host answers with a reset: refused at once
        lost = time.monotonic()
        with ThreadPoolExecutor(1) as thread:
            miss = thread.submit(lambda: (cb.get(keys[1]), time.monotonic() - lost))
            # C never calls A: A leaves C's lookups when A's registry entry expires (A
            # cannot heartbeat), within the TTL of its last heartbeat.
            pool.wait_peers("c", {"b"}, cc)
            assert time.monotonic() - lost < TTL_S + 1.0
            got, took_s = miss.result()
        assert got is None and took_s < LOST_HOST_MISS_S  # a miss, not an error or a hang
        started = time.monotonic()
        assert cb.get_many(keys[2:]) == [None] * 3  # A failed a call: B skips it meanwhile
        assert cb.match_prefix(keys[1:]) == 0
        assert time.monotonic() - started < 1.0
        assert cc.match_prefix(keys[1:]) == 0 and cc.get(keys[4]) is None
        assert cc.get(keys[0]) is None  # no node kept a copy of A's blocks
        if failure == "link_cut":  # back on the network: A registers and publishes again
            pool.network.mend(pool.host("a"))
            pool.wait_peers("b", {"a", "c"}, cb)
            wait_until(lambda: cb.get(keys[1]) == value(keys[1]), what="B reads A's block")
            assert "published its inventory again" in a.output()


@pytest.mark.timeout(120)
def test_tenants_across_hosts_with_a_token_file_and_a_shared_secret_file(
        pool: NetPool, client_host: Agent, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(TOKENS)
    secrets = [tmp_path / "a" / "cluster.key", tmp_path / "b" / "cluster.key"]
    secrets[1].parent.mkdir()
    secrets[0].parent.mkdir()
    flags = ["--dram", "64MiB", "--token-file", str(tokens), "--cluster-secret"]
    a = pool.start("a", *flags, str(secrets[0]))  # makes the secret: each node a copy
    shutil.copy2(secrets[0], secrets[1])
    b = pool.start("b", *flags, str(secrets[1]))
    assert "not a loopback address" not in a.output() + b.output()
    keys = chain(23, 3)
    alice_a = connect(client_host, a, "alice-token-0123456789")
    alice_b = connect(client_host, b, "alice-token-0123456789")
    bob_b = connect(client_host, b, "bob-token-0123456789ab")
    ops_b = connect(client_host, b, "ops-token-0123456789ab")
    alice_a.put_many(keys, [value(k) for k in keys])
    pool.wait_published("a", keys, namespace="a", secret_file=secrets[0])
    pool.wait_peers("b", {"a"}, ops_b)
    assert alice_b.get_many(keys) == [value(k) for k in keys]  # her namespace, through B
    assert bob_b.get_many(keys) == [None] * 3  # the same key bytes, his namespace: none
    assert bob_b.match_prefix(keys) == 0 and not bob_b.contains(keys[0])
    # From the client's host, no token that is not the pool's passes for a peer's.
    with pytest.raises(AuthError):
        connect(client_host, a, "0" * 64)

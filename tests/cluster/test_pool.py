"""Nodes of one pool: any node serves the whole pool, and every failure of a peer or of
Redis is a miss, never an error or wrong bytes. Real redis-server, real kvstored
processes, real sockets (docs/CLUSTER.md)."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time

import pytest

import kvstore
from kvstore.errors import AuthError
from kvstore.tiers.base import REMOTE_TIER_BIT
from tests.cluster.conftest import CLUSTER, TTL_S, Pool, wait_until

VALUE_BYTES = 64 * 1024


def chain(tag: int, n: int) -> list[bytes]:
    return [bytes([tag, i]) * 8 for i in range(n)]


def value(key: bytes) -> bytes:
    return key * (VALUE_BYTES // len(key))


def connect(daemon, **kwargs):
    return kvstore.connect(daemon.url, shared_memory=kwargs.pop("shared_memory", False),
                           timeout_s=kwargs.pop("timeout_s", 10.0), **kwargs)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("shared_memory", [False, True], ids=["tcp", "shm"])
def test_any_node_serves_the_blocks_another_holds(pool: Pool, shared_memory: bool) -> None:
    a = pool.start("n0", "--dram", "64MiB")
    b = pool.start("n1", "--dram", "64MiB")
    keys = chain(1, 12)
    with connect(a) as ca, connect(b, shared_memory=shared_memory) as cb:
        assert ca.put_many(keys, [value(k) for k in keys]) == len(keys)
        pool.wait_published("n0", keys)
        pool.wait_peers("n1", {"n0"}, cb)
        assert cb.match_prefix(keys + chain(2, 3)) == len(keys)
        assert cb.contains(keys[5]) and not cb.contains(chain(3, 1)[0])
        # Held by a peer only: the remote tier's bit (as match_prefix, it counts as held).
        assert cb.tier_bits(keys[:2] + chain(3, 1)) == [REMOTE_TIER_BIT] * 2 + [0]
        assert cb.tiers == ["dram", "remote"] and ca.tiers == ["dram", "remote"]
        assert cb.get(keys[0]) == value(keys[0])
        assert cb.get_many(keys) == [value(k) for k in keys]
        out = bytearray(VALUE_BYTES)
        assert cb.get_into(keys[7], out) and bytes(out) == value(keys[7])
        stats = cb.stats()
        assert stats["cluster"]["remote_hits"] >= len(keys)
        assert stats["cluster"]["peers"] == ["n0"]
        assert stats["tiers"]["dram"]["blocks"] == 0  # read through, no copy kept


@pytest.mark.timeout(120)
def test_an_overwrite_or_a_delete_through_one_node_leaves_no_old_value_in_the_pool(
        pool: Pool) -> None:
    a = pool.start("n0", "--dram", "64MiB")
    b = pool.start("n1", "--dram", "64MiB")
    keys = chain(4, 3)
    with connect(a) as ca, connect(b) as cb:
        ca.put_many(keys, [value(k) for k in keys])
        pool.wait_published("n0", keys)
        pool.wait_peers("n1", {"n0"}, cb)
        cb.put(keys[0], b"new bytes")
        wait_until(lambda: ca.get(keys[0]) in (None, b"new bytes"),
                   what="A dropped its old value (right after the put's answer)")
        assert cb.get(keys[0]) == b"new bytes"
        assert cb.delete(keys[1]) is False  # (B never held it)
        assert ca.get(keys[1]) is None and cb.get(keys[1]) is None
        ca.put(keys[2], value(keys[2]))  # the same bytes again: nothing is dropped
        assert cb.get(keys[2]) == value(keys[2])


@pytest.mark.timeout(120)
def test_a_killed_node_is_a_miss_at_once_and_leaves_lookups_within_its_ttl(pool: Pool) -> None:
    a = pool.start("n0", "--dram", "64MiB")
    b = pool.start("n1", "--dram", "64MiB")
    c = pool.start("n2", "--dram", "64MiB")
    keys = chain(5, 4)
    with connect(a) as ca, connect(b) as cb, connect(c) as cc:
        ca.put_many(keys, [value(k) for k in keys])
        pool.wait_published("n0", keys)
        pool.wait_peers("n1", {"n0", "n2"}, cb)
        pool.wait_peers("n2", {"n0", "n1"}, cc)
        a.signal(signal.SIGKILL)
        killed = time.monotonic()
        assert cb.get(keys[0]) is None  # refused at once: a miss, not an error
        assert cb.get_many(keys[1:]) == [None] * 3
        assert time.monotonic() - killed < 5.0  # (the client's deadline is 10 s)
        assert cb.match_prefix(keys) == 0  # n1 skips it once it failed
        # n2 never called it: n0 leaves its lookups when n0's registry entry expires,
        # within the TTL of n0's last heartbeat.
        pool.wait_peers("n2", {"n1"}, cc)
        assert time.monotonic() - killed < TTL_S + 0.5
        assert cc.match_prefix(keys) == 0 and cc.get(keys[0]) is None


@pytest.mark.timeout(120)
def test_a_stale_entry_is_a_miss_and_is_cleaned(pool: Pool) -> None:
    pool.start("n0", "--dram", "64MiB")
    b = pool.start("n1", "--dram", "64MiB")
    ghost = chain(6, 1)[0]
    with connect(b) as cb:
        pool.wait_peers("n1", {"n0"}, cb)
        stored = pool.stored([ghost])[0]
        pool.index.publish("n0", [(stored, 2)])  # the index says n0 holds it; n0 does not
        assert cb.get(ghost) is None
        wait_until(lambda: stored not in pool.index.holdings("n0"),
                   what="n0 published the stale entry as gone")
        pool.index.publish("n0", [(stored, 2)])
        assert not cb.contains(ghost)
        wait_until(lambda: stored not in pool.index.holdings("n0"), what="cleaned again")


class CorruptingProxy:
    """A TCP proxy to ``target`` that flips the last byte of every chunk of over 1 KiB
    the target sends back (a hello's answer is smaller): a peer whose blocks arrive
    damaged."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.flipped = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            threading.Thread(target=self._pump, args=(client, upstream, False),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True),
                             daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, corrupt: bool) -> None:
        try:
            while chunk := src.recv(1 << 16):
                if corrupt and len(chunk) > 1024:
                    chunk = chunk[:-1] + bytes([chunk[-1] ^ 0xFF])
                    self.flipped += 1
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            dst.close()

    def close(self) -> None:
        self.listener.close()


@pytest.mark.timeout(120)
def test_a_block_that_arrives_corrupt_is_a_miss_never_wrong_bytes(pool: Pool) -> None:
    a = pool.start("n0", "--dram", "64MiB")
    b = pool.start("n1", "--dram", "64MiB")
    keys = chain(7, 4)
    proxy = CorruptingProxy(("127.0.0.1", a.port))
    try:
        # "evil": a node whose address is the proxy to n0, and the only listed holder.
        entry = {"v": 1, "node_id": "evil", "addresses": {"control": proxy.address},
                 "tiers": {}, "started_at": time.time()}
        pool.redis.set(f"kvstore:{CLUSTER}:node:evil", json.dumps(entry), px=60_000)
        pool.redis.sadd(f"kvstore:{CLUSTER}:nodes", "evil")
        with connect(a) as ca, connect(b) as cb:
            # The peer token is the pool's: scoped keys are what peers exchange. Reach
            # n0's stored keys through a put via n0, then list them under evil only.
            ca.put_many(keys, [value(k) for k in keys])
            pool.wait_published("n0", keys)
            stored = pool.stored(keys)
            pool.index.publish("evil", [(k, 2) for k in stored])
            pool.index.publish("n0", [(k, 0) for k in stored])
            pool.wait_peers("n1", {"n0", "evil"}, cb)
            got = cb.get_many(keys)
            assert all(v is None or v == value(k) for k, v in zip(keys, got, strict=True))
            assert proxy.flipped > 0 and None in got
            assert "failed its checksum" in b.output()
            for k, v in zip(keys, got, strict=True):  # and nothing corrupt was kept
                assert cb.get(k) in (None, value(k)) if v is None else cb.get(k) == value(k)
    finally:
        proxy.close()


@pytest.mark.timeout(180)
def test_redis_restart_keeps_nodes_serving_and_they_re_publish(pool: Pool) -> None:
    a = pool.start("n0", "--dram", "64MiB")
    b = pool.start("n1", "--dram", "64MiB")
    keys = chain(8, 6)
    with connect(a) as ca, connect(b) as cb:
        ca.put_many(keys, [value(k) for k in keys])
        pool.wait_published("n0", keys)
        pool.wait_peers("n1", {"n0"}, cb)
        secret = pool.redis.get(f"kvstore:{CLUSTER}:secret")
        stored = set(pool.stored(keys))
        pool.redis_server.kill()
        assert ca.get_many(keys) == [value(k) for k in keys]  # its own: served
        other = chain(9, 2)
        assert cb.get(other[0]) is None  # the pool: misses meanwhile, no error
        assert cb.put(other[1], b"written while Redis is down")
        pool.redis_server.start()  # empty: it kept nothing
        wait_until(lambda: stored <= set(pool.index.holdings("n0")),
                   what="n0 saw the new run id and re-published")
        assert pool.redis.get(f"kvstore:{CLUSTER}:secret") == secret  # put back first
        wait_until(lambda: len(pool.index.holdings("n1")) >= 1, what="n1 re-published")
        pool.wait_peers("n1", {"n0"}, cb)
        assert cb.get(keys[3]) == value(keys[3])
        assert "re-publishes what it holds" in a.output()


@pytest.mark.timeout(120)
def test_a_node_restarted_on_its_nvme_path_re_publishes_what_it_recovered(
        pool: Pool, tmp_path) -> None:
    nvme = ["--dram", "16MiB", "--nvme-path", str(tmp_path / "nvme0"), "--nvme", "64MiB"]
    a = pool.start("n0", *nvme)
    port = a.port
    b = pool.start("n1", "--dram", "64MiB")
    keys = chain(10, 5)
    with connect(a) as ca:
        ca.put_many(keys, [value(k) for k in keys])
    pool.wait_published("n0", keys)
    stored = set(pool.stored(keys))
    a.stop()  # a clean stop takes its entries out of the index
    wait_until(lambda: not pool.index.holdings("n0"), what="n0 left the index")
    pool.start("n0", *nvme, port=port)
    wait_until(lambda: stored <= set(pool.index.holdings("n0")), what="n0 re-published")
    assert all(bits & 4 for bits in pool.index.holdings("n0").values())  # on NVMe
    with connect(b) as cb:
        pool.wait_peers("n1", {"n0"}, cb)
        assert cb.get_many(keys) == [value(k) for k in keys]


TOKENS = """
[[tenant]]
name = "alice"
token = "alice-token-0123456789"
namespaces = ["a"]

[[tenant]]
name = "bob"
token = "bob-token-0123456789ab"
namespaces = ["b"]

[[tenant]]
name = "ops"
token = "ops-token-0123456789ab"
namespaces = ["a"]
admin = true
"""


@pytest.mark.timeout(120)
def test_tenants_reach_only_their_namespaces_across_the_pool(pool: Pool, tmp_path) -> None:
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(TOKENS)
    secret = tmp_path / "cluster.key"
    flags = ["--dram", "64MiB", "--token-file", str(tokens), "--cluster-secret", str(secret)]
    a = pool.start("n0", *flags)
    b = pool.start("n1", *flags)
    assert secret.stat().st_mode & 0o777 == 0o600
    keys = chain(11, 3)
    with connect(a, token="alice-token-0123456789") as alice_a, \
            connect(b, token="alice-token-0123456789") as alice_b, \
            connect(b, token="bob-token-0123456789ab") as bob_b, \
            connect(b, token="ops-token-0123456789ab") as ops_b:
        alice_a.put_many(keys, [value(k) for k in keys])
        pool.wait_published("n0", keys, namespace="a", secret_file=secret)
        pool.wait_peers("n1", {"n0"}, ops_b)
        assert alice_b.get_many(keys) == [value(k) for k in keys]  # her namespace, via n1
        assert bob_b.get_many(keys) == [None] * 3  # same key bytes, his namespace: none
        assert bob_b.match_prefix(keys) == 0 and not bob_b.contains(keys[0])
        assert bob_b.tier_bits(keys) == [0] * 3
        assert alice_b.tier_bits(keys) == [REMOTE_TIER_BIT] * 3
        # A tenant's connection cannot send peer operations, with any keys.
        stored = pool.stored(keys, namespace="a", secret_file=secret)
        conn = kvstore.client.sync.RawConnection(kvstore.client.settings.ClientSettings(
            a.url, token="bob-token-0123456789ab", shared_memory=False))
        try:
            with pytest.raises(AuthError, match="peer operations"):
                conn.request({"op": "peer_get", "keys": stored}, [], 5.0)
        finally:
            conn.close()
    # Nor can a token that is not the pool's pass for a peer's.
    with pytest.raises(AuthError):
        kvstore.client.sync.RawConnection(kvstore.client.settings.ClientSettings(
            a.url, token="0" * 64, shared_memory=False))


def test_a_node_refuses_a_pool_without_a_file_secret_when_tenants_are_kept_apart(
        tmp_path) -> None:
    from daemon.config import DaemonConfig
    from kvstore.errors import ConfigError

    tokens = tmp_path / "tokens.toml"
    tokens.write_text(TOKENS)
    with pytest.raises(ConfigError, match="--cluster-secret"):
        DaemonConfig(redis_url="redis://127.0.0.1:1/0", token_file=str(tokens))
    with pytest.raises(ConfigError, match="--cluster"):
        DaemonConfig(cluster="x y", redis_url="redis://127.0.0.1:1/0")
    with pytest.raises(ConfigError, match="need --redis"):
        DaemonConfig(cluster="prod")
    with pytest.raises(ConfigError, match="--key-file"):
        DaemonConfig(redis_url="redis://127.0.0.1:1/0", key_file=str(tmp_path / "k"))


@pytest.mark.timeout(120)
def test_pooled_capacity_what_one_node_has_no_room_for_lives_on_its_peers(pool: Pool) -> None:
    pool.start("n0", "--dram", "64MiB")
    b = pool.start("n1", "--dram", "8MiB", "--max-value", "1MiB")
    pool.start("n2", "--dram", "64MiB")
    keys = chain(12, 96)  # 24 MiB of 256 KiB blocks through a node of 8 MiB
    values = [value(k) * 4 for k in keys]
    with connect(b) as cb:
        pool.wait_peers("n1", {"n0", "n2"}, cb)
        wait_until(lambda: all(p.free_bytes > 0 for p in _peers(pool, "n1")),
                   what="the peers' room is in the registry")
        for at in range(0, len(keys), 8):
            assert cb.put_many(keys[at:at + 8], values[at:at + 8]) == 8
        stats = cb.stats()
        assert stats["tiers"]["dram"]["used_bytes"] <= 8 << 20
        wait_until(lambda: cb.stats()["cluster"]["spilled"] >= 60,
                   what="n1 handed its victims to its peers")
        assert cb.stats()["cluster"]["spill_dropped"] == 0
        elsewhere = set(pool.index.holdings("n0")) | set(pool.index.holdings("n2"))
        assert len(elsewhere & set(pool.stored(keys))) >= 60
        for k, v in zip(keys, values, strict=True):  # every block, through n1
            assert cb.get(k) == v


def _peers(pool: Pool, node_id: str) -> list:
    from kvstore.cluster.peers import Membership

    membership = Membership(pool.redis, CLUSTER, node_id)
    membership.refresh()
    return list(membership.live().values())


@pytest.mark.timeout(120)
def test_an_overwrite_is_never_undone_by_an_older_value_on_its_way_to_a_peer(
        pool: Pool) -> None:
    """A block evicted from a small node travels to a peer; overwriting it through the
    small node while it travels, or after it arrived, leaves only the new value."""
    pool.start("n0", "--dram", "64MiB")
    b = pool.start("n1", "--dram", "8MiB", "--max-value", "1MiB")
    with connect(b) as cb:
        pool.wait_peers("n1", {"n0"}, cb)
        wait_until(lambda: all(p.free_bytes > 0 for p in _peers(pool, "n1")),
                   what="the peers' room is in the registry")
        for round_ in range(6):
            key = chain(50 + round_, 1)[0]
            cb.put(key, b"old" * 1000)
            filler = chain(60 + round_, 12)  # pushes the old value out of n1
            cb.put_many(filler, [value(k) * 4 for k in filler])
            if round_ % 2:
                time.sleep(0.3)  # (arrived at n0 by now; else it may be on its way)
            cb.put(key, b"new" * 1000)
            for _ in range(5):
                assert cb.get(key) == b"new" * 1000
                time.sleep(0.05)
            assert cb.get(key) == b"new" * 1000


@pytest.mark.timeout(180)
def test_a_pool_on_a_three_master_redis_cluster(tmp_path) -> None:
    """The same pool with its registry, index and secret spread over a real Redis Cluster
    (``--redis redis+cluster://``); the cluster-aware client finds out by itself."""
    pool = Pool(tmp_path, redis_cluster=True)
    try:
        a = pool.start("n0", "--dram", "64MiB")
        b = pool.start("n1", "--dram", "8MiB", "--max-value", "1MiB")
        keys = chain(70, 6)
        with connect(a) as ca, connect(b) as cb:
            ca.put_many(keys, [value(k) for k in keys])
            pool.wait_published("n0", keys)
            pool.wait_peers("n1", {"n0"}, cb)
            assert cb.get_many(keys) == [value(k) for k in keys]
            assert cb.match_prefix(keys) == 6
            more = chain(71, 48)  # 12 MiB through a node of 8 MiB: its victims go to n0
            for at in range(0, len(more), 8):
                assert cb.put_many(more[at:at + 8], [value(k) * 4 for k in more[at:at + 8]]) == 8
            wait_until(lambda: cb.stats()["cluster"]["spilled"] > 0, what="n1 spilled")
            url = f"kvstore+cluster://127.0.0.1:{pool.redis_port}/0?cluster={CLUSTER}"
            with kvstore.connect(url, shared_memory=False) as cc:
                assert cc.get_many(keys) == [value(k) for k in keys]
                assert [loc.node_id for loc in cc.locate(keys)] == ["n0"]
                # (written through n1: the index lists them once n1 has published them)
                wait_until(lambda: cc.match_prefix(more) == len(more), what="published")
                assert cc.get_many(more) == [value(k) * 4 for k in more]
        slots = {pool.redis.keyslot(k) for k in (f"kvstore:{CLUSTER}:blocks:{{n0}}",
                                                 f"kvstore:{CLUSTER}:blocks:{{n1}}",
                                                 f"kvstore:{CLUSTER}:node:n0")}
        assert len(slots) > 1  # spread over the shards, and it all still works
    finally:
        pool.close()


@pytest.mark.timeout(180)
def test_written_through_one_node_a_pool_of_three_keeps_about_three_nodes_worth(
        pool: Pool) -> None:
    """Three nodes of 16 MiB each, everything written through one: the pool keeps about
    three times what that node alone could (room-gated spills fill the others first)."""
    for n in ("n0", "n1", "n2"):
        pool.start(n, "--dram", "16MiB", "--max-value", "1MiB")
    keys = chain(80, 240)  # 60 MiB of 256 KiB blocks
    values = [value(k) * 4 for k in keys]
    with connect(pool.nodes["n1"]) as cb:
        pool.wait_peers("n1", {"n0", "n2"}, cb)
        wait_until(lambda: all(p.free_bytes > 0 for p in _peers(pool, "n1")),
                   what="the peers' room is in the registry")
        for at in range(0, len(keys), 8):
            cb.put_many(keys[at:at + 8], values[at:at + 8])
            time.sleep(0.02)  # (a steady writer: the spill thread keeps up)
        wait_until(lambda: cb.stats()["cluster"]["spill_queued"] == 0,
                   what="n1's victims reached the peers")
        kept = sum(v == want for v, want in zip(cb.get_many(keys), values, strict=True))
    one_node = (16 << 20) // (256 << 10)  # 64 blocks: what n1 alone could keep
    assert kept >= 2.5 * one_node, f"kept {kept} blocks of 256 KiB; one node keeps {one_node}"


@pytest.mark.timeout(120)
def test_an_overwrite_through_shared_memory_drops_the_other_nodes_copies(pool: Pool) -> None:
    a = pool.start("n0", "--dram", "64MiB")
    b = pool.start("n1", "--dram", "64MiB")
    key = chain(90, 1)[0]
    with connect(a) as ca, connect(b, shared_memory=True) as cb:
        ca.put(key, b"old" * 1000)
        pool.wait_published("n0", [key])
        assert cb.put(key, b"new" * 1000)  # a same-host client: reserve, copy, commit
        assert cb._idle[0].session.pool is not None  # (the shared pool was the path)
        wait_until(lambda: ca.get(key) in (None, b"new" * 1000),
                   what="n0's old copy dropped after the commit")
        assert cb.get(key) == b"new" * 1000


@pytest.mark.timeout(120)
def test_a_hung_holder_is_a_miss_within_the_peer_timeout(pool: Pool) -> None:
    """SIGSTOP: the holder's socket stays open and silent. Reads through another node,
    and through the cluster-aware client, come back as misses within their deadlines."""
    a = pool.start("n0", "--dram", "64MiB")
    b = pool.start("n1", "--dram", "64MiB")
    keys = chain(95, 2)
    with connect(a) as ca, connect(b) as cb:
        ca.put_many(keys, [value(k) for k in keys])
        pool.wait_published("n0", keys)
        pool.wait_peers("n1", {"n0"}, cb)
        url = f"kvstore+cluster://127.0.0.1:{pool.redis_port}/0?cluster={CLUSTER}"
        with kvstore.connect(url, shared_memory=False, timeout_s=3.0) as cc:
            assert cc.get(keys[0]) == value(keys[0])
            a.proc.send_signal(signal.SIGSTOP)
            try:
                started = time.monotonic()
                assert cb.get(keys[1]) is None  # n1's peer call times out: a miss
                assert time.monotonic() - started < 4.0  # (peer timeout 2 s)
                started = time.monotonic()
                assert cc.get(keys[1]) is None  # the client's own deadline: a miss
                assert time.monotonic() - started < 8.0  # (3 s deadline, and a retry)
            finally:
                a.proc.send_signal(signal.SIGCONT)


@pytest.mark.timeout(120)
def test_a_pool_node_exports_its_pool_figures_to_prometheus(pool: Pool) -> None:
    import urllib.request

    from tests.daemon.conftest import free_port

    pool.start("n0", "--dram", "64MiB")
    metrics = f"127.0.0.1:{free_port()}"
    b = pool.start("n1", "--dram", "64MiB", "--metrics", metrics)
    keys = chain(96, 3)
    with connect(pool.nodes["n0"]) as ca, connect(b) as cb:
        ca.put_many(keys, [value(k) for k in keys])
        pool.wait_published("n0", keys)
        pool.wait_peers("n1", {"n0"}, cb)
        assert cb.get_many(keys) == [value(k) for k in keys]
    with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    assert "kvstore_pool_remote_hits_total 3.0" in text
    assert "kvstore_pool_peers 1.0" in text and "kvstore_pool_redis_up 1.0" in text


@pytest.mark.timeout(120)
def test_an_engine_on_a_pool_node_plans_no_fetches(pool: Pool) -> None:
    """The remote tier has no measured cost: a planner would count a peer's blocks as not
    cached and compute them, so an engine on a node of a pool fetches without one; its
    own blocks are in its tiers, a peer's in the remote one."""
    import torch

    from engines.cost_model import CostModel, planner_for
    from engines.prefill import PrefillEngine
    from engines.presets import load_model

    a = pool.start("n0", "--dram", "64MiB")
    b = pool.start("n1", "--dram", "64MiB")
    model = load_model("tiny", dtype=torch.float32).model
    cost = CostModel(*[1e-3] * 8)
    with connect(a) as ca, connect(b) as cb, \
            PrefillEngine(model, ca, num_pages=64) as on_a, \
            PrefillEngine(model, cb, num_pages=64) as on_b:
        assert planner_for(on_b.io, cost) is None
        prompt = list(range(40))
        on_a.prefill(prompt)
        keys = on_a.io.keys(prompt)
        pool.wait_published("n0", keys)
        pool.wait_peers("n1", {"n0"}, cb)
        assert on_a.io.tier_bits(keys) == [2, 2]
        assert on_b.io.tier_bits(keys) == [REMOTE_TIER_BIT] * 2
        assert on_b.prefill(prompt).num_cached_tokens == 32  # fetched from the pool

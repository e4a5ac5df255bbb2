"""`tier_bits` and `put_in_tier` over the wire (a fetch planner's question, and how it
measures each tier of a daemon): real kvstored processes with DRAM and an NVMe tier in a
temporary directory, through the shared pool and over TCP, the async client, tenants kept
apart exactly as for `contains` (test_lifecycle's tenants), and bad requests answered with
their reason."""

from __future__ import annotations

import asyncio

import pytest

import kvstore
from kvstore.errors import AuthError, InvalidKeyError, InvalidValueError, ProtocolError
from kvstore.wire.ops import MAX_BATCH_KEYS
from tests.conftest import make_key, make_value
from tests.daemon.test_lifecycle import TOKEN_A, TOKEN_B, tenant_daemon  # noqa: F401
from tests.daemon.test_robustness import RawConnection

KiB = 1024
HBM, DRAM, NVME = 1, 2, 4


@pytest.fixture
def daemon(tmp_path, start_daemon):
    """DRAM of about 16 values of 64 KiB, and an NVMe tier under the test's directory."""
    return start_daemon("--dram", "1MiB", "--nvme-path", str(tmp_path / "nvme"), "--nvme",
                        "64MiB", "--max-value", "256KiB")


@pytest.mark.parametrize("shared_memory", [True, False], ids=["shm", "tcp"])
def test_tier_bits_tell_blocks_in_dram_and_on_nvme(daemon, shared_memory) -> None:
    keys = [make_key(("chain", i)) for i in range(48)]
    values = [make_value(("chain", i), 64 * KiB) for i in range(48)]
    with kvstore.connect(daemon.url, shared_memory=shared_memory) as client:
        assert client.tiers == ["dram", "nvme"]
        for key, value in zip(keys, values, strict=True):  # the daemon demotes the oldest
            assert client.put(key, value)
        bits = client.tier_bits(keys)
        assert bits == [{"dram": DRAM, "nvme": NVME}[client.tier_of(k)] for k in keys]
        assert bits[0] == NVME and bits[-1] == DRAM, bits  # demoted by DRAM's evictions
        assert client.tier_bits([make_key("never stored")]) == [0]
        assert client.tier_bits([]) == []
        # A hit on NVMe promotes the block: it is then in both tiers, fastest first.
        assert client.get(keys[0]) == values[0]
        assert client.tier_bits(keys[:1]) == [DRAM | NVME]
        # put_in_tier: straight onto the disk, and read back from it.
        fresh = [make_key(("placed", i)) for i in range(3)]
        placed = [make_value(("placed", i), 64 * KiB) for i in range(3)]
        assert client.put_in_tier("nvme", fresh, placed) == 3
        assert client.tier_bits(fresh) == [NVME] * 3
        assert client.get_many(fresh[1:]) == placed[1:]
        assert client.put_in_tier("dram", fresh[:1], [b"small"]) == 1
        assert client.tier_bits(fresh[:1]) == [DRAM] and client.get(fresh[0]) == b"small"
        assert client.delete(fresh[2]) and client.tier_bits(fresh[2:]) == [0]
        stats = client.stats()
    assert stats["tiers"]["nvme"]["bytes_read"] > 0


def test_the_async_client_asks_the_same(daemon) -> None:
    async def run() -> None:
        async with await kvstore.aconnect(daemon.url) as client:
            keys = [make_key(("async", i)) for i in range(2)]
            assert await client.put(keys[0], make_value("a", 4 * KiB))
            assert await client.put_in_tier("nvme", keys[1:], [make_value("b", 8 * KiB)]) == 1
            assert await client.tier_bits([*keys, make_key("none")]) == [DRAM, NVME, 0]

    asyncio.run(run())


def test_a_tenant_learns_nothing_of_another_namespaces_blocks(tenant_daemon  # noqa: F811
                                                              ) -> None:
    """As with contains: b asking about a's key bytes is asking about its own namespace's
    blocks (none); its put_in_tier of them stores its own; a token of several namespaces
    that names none is refused the key operations, and one never granted a namespace
    cannot connect to it."""
    url = tenant_daemon.url
    keys = [make_key(("secret", i)) for i in range(4)]
    values = [make_value(("secret", i), 64 * KiB) for i in range(4)]
    with kvstore.connect(url, token=TOKEN_A, namespace="a") as a:
        assert a.put_many(keys[:2], values[:2]) == 2
        assert a.put_in_tier("dram", keys[2:], values[2:]) == 2
        assert a.tier_bits(keys) == [DRAM] * 4
        with kvstore.connect(url, token=TOKEN_B, namespace="b", shared_memory=False) as b:
            assert b.tier_bits(keys) == [0] * 4
            assert not any(b.contains(k) for k in keys)
            assert b.put_in_tier("dram", keys[:1], [b"b's own"]) == 1
            assert b.tier_bits(keys) == [DRAM, 0, 0, 0] and b.get(keys[0]) == b"b's own"
        assert a.tier_bits(keys) == [DRAM] * 4 and a.get(keys[0]) == values[0]  # a's own
    with kvstore.connect(url, token=TOKEN_B, namespace="shared", shared_memory=False) as b:
        assert b.tier_bits(keys) == [0] * 4  # a's blocks are in "a", not in "shared"
    with kvstore.connect(url, token=TOKEN_A, shared_memory=False) as unnamed:
        for call in (lambda: unnamed.tier_bits(keys), lambda: unnamed.contains(keys[0]),
                     lambda: unnamed.put_in_tier("dram", keys[:1], [b"x"])):
            with pytest.raises(AuthError, match="named no namespace"):
                call()
    with pytest.raises(AuthError, match="namespace"):
        kvstore.connect(url, token=TOKEN_B, namespace="a")


def test_bad_input_is_refused_with_its_reason(daemon) -> None:
    key = make_key("k")
    with kvstore.connect(daemon.url, shared_memory=False) as client:
        with pytest.raises(InvalidKeyError, match="16 bytes"):
            client.tier_bits([key, b"short"])
        with pytest.raises(InvalidValueError, match="not a tier's name"):
            client.put_in_tier("disk", [key], [b"v"])
        with pytest.raises(InvalidValueError, match="1 keys but 2 values"):
            client.put_in_tier("dram", [key], [b"v", b"w"])
        with pytest.raises(ProtocolError, match=r"no hbm tier .*dram, nvme"):
            client.put_in_tier("hbm", [key], [b"v"])
        with pytest.raises(InvalidValueError, match="max_value_bytes"):
            client.put_in_tier("nvme", [key], [bytes(512 * KiB)])
        assert client.tier_bits([key]) == [0]  # nothing was stored by any of them
    raw = RawConnection(daemon.port)
    try:
        raw.hello()
        for fields, data, code, reason in (
                ({}, b"", "bad_request", "needs the field 'keys'"),
                ({"keys": key}, b"", "bad_request", "list of at most"),
                ({"keys": [key[:15]]}, b"", "invalid_key", "16 bytes"),
                ({"keys": [key] * (MAX_BATCH_KEYS + 1)}, b"", "bad_request", "at most 65536"),
                ({"keys": [key]}, b"data", "bad_request", "carries no data")):
            answer = raw.call("tier_bits", data, **fields)
            assert (answer["ok"], answer["code"]) == (False, code), answer
            assert reason in answer["message"], answer
        for fields, data, code, reason in (
                ({"tier": 4, "keys": [key], "sizes": [1]}, b"v", "bad_request", "tier's name"),
                ({"tier": "nvme", "keys": [key], "sizes": [2]}, b"v", "invalid_value",
                 "add up to 2"),
                ({"tier": "nvme", "keys": [key]}, b"v", "bad_request", "'sizes'")):
            answer = raw.call("put_in_tier", data, **fields)
            assert (answer["ok"], answer["code"]) == (False, code), answer
            assert reason in answer["message"], answer
        answer = raw.call("tier_bits", keys=[key])  # the connection still serves
        assert answer["ok"] and answer["bits"] == [0]
    finally:
        raw.sock.close()

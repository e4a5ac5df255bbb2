"""`kvstore.aconnect`: the Store API as coroutines, against a real daemon subprocess."""

from __future__ import annotations

import asyncio
import itertools

import numpy as np
import pytest
import pytest_asyncio

import kvstore
from kvstore import BufferSizeError, InvalidKeyError, StoreConnectionError
from tests.conftest import make_key, make_value

pytestmark = pytest.mark.asyncio
_namespaces = itertools.count()
KiB = 1024


@pytest_asyncio.fixture(params=["shm", "tcp"])
async def aclient(request, shared_daemon):
    client = await kvstore.aconnect(shared_daemon.url, namespace=f"async-{next(_namespaces)}",
                                    shared_memory=request.param == "shm")
    yield client
    await client.aclose()


async def test_async_roundtrip(aclient):
    keys = kvstore.prefix_hashes(np.arange(64), block_tokens=16, namespace="async")
    values = [make_value(i, 200 * KiB) for i in range(4)]
    assert await aclient.put_many(keys, values) == 4
    assert await aclient.get_many(keys) == values
    assert await aclient.match_prefix(keys) == 4
    assert await aclient.get(keys[2]) == values[2]
    out = bytearray(200 * KiB)
    assert await aclient.get_into(keys[1], out) is True and bytes(out) == values[1]
    assert await aclient.contains(keys[0]) is True
    assert await aclient.tier_of(keys[0]) == "dram"
    assert await aclient.delete(keys[0]) is True
    assert await aclient.get(keys[0]) is None
    await aclient.flush()
    assert (await aclient.stats())["hits"] >= 4


async def test_async_errors(aclient):
    with pytest.raises(InvalidKeyError):
        await aclient.get(b"short")
    await aclient.put(make_key("a"), b"x" * 100)
    with pytest.raises(BufferSizeError):
        await aclient.get_into(make_key("a"), bytearray(99))


async def test_many_concurrent_calls_share_a_pool(aclient):
    async def one(i: int) -> bool:
        key, value = make_key(("c", i)), make_value(("c", i), 1000 + i)
        await aclient.put(key, value)
        return await aclient.get(key) == value

    assert all(await asyncio.gather(*(one(i) for i in range(64))))
    assert len(aclient._idle) <= 8  # never more connections than max_connections


async def test_unreachable_daemon_names_the_url():
    with pytest.raises(StoreConnectionError, match=r"127\.0\.0\.1:1\b"):
        await kvstore.aconnect("kvstore://127.0.0.1:1")

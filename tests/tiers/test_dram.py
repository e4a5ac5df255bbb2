"""The DRAM tier's shared pool: real POSIX shared memory, and its directory
(`kvstore.shm.directory`) told of every slot a key gains and loses."""

from __future__ import annotations

import secrets

import pytest

from kvstore.shm.directory import Directory
from kvstore.tiers.base import TierKind
from kvstore.tiers.dram import HostPool
from kvstore.tiers.memory import MemoryTier
from tests.conftest import make_key

pytestmark = pytest.mark.skipif(not Directory.supported, reason="x86-64 only (see module)")


def test_a_shared_pool_lists_every_slot_a_key_holds_and_nothing_else():
    pool = HostPool(1 << 20, shm_name=f"kvstore-test-{secrets.token_hex(4)}")
    tier = MemoryTier(TierKind.DRAM, pool, 64 * 1024)
    reader = Directory(pool.directory.name, create=False)
    try:
        assert tier.put(make_key("a"), b"a" * 5000)
        offset, nbytes = tier.slot_of(make_key("a"))
        assert reader.lookup(make_key("a"))[2:] == (offset, nbytes)
        assert tier.put(make_key("a"), b"b" * 3000)  # overwrite: the new slot
        assert reader.lookup(make_key("a"))[2:] == tier.slot_of(make_key("a"))
        tier.put(make_key("c"), b"c")
        tier.detach(make_key("c"))  # kept allocated for readers, but no longer listed
        assert reader.lookup(make_key("c")) is None
        tier.evict(make_key("a"))
        assert reader.lookup(make_key("a")) is None
    finally:
        reader.close()
        tier.close()

"""Per-owner quotas (issue 15, finding 8): a tenant flooding the store evicts its own blocks,
not another's; every owner stays within its quota in every tier."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvstore
from kvstore import ConfigError
from tests.conftest import make_key, make_value

KiB, MiB = 1024, 1024 * 1024
A, B = 1, 2


def _flood(store: kvstore.Store, owner: int, count: int, nbytes: int = 64 * KiB) -> None:
    for i in range(count):
        assert store.put(make_key((owner, i)), make_value((owner, i), nbytes), owner=owner)


@pytest.mark.parametrize("with_quotas", [True, False])
def test_a_flooding_tenant_evicts_its_own_blocks_not_anothers(with_quotas):
    with kvstore.Store(kvstore.StoreConfig(dram_bytes="8MiB", max_value_bytes="1MiB")) as store:
        if with_quotas:
            store.set_quota(A, "dram", 3 * MiB)
            store.set_quota(B, "dram", 4 * MiB)
        _flood(store, A, 40)  # 2.5 MiB
        _flood(store, B, 600)  # 37.5 MiB
        kept = sum(store.contains(make_key((A, i))) for i in range(40))
        if not with_quotas:  # the finding: B's flood took A's blocks
            assert kept < 20
            return
        assert kept == 40
        assert all(store.get(make_key((A, i))) == make_value((A, i), 64 * KiB)
                   for i in range(40))
        usage = store.usage(B)["dram"]
        assert usage["used_bytes"] <= 4 * MiB and usage["quota_bytes"] == 4 * MiB
        assert store.usage(A)["dram"] == {"used_bytes": 40 * 64 * KiB, "blocks": 40,
                                          "quota_bytes": 3 * MiB}
        # B's most recent blocks are the ones it kept
        assert store.contains(make_key((B, 599))) and not store.contains(make_key((B, 0)))


def test_quotas_hold_in_the_nvme_tier_too(tmp_path):
    config = kvstore.StoreConfig(dram_bytes="4MiB", nvme_path=tmp_path, nvme_bytes="64MiB",
                                 max_value_bytes="1MiB")
    with kvstore.Store(config) as store:
        store.set_quota(A, "nvme", 8 * MiB)
        store.set_quota(B, "dram", 2 * MiB)
        store.set_quota(B, "nvme", 6 * MiB)
        _flood(store, A, 100)  # 6.25 MiB: most of it demoted to NVMe
        a_in_nvme = store.usage(A)["nvme"]["blocks"]
        assert a_in_nvme > 30
        _flood(store, B, 400)  # 25 MiB, its DRAM victims demoted within its NVMe quota
        assert store.usage(B)["dram"]["used_bytes"] <= 2 * MiB
        assert store.usage(B)["nvme"]["used_bytes"] <= 6 * MiB
        # A has no DRAM quota and the two do not fit DRAM: B's puts demote A's DRAM blocks
        # to NVMe, where A's quota holds them all; none of A's is lost.
        usage = store.usage(A)
        assert usage["dram"]["blocks"] + usage["nvme"]["blocks"] >= 100
        assert usage["nvme"]["blocks"] >= a_in_nvme
        assert all(store.get(make_key((A, i))) == make_value((A, i), 64 * KiB)
                   for i in range(100))


def test_a_value_over_its_owners_quota_is_refused_and_changes_nothing():
    with kvstore.Store(kvstore.StoreConfig(dram_bytes="8MiB", max_value_bytes="1MiB")) as store:
        store.set_quota(A, "dram", 256 * KiB)
        _flood(store, A, 4)
        assert not store.put(make_key("big"), bytes(512 * KiB), owner=A)
        assert all(store.contains(make_key((A, i))) for i in range(4))
        # a chain: its own blocks are never evicted for its tail, so it stops at the quota
        keys = [make_key(("chain", i)) for i in range(8)]
        assert store.put_many(keys, [bytes(64 * KiB)] * 8, owner=A) == 4
        assert store.usage(A)["dram"]["used_bytes"] <= 256 * KiB


def test_bad_quotas_are_refused():
    with kvstore.Store(kvstore.StoreConfig(dram_bytes="8MiB")) as store:
        with pytest.raises(ConfigError, match="tier 'nvme'"):
            store.set_quota(A, "nvme", MiB)
        with pytest.raises(ConfigError, match="owner"):
            store.set_quota(0, "dram", MiB)
        with pytest.raises(ConfigError, match="byte count"):
            store.set_quota(A, "dram", -1)
        store.set_quota(A, "dram", MiB)
        store.set_quota(A, "dram", None)
        assert store.usage(A)["dram"]["quota_bytes"] is None


_ops = st.lists(st.tuples(st.sampled_from([0, 1, 2, 3]), st.integers(0, 40),
                          st.sampled_from([4 * KiB, 20 * KiB, 64 * KiB, 200 * KiB]),
                          st.sampled_from(["put", "put", "put", "delete", "get"])),
                min_size=1, max_size=120)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(ops=_ops)
def test_every_owner_stays_within_its_quotas(tmp_path_factory, ops):
    path = tmp_path_factory.mktemp("quota-nvme")
    config = kvstore.StoreConfig(dram_bytes="2MiB", nvme_path=path, nvme_bytes="32MiB",
                                 max_value_bytes="256KiB")
    quotas = {(1, "dram"): 512 * KiB, (1, "nvme"): 2 * MiB, (2, "dram"): 700 * KiB,
              (3, "nvme"): 1 * MiB}
    with kvstore.Store(config) as store:
        for (owner, tier), nbytes in quotas.items():
            store.set_quota(owner, tier, nbytes)
        values: dict[bytes, bytes] = {}
        for owner, i, nbytes, op in ops:
            key = make_key(("p", i))
            if op == "put":
                value = make_value((owner, i, nbytes), nbytes)
                if store.put(key, value, owner=owner):
                    values[key] = value
                else:
                    values.pop(key, None)  # refused: the old value was dropped, or kept
            elif op == "delete":
                store.delete(key)
                values.pop(key, None)
            else:
                got = store.get(key)
                assert got is None or got == values.get(key)
            for (quota_owner, tier), nbytes in quotas.items():
                assert store.usage(quota_owner)[tier]["used_bytes"] <= nbytes
            stats = store.stats()
            for tier in stats["tiers"].values():
                assert tier["used_bytes"] <= tier["capacity_bytes"]


def test_a_block_that_changed_owner_is_not_evicted_for_its_former_owners_quota():
    """From review: B overwrites A's key (a namespace both are granted); A's quota must not
    take B's block for one of A's (its heap item, left from when it was A's, named it)."""
    with kvstore.Store(kvstore.StoreConfig(dram_bytes="8MiB", max_value_bytes="1MiB")) as store:
        store.set_quota(A, "dram", 128 * KiB)
        shared = make_key("shared")
        assert store.put(shared, make_value("a", 64 * KiB), owner=A)
        assert store.put(shared, make_value("b", 64 * KiB), owner=B)
        for i in range(3):
            assert store.put(make_key((A, i)), make_value((A, i), 64 * KiB), owner=A)
        assert store.get(shared) == make_value("b", 64 * KiB)
        assert store.usage(B)["dram"]["blocks"] == 1
        assert store.usage(A)["dram"] == {"used_bytes": 128 * KiB, "blocks": 2,
                                          "quota_bytes": 128 * KiB}


def test_reserved_slots_count_against_their_owners_quota():
    """From review: a shared-memory put_many reserves its whole batch before committing;
    reservations must count, or B's batch took other tenants' room past B's quota."""
    with kvstore.Store(kvstore.StoreConfig(dram_bytes="16MiB", max_value_bytes="1MiB")) as store:
        store.set_quota(A, "dram", 6 * MiB)
        store.set_quota(B, "dram", 8 * MiB)
        _flood(store, A, 64)  # 4 MiB
        offsets = []
        while (offset := store.reserve_host(128 * KiB, None, B)) is not None:
            offsets.append(offset)
        assert len(offsets) == 64  # 8 MiB: B's quota, however much room the pool has
        assert store.usage(A)["dram"]["blocks"] == 64
        for i, offset in enumerate(offsets[:32]):  # committed, the rest given back
            assert store.commit_host(make_key((B, i)), offset, 128 * KiB, None, B)
        for offset in offsets[32:]:
            store.release_host(offset)
        assert store.usage(B)["dram"]["used_bytes"] == 4 * MiB
        assert store.reserve_host(128 * KiB, None, B) is not None  # its quota has room again

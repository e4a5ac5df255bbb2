"""Per-tenant quotas in the token file (issue 15, finding 8), against a real daemon: a
tenant flooding it (over TCP and through shared memory) evicts its own blocks, not
another's; stats show a tenant its own figures only, and an admin everything."""

from __future__ import annotations

import pytest

import kvstore
from tests.conftest import make_key, make_value

KiB, MiB = 1024, 1024 * 1024
TOKEN_A, TOKEN_B, TOKEN_ADMIN = ("token-a-quota-0123456789", "token-b-quota-0123456789",
                                 "token-admin-quota-012345")


@pytest.fixture
def quota_daemon(tmp_path, start_daemon):
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(f'''
[[tenant]]
name = "a"
token = "{TOKEN_A}"
namespaces = ["a"]
quota = {{ dram = "6MiB" }}

[[tenant]]
name = "b"
token = "{TOKEN_B}"
namespaces = ["b"]
shared_memory = true
quota = {{ dram = "8MiB", nvme = "8MiB" }}

[[tenant]]
name = "ops"
token = "{TOKEN_ADMIN}"
namespaces = ["ops"]
admin = true
''')
    return start_daemon("--dram", "16MiB", "--nvme-path", str(tmp_path / "nvme"), "--nvme",
                        "64MiB", "--max-value", "1MiB", "--token-file", str(tokens))


@pytest.mark.parametrize("b_shared_memory", [False, True], ids=["tcp", "shm"])
def test_a_flooding_tenant_evicts_only_its_own_blocks(quota_daemon, b_shared_memory):
    url = quota_daemon.url
    a_values = {make_key(("a", i)): make_value(("a", i), 64 * KiB) for i in range(64)}
    with kvstore.connect(url, token=TOKEN_A, shared_memory=False) as a:
        assert a.put_many(list(a_values), list(a_values.values())) == 64  # 4 MiB
        with kvstore.connect(url, token=TOKEN_B, shared_memory=b_shared_memory) as b:
            for i in range(400):  # 50 MiB of its own, over its quotas in DRAM and NVMe
                assert b.put(make_key(("b", i)), make_value(("b", i), 128 * KiB))
            stats = b.stats()
            assert stats["tenant"] == "b" and stats["namespaces"] == ["b"]
            assert stats["tiers"]["dram"]["used_bytes"] <= 8 * MiB
            assert stats["tiers"]["nvme"]["used_bytes"] <= 8 * MiB
            assert stats["tiers"]["dram"]["quota_bytes"] == 8 * MiB
            # nothing of another tenant, nor of the whole store
            assert not {"tenants", "evictions", "blocks", "clients", "leases"} & set(stats)
            assert b.get(make_key(("b", 399))) == make_value(("b", 399), 128 * KiB)
            # a batch (through shared memory: all its slots reserved before the commit)
            batch = [make_key(("batch", i)) for i in range(100)]
            b.put_many(batch, [make_value(("batch", i), 128 * KiB) for i in range(100)])
            assert b.stats()["tiers"]["dram"]["used_bytes"] <= 8 * MiB
        assert a.get_many(list(a_values)) == list(a_values.values())
        assert a.stats()["tiers"]["dram"]["blocks"] == 64
    with kvstore.connect(url, token=TOKEN_ADMIN, shared_memory=False) as ops:
        stats = ops.stats()
        assert set(stats["tenants"]) == {"a", "b", "ops"}
        assert stats["tenants"]["a"]["dram"]["blocks"] == 64
        assert stats["evictions"] > 0 and "clients" in stats


def _one_tenant(tmp_path, quota: str) -> str:
    """A token file of tenant a with this ``quota`` line (TOML); its path."""
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(f'[[tenant]]\nname = "a"\ntoken = "{TOKEN_A}"\nnamespaces = ["a"]\n'
                      f"quota = {quota}\n")
    return str(tokens)


def test_a_quota_for_a_missing_tier_is_ignored_with_a_warning(tmp_path, start_daemon):
    daemon = start_daemon("--dram", "16MiB", "--token-file",
                          _one_tenant(tmp_path, '{ nvme = "1GiB" }'))
    with kvstore.connect(daemon.url, token=TOKEN_A) as a:
        assert a.put(make_key(1), b"x")
    assert "has a quota for nvme, which this daemon does not have" in daemon.output()


@pytest.mark.parametrize("quota, message", [
    ('"lots"', "quota must be a table"),
    ('{ ssd = "1GiB" }', "unknown tier 'ssd'"),
    ('{ dram = "many" }', "quota.dram"),
])
def test_bad_quotas_in_the_token_file_are_refused(tmp_path, start_daemon, quota, message):
    with pytest.raises(RuntimeError, match=message):
        start_daemon("--dram", "16MiB", "--token-file", _one_tenant(tmp_path, quota))

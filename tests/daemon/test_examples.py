"""The example configuration files in examples/ start a real daemon and mean what they say."""

from __future__ import annotations

import tomllib
import urllib.request

import pytest

import kvstore
from kvstore import AuthError
from tests.conftest import make_key, make_value
from tests.daemon.conftest import REPO, free_port

EXAMPLES = REPO / "examples"


def test_the_example_config_and_tokens_start_a_daemon(tmp_path, start_daemon):
    config = tomllib.loads((EXAMPLES / "kvstored.toml").read_text())
    tenants = tomllib.loads((EXAMPLES / "tokens.toml").read_text())["tenant"]
    metrics = f"127.0.0.1:{free_port()}"
    # The file as it is, but for what must differ on a test machine: where it listens and
    # where its files go (flags win over the file), and smaller tiers.
    daemon = start_daemon("--config", str(EXAMPLES / "kvstored.toml"),
                          "--token-file", str(EXAMPLES / "tokens.toml"),
                          "--nvme-path", str(tmp_path / "nvme"), "--metrics", metrics,
                          "--dram", "64MiB", "--nvme", "256MiB")
    first, second, operator = tenants
    key, value = make_key("example"), make_value("example", 200_000)
    with kvstore.connect(daemon.url, token=first["token"], namespace=first["namespaces"][0],
                         shared_memory=False) as client:
        assert client.put(key, value)
        assert client.get(key) == value
        assert client._idle[0].session.max_value_bytes == kvstore.StoreConfig(
            max_value_bytes=config["max-value"]).max_value_bytes
    with kvstore.connect(daemon.url, token=second["token"], namespace=second["namespaces"][0],
                         shared_memory=False) as other:
        assert other.get(key) is None  # another tenant's namespace
    with pytest.raises(AuthError):
        kvstore.connect(daemon.url, token=second["token"], namespace=first["namespaces"][0])
    with kvstore.connect(daemon.url, token=first["token"], namespace=first["namespaces"][0],
                         shared_memory=False) as client:
        own = client.stats()  # a tenant sees its own use and quota only
        assert own["tenant"] == first["name"] and "tenants" not in own
        assert own["tiers"]["dram"]["quota_bytes"] == kvstore.StoreConfig(
            dram_bytes=first["quota"]["dram"]).dram_bytes
    with kvstore.connect(daemon.url, token=operator["token"], shared_memory=False) as client:
        assert set(client.stats()["tenants"]) == {t["name"] for t in tenants}
    with urllib.request.urlopen(f"http://{metrics}/healthz", timeout=10) as response:
        assert response.status == 200
    assert (tmp_path / "nvme" / "kvstored.key").exists()

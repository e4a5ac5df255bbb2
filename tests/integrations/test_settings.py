"""The vLLM connector's settings (``kv_connector_extra_config``): checked, clear errors."""

from __future__ import annotations

import re

import pytest

from kvstore.errors import ConfigError
from kvstore.integrations.settings import ConnectorSettings


def test_daemon_and_embedded_settings() -> None:
    daemon = ConnectorSettings.parse({"url": "kvstore://10.0.0.5:7400", "timeout_s": 2})
    assert daemon.url == "kvstore://10.0.0.5:7400" and daemon.timeout_s == 2.0
    assert daemon.on_load_error == "recompute"
    embedded = ConnectorSettings.parse({"dram": "4GiB", "nvme_path": "/x", "nvme": "1TiB"})
    assert embedded.url is None and embedded.dram_bytes == 4 << 30
    assert embedded.nvme_bytes == 1 << 40 and embedded.nvme_path == "/x"
    assert embedded.kv_cache_layout is None
    assert ConnectorSettings.parse({"dram": "1GiB", "kv_cache_layout": "BLHNC"}
                                   ).kv_cache_layout == "BLHNC"


@pytest.mark.parametrize(("extra", "message"), [
    ({}, 'needs "url"'),
    (None, 'needs "url"'),
    ({"url": "kvstore://h:1", "dram": "1GiB"}, "either url (a kvstored daemon) or dram"),
    ({"url": "http://h:1"}, "kvstore://HOST:PORT"),
    ({"nvme_path": "/x"}, '"nvme_path" needs "nvme"'),
    ({"dram": "lots"}, "dram"),
    ({"dram": "1GiB", "on_load_error": "ignore"}, '"recompute" or "fail"'),
    ({"dram": "1GiB", "timeout_s": 0}, "timeout_s must be a positive number"),
    ({"dram": "1GiB", "retry_after_s": True}, "retry_after_s must be a positive number"),
    ({"dram": "1GiB", "dram_size": 3}, "unknown kv_connector_extra_config keys"),
    ({"dram": "1GiB", "kv_cache_layout": 3}, "kv_cache_layout is the name"),
    ({"dram": "1GiB", "kv_cache_layout": "B-L-H"}, "kv_cache_layout is the name"),
])
def test_bad_settings_are_clear_errors(extra: dict | None, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        ConnectorSettings.parse(extra)

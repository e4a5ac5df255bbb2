"""The vLLM connector's store handle, without vLLM: an embedded store is a kvstored on a
thread of the worker's process (found through the ``kvstore.embedded_daemon`` entry point),
and the scheduler's process reaches it through the address file."""

from __future__ import annotations

import json
import tempfile
import uuid

import pytest

from kvstore.errors import ConfigError
from kvstore.integrations import vllm_store
from kvstore.integrations.settings import ConnectorSettings
from kvstore.integrations.vllm_store import StoreHandle
from tests.conftest import make_key

EMBEDDED = ConnectorSettings.parse({"dram": "64MiB", "max_value": "1MiB", "timeout_s": 5})


@pytest.fixture(autouse=True)
def address_files_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


def test_the_worker_serves_its_embedded_store_to_the_schedulers_process(tmp_path,
                                                                        monkeypatch):
    engine_id = uuid.uuid4().hex
    worker = StoreHandle(EMBEDDED, engine_id, owner=True)
    store = worker.get()
    assert store is not None
    assert store.put(make_key("embedded"), b"v" * 100) is True
    address_file = tmp_path / f"kvstore-vllm-{engine_id}.json"
    url = json.loads(address_file.read_text())["url"]
    assert url.startswith("kvstore://127.0.0.1:")
    with monkeypatch.context() as patch:
        # The scheduler, in its own process: no embedded store of its own, only the file.
        patch.setattr(vllm_store, "_EMBEDDED", {})
        scheduler = StoreHandle(EMBEDDED, engine_id, owner=False)
        seen = scheduler.get()
        assert seen is not None and seen.get(make_key("embedded")) == b"v" * 100
        scheduler.close()
    worker.close()
    assert not address_file.exists()  # cleaned up with the daemon


def test_the_scheduler_waits_for_the_workers_store():
    scheduler = StoreHandle(EMBEDDED, uuid.uuid4().hex, owner=False)
    assert scheduler.get() is None  # not up yet: a miss, asked again after retry_after_s


def test_without_kvstored_installed_an_embedded_store_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(vllm_store, "entry_points", lambda group: [])
    worker = StoreHandle(EMBEDDED, uuid.uuid4().hex, owner=True)
    with pytest.raises(ConfigError, match="embedded store needs kvstored"):
        worker.get()

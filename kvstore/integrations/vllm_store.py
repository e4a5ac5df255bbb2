"""The store the vLLM connector talks to (`StoreHandle`): a kvstored by URL, or a store
embedded in the worker process. Importable without vLLM.

The embedded store lives in the worker, which holds the KV cache, behind a kvstored on a
thread of that process, on 127.0.0.1: the worker reaches it by shared memory, and the
scheduler, in its own process by vLLM's default, over the socket (the address is left in
a file named after vLLM's ``engine_id``); both see the daemon's one key space.

That kvstored is the daemon's (``daemon.embedded.EmbeddedDaemon``), found through the
``kvstore.embedded_daemon`` entry point: the library never imports the daemon.
"""

from __future__ import annotations

import json
import logging
import tempfile
import threading
import time
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from kvstore.errors import ConfigError
from kvstore.integrations.pages import STORE_FAILURES
from kvstore.integrations.settings import ConnectorSettings

log = logging.getLogger(__name__)

EMBEDDED_DAEMON_GROUP = "kvstore.embedded_daemon"


def start_embedded_daemon(settings: ConnectorSettings) -> Any:
    """A kvstored on a thread of this process, serving a store of ``settings``' sizes:
    an object with ``url`` and ``close()``. `ConfigError` if no package provides one."""
    found = list(entry_points(group=EMBEDDED_DAEMON_GROUP))
    if not found:
        raise ConfigError("KVStoreConnector: an embedded store needs kvstored, which is not "
                          f"installed (no {EMBEDDED_DAEMON_GROUP!r} entry point): "
                          "pip install -e . from the kvstore repository, or give url")
    factory = found[0].load()
    return factory(dram_bytes=settings.dram_bytes, nvme_path=settings.nvme_path,
                   nvme_bytes=settings.nvme_bytes, max_value_bytes=settings.max_value_bytes)


def _publish(address_file: Path, url: str) -> None:
    """Leave ``url`` where the scheduler's process finds it (replaced whole, never torn)."""
    tmp = address_file.with_suffix(".tmp")
    tmp.write_text(json.dumps({"url": url}))
    tmp.replace(address_file)


_EMBEDDED: dict[str, Any] = {}  # engine_id -> the embedded daemon this process serves
_EMBEDDED_LOCK = threading.Lock()


def _address_file(engine_id: str) -> Path:
    return Path(tempfile.gettempdir()) / f"kvstore-vllm-{engine_id}.json"


class StoreHandle:
    """The store one side of the connector talks to, opened lazily; after a failure it is
    left alone for ``retry_after_s``."""

    def __init__(self, settings: ConnectorSettings, engine_id: str, *, owner: bool) -> None:
        self.settings = settings
        self.engine_id = engine_id
        self.owner = owner  # the worker owns an embedded store; the scheduler borrows it
        self._client: Any = None  # a kvstore.Client: every store is reached through one
        self._down_until = 0.0
        self._lock = threading.Lock()

    def get(self) -> Any | None:
        """The store, or None while it is known to be unreachable."""
        if self._client is not None:
            return self._client
        if time.monotonic() < self._down_until:
            return None
        with self._lock:
            if self._client is None:
                try:
                    self._client = self._open()
                except ConfigError:
                    raise  # a bad setting: say so at startup, not retry it forever
                except STORE_FAILURES as e:
                    self.failed(e)
                    return None
        return self._client

    def _open(self) -> Any:
        import kvstore

        s = self.settings
        if s.url is not None:
            return kvstore.connect(s.url, token=s.token, timeout_s=s.timeout_s)
        with _EMBEDDED_LOCK:
            embedded = _EMBEDDED.get(self.engine_id)
            if embedded is None and self.owner:
                embedded = _EMBEDDED[self.engine_id] = start_embedded_daemon(s)
                _publish(_address_file(self.engine_id), embedded.url)
                log.info("kvstore: embedded store for engine %s (%s)", self.engine_id,
                         embedded.url)
        if embedded is not None:
            url = embedded.url
        else:  # the scheduler in its own process: the worker's store, through its daemon
            try:
                url = json.loads(_address_file(self.engine_id).read_text())["url"]
            except (OSError, ValueError, KeyError) as e:
                raise ConnectionError(f"the worker's embedded kvstore is not up yet "
                                      f"({e})") from e
        # Both sides go through the daemon (the worker by shared memory), so that they see
        # one key space: the daemon scopes every client key to its namespace.
        return kvstore.connect(url, timeout_s=s.timeout_s)

    def failed(self, error: BaseException) -> None:
        """The store failed: drop a client and leave it alone for a while."""
        if self._down_until <= time.monotonic():
            log.warning("kvstore unreachable (%s); not asked again for %.0f s", error,
                        self.settings.retry_after_s)
        self._down_until = time.monotonic() + self.settings.retry_after_s
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:  # a broken client: nothing left to release
                pass

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()
        if self.owner:
            with _EMBEDDED_LOCK:
                embedded = _EMBEDDED.pop(self.engine_id, None)
            if embedded is not None:
                _address_file(self.engine_id).unlink(missing_ok=True)
                embedded.close()

"""How the client classifies errors, against real daemons: an error the daemon answered is
raised at once as its own class (one request, no retry); only a broken connection is
retried. (`AuthError` is a `PermissionError` and `StorageError` an `OSError`: neither may
pass for a broken connection.)"""

from __future__ import annotations

import resource
from pathlib import Path

import pytest

import kvstore
from kvstore import AuthError, StorageError
from tests.conftest import make_key, make_value
from tests.daemon.conftest import DaemonProcess

KiB, MiB = 1024, 1024 * 1024
TOKEN_A = "token-of-tenant-a-0123456789"
TOKEN_B = "token-of-tenant-b-0123456789"


def _token_file(path: Path, token: str) -> Path:
    path.write_text(f'[[tenant]]\nname = "t"\ntoken = "{token}"\nnamespaces = ["n"]\n')
    return path


def _answered(daemon: DaemonProcess, code: str) -> int:
    """How many requests the daemon answered with ``code``."""
    return daemon.output().count(f"code={code}:")


def test_refused_token_raises_auth_error_at_once(start_daemon, tmp_path):
    """A client whose daemon restarts without its token: the reconnect's hello is refused
    once, and the call raises `AuthError` (not a `StoreConnectionError` after retries)."""
    daemon = start_daemon("--dram", "16MiB",
                          "--token-file", str(_token_file(tmp_path / "a.toml", TOKEN_A)))
    with kvstore.connect(daemon.url, TOKEN_A) as client:
        assert client.put(make_key("k"), b"v" * 100)
        daemon.stop()
        again = start_daemon("--dram", "16MiB", "--token-file",
                             str(_token_file(tmp_path / "b.toml", TOKEN_B)), port=daemon.port)
        with pytest.raises(AuthError, match="token"):
            client.get(make_key("k"))
        assert _answered(again, "auth_failed") == 1, "the refused hello was retried"


@pytest.mark.asyncio
async def test_async_client_refused_token_raises_auth_error_at_once(start_daemon, tmp_path):
    daemon = start_daemon("--dram", "16MiB",
                          "--token-file", str(_token_file(tmp_path / "a.toml", TOKEN_A)))
    with pytest.raises(AuthError, match="token"):
        await kvstore.aconnect(daemon.url, "not-a-token-of-anyone")
    assert _answered(daemon, "auth_failed") == 1, "the refused hello was retried"
    client = await kvstore.aconnect(daemon.url, TOKEN_A)
    assert await client.put(make_key("k"), b"v" * 100) is True
    await client.aclose()


def test_storage_error_answer_raises_storage_error(start_daemon, tmp_path):
    """A daemon whose NVMe writes fail (its files may not grow past 6 MiB: RLIMIT_FSIZE,
    inherited from this process while it starts) answers ``storage_error``; the client
    raises `StorageError` after that one request, and the connection goes on."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    limit = 6 * MiB  # above the 4 MiB DRAM pool in /dev/shm, below the NVMe segment
    if hard != resource.RLIM_INFINITY and hard < limit:
        pytest.skip("RLIMIT_FSIZE is below what the daemon needs to start")
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        daemon = start_daemon("--dram", "4MiB", "--max-value", "256KiB",
                              "--nvme-path", str(tmp_path / "nvme"), "--nvme", "64MiB")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    with kvstore.connect(daemon.url, shared_memory=False) as client:
        values = {make_key(("v", i)): make_value(("v", i), 256 * KiB) for i in range(48)}
        with pytest.raises(StorageError, match="NVMe"):
            for key, value in values.items():  # past DRAM: demoted to NVMe, then flushed
                assert client.put(key, value)
            client.flush()
        assert _answered(daemon, "storage_error") == 1, "a storage_error answer was retried"
        assert client.contains(make_key(("v", 47))) is True  # the connection still serves


def test_broken_connection_is_still_retried(start_daemon):
    """The other side of the rule: a connection the daemon's restart broke is retried on a
    fresh one, so the call succeeds."""
    daemon = start_daemon("--dram", "16MiB")
    with kvstore.connect(daemon.url) as client:
        assert client.put(make_key("k"), b"v" * 100)
        daemon.stop()
        start_daemon("--dram", "16MiB", port=daemon.port)
        assert client.get(make_key("k")) is None  # a new daemon, with nothing stored
        assert client.put(make_key("k"), b"w" * 100)

"""Tenants' keys are scoped with a secret the daemon holds (issue 15, finding 2): knowing a
namespace's name and a block's key does not tell where the block is stored."""

from __future__ import annotations

import hashlib
import signal

import pytest

import kvstore
from kvstore.keys import namespace_secret, scoped_key
from tests.conftest import make_key, make_value

KiB = 1024


def _public_scope(namespace: str, key: bytes) -> bytes:
    """How keys were scoped before issue 15: from the namespace's name alone, which any
    tenant could compute for any other namespace."""
    secret = hashlib.blake2b(namespace.encode(), digest_size=32,
                             person=b"kvstore-tenant1").digest()
    return hashlib.blake2b(key, digest_size=16, key=secret, person=b"kvstore-tenant1").digest()


def test_stored_keys_need_the_daemons_secret_and_outlive_a_restart(tmp_path, start_daemon):
    nvme = tmp_path / "nvme"
    flags = ("--dram", "16MiB", "--nvme-path", str(nvme), "--nvme", "64MiB", "--max-value",
             "1MiB")
    daemon = start_daemon(*flags)
    key, value = make_key("block"), make_value("block", 64 * KiB)
    with kvstore.connect(daemon.url, namespace="team-a", shared_memory=False) as client:
        assert client.put(key, value)
    assert daemon.signal(signal.SIGTERM) == 0  # flushed to NVMe
    key_file = nvme / "kvstored.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    on_disk = b"".join(p.read_bytes() for p in nvme.glob("seg-*.log"))
    stored = scoped_key(namespace_secret("team-a", key_file.read_bytes()), key)
    assert stored in on_disk
    assert _public_scope("team-a", key) not in on_disk
    daemon = start_daemon(*flags, port=daemon.port)  # the same secret: the block is found
    with kvstore.connect(daemon.url, namespace="team-a", shared_memory=False) as client:
        assert client.get(key) == value
    with kvstore.connect(daemon.url, namespace="team-b", shared_memory=False) as client:
        assert client.get(key) is None


def test_each_daemon_has_its_own_secret(tmp_path, start_daemon):
    files = []
    for name in ("one", "two"):
        start_daemon("--dram", "16MiB", "--nvme-path", str(tmp_path / name), "--nvme", "64MiB",
                     "--max-value", "1MiB")
        files.append((tmp_path / name / "kvstored.key").read_bytes())
    assert files[0] != files[1] and all(len(f) == 32 for f in files)


def test_a_damaged_key_file_is_refused_by_name(tmp_path, start_daemon):
    key_file = tmp_path / "scope.key"
    key_file.write_bytes(b"too short")
    with pytest.raises(RuntimeError, match=r"--key-file .*scope\.key holds 9 bytes"):
        start_daemon("--dram", "16MiB", "--key-file", str(key_file))


def test_shared_memory_clients_read_their_own_keys_through_the_directory(start_daemon):
    daemon = start_daemon("--dram", "16MiB", "--max-value", "1MiB")
    key, value = make_key("shm"), make_value("shm", 128 * KiB)
    with kvstore.connect(daemon.url, namespace="ns") as client:
        assert client.put(key, value)
        assert client.get(key) == value
        session = client._idle[0].session
        assert session.directory is not None and session.num_directory_reads >= 1

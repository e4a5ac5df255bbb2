"""Tenants attacking each other through every operation, and another OS user on the same
host going around the daemon (its shared memory, its files, its sockets)."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

import kvstore
from kvstore import AuthError
from tests.daemon.test_robustness import RawConnection, frame, hello
from tests.reliability.harness import KiB, key_of, value_of

TOKEN_A = "token-of-tenant-a-reliability"
TOKEN_B = "token-of-tenant-b-reliability"


@pytest.fixture
def world(tmp_path):
    """A directory every user may enter (pytest's tmp_path is 0700: another user would be
    stopped there whatever the daemon's own modes), as /var/lib is."""
    path = Path(tempfile.mkdtemp(prefix="kvstore-reliability-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def tenants(world, start_daemon):
    tokens = world / "tokens.toml"
    tokens.write_text(f'''
[[tenant]]
name = "a"
token = "{TOKEN_A}"
namespaces = ["a"]
shared_memory = true

[[tenant]]
name = "b"
token = "{TOKEN_B}"
namespaces = ["b"]
''')
    tokens.chmod(0o600)
    return start_daemon("--dram", "16MiB", "--nvme-path", str(world / "nvme"), "--nvme",
                        "64MiB", "--max-value", "256KiB", "--token-file", str(tokens))


def _victim_blocks(url: str) -> dict[int, bytes]:
    values = {i: value_of(i, 1, size) for i, size in enumerate([48, 4 * KiB, 100 * KiB] * 3)}
    with kvstore.connect(url, token=TOKEN_A) as a:
        assert a.put_many([key_of(i) for i in values], list(values.values())) == len(values)
        a.flush()  # on disk too
    return values


def test_a_tenant_reaches_nothing_of_another_through_any_operation(tenants):
    url = tenants.url
    values = _victim_blocks(url)
    keys = [key_of(i) for i in values]
    with kvstore.connect(url, token=TOKEN_B, shared_memory=False) as b:
        assert b.get_many(keys) == [None] * len(keys)
        assert all(b.get(k) is None for k in keys)
        assert all(b.get_into(k, bytearray(len(values[i]))) is False
                   for i, k in zip(values, keys, strict=True))
        assert not any(b.contains(k) for k in keys)
        assert b.match_prefix(keys) == 0 and b.match_prefix(keys, probe=True) == 0
        assert all(b.tier_of(k) is None for k in keys) and b.tier_bits(keys) == [0] * len(keys)
        assert not any(b.delete(k) for k in keys)
        assert b.put(keys[0], b"b's own value")  # lands in b's namespace only
        assert b.put_many(keys[1:3], [b"x", b"y"]) == 2
        b.flush()
        stats = b.stats()  # its own figures only: nothing of a's blocks, names or reads
        assert stats["tenant"] == "b" and stats["namespaces"] == ["b"]
        assert stats["tiers"]["dram"]["blocks"] == 3  # (and copies on NVMe: flushed)
        assert set(stats) == {"tenant", "namespaces", "tiers", "queries", "hits", "hit_rate",
                              "prefix", "started_at", "uptime_s"}
        assert stats["prefix"]["blocks_hit"] == 0 and stats["hits"] == 0  # its own misses
    raw = RawConnection(tenants.port)
    try:
        raw.send(frame(hello(token=TOKEN_B)))
        assert raw.answer()["ok"]
        for op, fields in (("reserve", {"keys": keys[:1], "sizes": [4096]}),
                           ("pin", {"keys": keys}), ("touch", {"keys": keys}),
                           ("doorbell", {})):
            answer = raw.call(op, **fields)
            assert answer["ok"] is False and answer["code"] == "forbidden", (op, answer)
        # handles are per connection: a's cannot be named from b's
        answer = raw.call("unpin", handles=list(range(1, 64)))
        assert answer["code"] == "unknown_handle"
        answer = raw.call("commit", handles=[1], keys=keys[:1])
        assert answer["code"] == "unknown_handle"
        # a namespace not granted, asked for by name
        raw.send(frame(hello(token=TOKEN_B, namespace="a", id=9)))
        answer = raw.answer()
        assert answer["ok"] is False and answer["code"] == "forbidden"
    finally:
        raw.close()
    with pytest.raises(AuthError):
        kvstore.connect(url, token=TOKEN_B, namespace="a")
    with kvstore.connect(url, token=TOKEN_A) as a:
        assert a.get_many(keys) == list(values.values())


def _as_nobody(script: str) -> dict:
    """Run ``script`` as the user nobody, with a Python it may execute (not this venv's,
    under /root), and return what it printed as JSON."""
    nobody = pwd.getpwnam("nobody")
    python = next((p for p in ("/usr/bin/python3", "/usr/local/bin/python3")
                   if os.access(p, os.X_OK)), None)
    if python is None:
        pytest.skip("no system python3 that another user may run")

    def drop() -> None:
        os.setgroups([])
        os.setgid(nobody.pw_gid)
        os.setuid(nobody.pw_uid)

    done = subprocess.run([python, "-c", script], capture_output=True, text=True,
                          preexec_fn=drop, timeout=60, cwd="/")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


_NOBODY = """
import json, socket
results = {}
for name, path in %(paths)s.items():
    try:
        with open(path, "rb") as f:
            f.read(1)
        results[name] = "read"
    except PermissionError:
        results[name] = "denied"
    except FileNotFoundError:
        results[name] = "missing"
sock = socket.socket(socket.AF_UNIX)
try:
    sock.connect(%(doorbell)r)
    results["doorbell"] = "connected"
except PermissionError:
    results["doorbell"] = "denied"
print(json.dumps(results))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another OS user needs root")
def test_another_os_user_reads_nothing_around_the_daemon(tenants, world):
    _victim_blocks(tenants.url)
    conn = RawConnection(tenants.port)
    try:
        conn.send(frame(hello(token=TOKEN_A, shm=True)))
        shm = conn.answer()["shm"]
        doorbell = conn.call("doorbell")["path"]
    finally:
        conn.close()
    nvme = world / "nvme"
    paths = {"pool": f"/dev/shm/{shm['name']}", "directory": f"/dev/shm/{shm['directory']}",
             "nvme_key": str(nvme / "KEY"), "scope_key": str(nvme / "kvstored.key"),
             "token_file": str(world / "tokens.toml"),
             **{p.name: str(p) for p in nvme.glob("seg-*.log")}}
    assert any(name.startswith("seg-") for name in paths)
    control = world / "public.txt"  # the same place, readable by all: the test can see
    control.write_text("anyone")
    control.chmod(0o644)
    results = _as_nobody(_NOBODY % {"paths": {**paths, "control": str(control)},
                                    "doorbell": doorbell})
    assert results.pop("control") == "read", "the test itself cannot reach the files"
    assert results.pop("doorbell") == "denied"
    assert results == {name: "denied" for name in paths}, results

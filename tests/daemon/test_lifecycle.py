"""kvstored as an operator runs it: tenants, SIGTERM and restart, reconnects, config,
metrics, the Redis registry, logs. Real daemon subprocesses, real sockets."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import redis

import kvstore
from kvstore import AuthError, ProtocolError, StoreConnectionError
from tests.conftest import make_key, make_value
from tests.daemon.conftest import REPO, DaemonProcess, free_port, shm_entries_of
from tests.daemon.test_registry import RedisServer

KiB = 1024
TOKEN_A = "token-of-tenant-a-0123456789"
TOKEN_B = "token-of-tenant-b-0123456789"
TOKEN_OPS = "token-of-the-operator-0123"


@pytest.fixture
def tenant_daemon(tmp_path, start_daemon):
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(f'''
[[tenant]]
name = "a"
token = "{TOKEN_A}"
namespaces = ["a", "shared"]
shared_memory = true

[[tenant]]
name = "b"
token = "{TOKEN_B}"
namespaces = ["b", "shared"]

[[tenant]]
name = "ops"
token = "{TOKEN_OPS}"
namespaces = ["ops"]
admin = true
''')
    return start_daemon("--dram", "32MiB", "--token-file", str(tokens))


def test_tokens_are_required_and_checked(tenant_daemon):
    url = tenant_daemon.url
    with pytest.raises(AuthError, match="token"):
        kvstore.connect(url)
    with pytest.raises(AuthError, match="token"):
        kvstore.connect(url, token="not-a-token-of-anyone")
    with pytest.raises(AuthError, match="namespace"):
        kvstore.connect(url, token=TOKEN_B, namespace="a")
    # Two granted and none named: stats work (issue 15: `kvstore stats` failed with such a
    # token), every key operation asks for a namespace.
    with kvstore.connect(url, token=TOKEN_A, shared_memory=False) as client:
        assert "tiers" in client.stats()
        for call in (lambda: client.get(make_key(1)), lambda: client.put(make_key(1), b"x"),
                     lambda: client.match_prefix([make_key(1)]),
                     lambda: client.contains(make_key(1))):
            with pytest.raises(AuthError, match=r"named no namespace.*'a', 'shared'"):
                call()
    # The same through shared memory (tenant a may map the pool): a refused put takes no slot
    # (review: it reserved the slots, then failed to scope the key, and they leaked).
    with kvstore.connect(url, token=TOKEN_A) as client:
        for i in range(5):
            with pytest.raises(AuthError, match="named no namespace"):
                client.put(make_key(i), make_value(i, 200 * KiB))
    with kvstore.connect(url, token=TOKEN_OPS, shared_memory=False) as ops:
        assert ops.stats()["tiers"]["dram"]["used_bytes"] == 0  # the whole store's


def test_a_tenant_cannot_reach_another_tenants_keys(tenant_daemon):
    url = tenant_daemon.url
    a = kvstore.connect(url, token=TOKEN_A, namespace="a")
    b = kvstore.connect(url, token=TOKEN_B, namespace="b")
    keys = kvstore.prefix_hashes(np.arange(48), block_tokens=16, namespace="secret")
    values = [make_value(i, 100 * KiB) for i in range(3)]
    assert a.put_many(keys, values) == 3
    # b knows the key bytes: it can neither read, probe, overwrite nor delete them.
    assert b.get(keys[0]) is None
    assert b.get_many(keys) == [None] * 3
    assert b.get_into(keys[0], bytearray(100 * KiB)) is False
    assert b.contains(keys[0]) is False
    assert b.match_prefix(keys) == 0
    assert b.tier_of(keys[0]) is None
    assert b.delete(keys[0]) is False
    assert b.put(keys[1], b"overwritten by b") is True
    assert a.get_many(keys) == values
    # A namespace both are granted is shared.
    a_shared = kvstore.connect(url, token=TOKEN_A, namespace="shared")
    b_shared = kvstore.connect(url, token=TOKEN_B, namespace="shared")
    a_shared.put(keys[0], b"for everyone")
    assert b_shared.get(keys[0]) == b"for everyone"
    # Only tenants trusted with shared memory map the pool (mapping it reveals every byte).
    assert a._idle[0].session.pool is not None
    assert b._idle[0].session.pool is None
    for client in (a, b, a_shared, b_shared):
        client.close()


def test_sigterm_drains_flushes_and_restart_recovers(tmp_path, start_daemon):
    nvme = tmp_path / "nvme"
    flags = ("--dram", "16MiB", "--nvme-path", str(nvme), "--nvme", "64MiB", "--max-value", "1MiB")
    daemon = start_daemon(*flags)
    client = kvstore.connect(daemon.url)
    keys = kvstore.prefix_hashes(np.arange(16 * 20), block_tokens=16, namespace="durable")
    values = [make_value(("d", i), 256 * KiB) for i in range(20)]
    assert client.put_many(keys, values) == 20  # no flush: SIGTERM must flush
    assert daemon.signal(signal.SIGTERM) == 0
    assert "stopped" in daemon.output()
    # The same client reconnects by itself to the restarted daemon (same port).
    start_daemon(*flags, port=daemon.port)
    assert client.get_many(keys) == values
    assert client.match_prefix(keys) == 20
    client.close()


def test_calls_to_a_stopped_daemon_fail_clearly_naming_the_url(start_daemon):
    daemon = start_daemon("--dram", "16MiB")
    client = kvstore.connect(daemon.url, timeout_s=3)
    client.put(make_key(1), b"x")
    daemon.stop()
    with pytest.raises(StoreConnectionError, match=str(daemon.port)):
        client.get(make_key(1))
    with pytest.raises(StoreConnectionError, match=str(daemon.port)):
        kvstore.connect(daemon.url)


def test_protocol_version_mismatch_is_a_clear_error(shared_daemon, monkeypatch):
    from kvstore.wire import frames

    monkeypatch.setattr(frames, "PROTOCOL_VERSION", frames.PROTOCOL_VERSION + 1)
    with pytest.raises(ProtocolError, match="version"):
        kvstore.connect(shared_daemon.url)


def test_client_works_from_many_threads(shared_daemon):
    from concurrent.futures import ThreadPoolExecutor

    client = kvstore.connect(shared_daemon.url, namespace="threads")

    def work(i: int) -> bool:
        key, value = make_key(("t", i)), make_value(("t", i), 70 * KiB + i)
        client.put(key, value)
        return client.get(key) == value

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(work, range(64)))
    assert len(client._idle) <= 8
    client.close()


def test_metrics_and_healthz(start_daemon):
    port = free_port()
    daemon = start_daemon("--dram", "16MiB", "--metrics", f"127.0.0.1:{port}",
                          "--block-tokens", "128")
    client = kvstore.connect(daemon.url)
    client.put(make_key("m"), b"v" * 1000)
    client.get(make_key("m"))
    assert client.match_prefix([make_key("m"), make_key("absent")]) == 1
    assert client.match_prefix([make_key("m")], probe=True) == 1  # a probe is not counted
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'kvstore_tier_blocks{tier="dram"} 1.0' in body
    assert "kvstore_connected_clients 1.0" in body
    assert 'kvstore_request_seconds_count{op="put"} 1.0' in body  # small: in the frame
    # read from the pool, found through the shared directory: no request at all
    assert 'kvstore_request_seconds_count{op="pin"}' not in body
    assert 'kvstore_prefix_query_tokens_total{source="local"} 256.0' in body
    assert 'kvstore_prefix_hit_tokens_total{source="local"} 128.0' in body
    health = urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)
    assert health.status == 200 and json.loads(health.read())["status"] == "ok"
    client.close()


def test_registers_in_redis(tmp_path, start_daemon):
    server = RedisServer(tmp_path)
    server.start()
    try:
        daemon = start_daemon("--dram", "16MiB", "--redis", server.url, "--node-id", "node-7")
        r = redis.Redis(port=server.port)
        deadline = time.monotonic() + 10
        while r.get("kvstore:default:node:node-7") is None and time.monotonic() < deadline:
            time.sleep(0.05)
        entry = json.loads(r.get("kvstore:default:node:node-7"))
        assert entry["addresses"]["control"] == f"127.0.0.1:{daemon.port}"
        assert entry["tiers"]["dram"] == 16 * 1024 * 1024
        assert 0 < r.pttl("kvstore:default:node:node-7") <= 10_000
        daemon.stop()
        assert r.get("kvstore:default:node:node-7") is None  # a clean stop leaves the registry
    finally:
        server.kill()


def test_config_file_and_flags_override_it(tmp_path, start_daemon):
    config = tmp_path / "kvstored.toml"
    config.write_text('dram = "8MiB"\nmax-value = "1MiB"\n')
    daemon = start_daemon("--config", str(config), "--dram", "24MiB")
    stats = kvstore.connect(daemon.url).stats()
    assert stats["tiers"]["dram"]["capacity_bytes"] == 24 * 1024 * 1024
    with pytest.raises(kvstore.InvalidValueError):
        kvstore.connect(daemon.url).put(make_key(1), bytes(1024 * 1024 + 1))


def test_a_small_dram_tier_starts_with_a_largest_value_derived_from_it(start_daemon):
    daemon = start_daemon("--dram", "8MiB")  # refused before: --max-value was 16MiB
    with kvstore.connect(daemon.url, shared_memory=False) as client:
        assert client._idle[0].session.max_value_bytes == 2 * 1024 * 1024  # from hello
        assert client.put(make_key("largest"), bytes(2 * 1024 * 1024))
        with pytest.raises(kvstore.InvalidValueError):
            client.put(make_key("larger"), bytes(2 * 1024 * 1024 + 1))


@pytest.mark.parametrize("flags, message", [
    (["--dram", "-5"], "dram"),
    (["--token-file", "/nonexistent/tokens.toml"], "token-file"),
    (["--listen", "nowhere"], "listen"),
    (["--nvme", "1GiB"], "nvme"),
])
def test_bad_flags_exit_2_with_a_clear_message(flags, message):
    result = subprocess.run([sys.executable, "-m", "daemon", *flags], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_help_explains_every_flag():
    result = subprocess.run([sys.executable, "-m", "daemon", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for flag in ("--listen", "--dram", "--nvme-path", "--nvme", "--hbm", "--metrics",
                 "--token-file", "--config", "--redis", "--force", "SIGTERM", "/dev/shm"):
        assert flag in result.stdout


def test_logs_connects_and_errors_but_not_requests(start_daemon):
    daemon = start_daemon("--dram", "16MiB")
    client = kvstore.connect(daemon.url)
    deadline = time.monotonic() + 5  # the start-up probe's disconnect is logged, then count
    while "tenant=- reason" not in daemon.output() and time.monotonic() < deadline:
        time.sleep(0.02)
    before = len(daemon.output().splitlines())
    for i in range(50):
        client.put(make_key(i), b"x" * 100)
        client.get(make_key(i))
    assert len(daemon.output().splitlines()) == before
    client.close()
    time.sleep(0.3)
    assert "client disconnected" in daemon.output()


def test_overwrites_of_other_sizes_in_a_full_pool_keep_what_they_acknowledge(start_daemon):
    """A pool of two large slots: each single put's spare would have to evict the value it
    just stored, and a spare of another size holds the room the next put needs. Every put
    that returns True is read back, whatever the size it replaces."""
    daemon = start_daemon("--dram", "1MiB", "--max-value", "512KiB")
    client = kvstore.connect(daemon.url)
    key = make_key("overwritten")
    for i, nbytes in enumerate([500 * KiB, 300 * KiB, 500 * KiB, 100 * KiB, 400 * KiB,
                                64 * KiB, 500 * KiB]):
        value = make_value(("overwrite", i), nbytes)
        assert client.put(key, value) is True, f"put {i} of {nbytes} bytes"
        assert client.get(key) == value, f"put {i} of {nbytes} bytes was not kept"
    client.close()


def test_single_puts_reuse_a_spare_slot_that_goes_back_when_the_client_leaves(start_daemon):
    daemon = start_daemon("--dram", "16MiB", "--max-value", "1MiB")
    client = kvstore.connect(daemon.url)
    session = client._idle[0].session
    values = [make_value(("spare", i), 300 * KiB) for i in range(5)]
    calls = []
    request = client._idle[0].request
    client._idle[0].request = lambda meta, *a: calls.append(meta["op"]) or request(meta, *a)
    for i, value in enumerate(values):
        assert client.put(make_key(("spare", i)), value) is True
    # The first put reserves; every later one copies into the spare its last commit got.
    assert calls == ["reserve", "commit", *["commit"] * 4]
    assert session._spare is not None
    assert [client.get(make_key(("spare", i))) for i in range(5)] == values
    watcher = kvstore.connect(daemon.url, shared_memory=False)
    slot = 320 * KiB  # the size class of 300 KiB
    assert watcher.stats()["tiers"]["dram"]["used_bytes"] == 6 * slot  # 5 values + 1 spare
    client.close()
    deadline = time.monotonic() + 5
    while watcher.stats()["tiers"]["dram"]["used_bytes"] != 5 * slot:
        assert time.monotonic() < deadline, "the spare slot of a closed client leaked"
        time.sleep(0.05)
    watcher.close()


# -- start-up checks: memory, exposure, names in errors -----------------------------------------

def mem_available_bytes() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f
                    if line.startswith("MemAvailable:"))


def test_a_pool_larger_than_the_machine_can_give_is_refused_before_allocating(tmp_path):
    too_big = (mem_available_bytes() >> 30) + 8  # GiB
    daemon = DaemonProcess(tmp_path, "--dram", f"{too_big}GiB")
    with pytest.raises(RuntimeError, match="exited 2"):
        daemon.start()
    output = daemon.output()
    assert f"--dram {too_big}.0 GiB is more than this machine can give" in output, output
    assert "MemAvailable" in output and "--force" in output
    assert "Traceback" not in output and "allocating" not in output
    assert shm_entries_of(daemon.proc.pid) == []


def test_force_starts_a_pool_over_the_limit_with_a_warning(tmp_path):
    """--force turns the refusal into a warning and the daemon goes on to allocate; here it
    is stopped at once (the pool would take the machine), which it must also survive."""
    too_big = (mem_available_bytes() >> 30) + 8
    daemon = DaemonProcess(tmp_path, "--dram", f"{too_big}GiB", "--force").launch()
    assert daemon.sigterm_at("starting anyway (--force)") == 0, daemon.output()
    output = daemon.output()
    assert "WARNING" in output and "is more than this machine can give" in output
    assert "allocating the DRAM pool" in output, output
    assert shm_entries_of(daemon.proc.pid) == []


def _small_shm(*command: str) -> list[str]:
    """``command`` in a mount namespace of its own with a 64 MiB /dev/shm (needs root)."""
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount -t tmpfs -o size=64m kvstore-test /dev/shm && exec "$@"', "sh", *command]


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="needs root and unshare(1) for a private /dev/shm")
def test_a_shared_pool_larger_than_dev_shm_is_refused_and_with_force_fails_cleanly():
    """A pool /dev/shm cannot hold is a sparse file: it used to start and die of SIGBUS at
    the first put that touched a page with no room behind it."""
    daemon = [sys.executable, "-m", "daemon", "--listen", f"127.0.0.1:{free_port()}",
              "--dram", "96MiB"]
    refused = subprocess.run(_small_shm(*daemon), cwd=REPO, capture_output=True, text=True,
                             timeout=60)
    assert refused.returncode == 2, refused.stderr
    assert "--dram 96.0 MiB is more than this machine can give" in refused.stderr
    assert "/dev/shm" in refused.stderr and "Traceback" not in refused.stderr
    forced = subprocess.run(_small_shm(*daemon, "--force"), cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert forced.returncode == 2, forced.stderr
    assert "no room for the DRAM pool" in forced.stderr, forced.stderr
    assert "Traceback" not in forced.stderr


def test_listening_beyond_loopback_without_tokens_warns(start_daemon, tmp_path):
    port = free_port()
    exposed = start_daemon("--dram", "16MiB", "--listen", f"0.0.0.0:{port}", port=port)
    assert "WARNING" in exposed.output() and "no --token-file" in exposed.output()
    local = start_daemon("--dram", "16MiB")
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(f'[[tenant]]\nname = "a"\ntoken = "{TOKEN_A}"\nnamespaces = ["a"]\n')
    port = free_port()
    guarded = start_daemon("--dram", "16MiB", "--listen", f"0.0.0.0:{port}", "--token-file",
                           str(tokens), port=port)
    for daemon in (local, guarded):
        assert "no --token-file" not in daemon.output()


@pytest.mark.parametrize("flag", ["--metrics", "--listen"])
def test_a_port_in_use_is_named_by_its_flag(tmp_path, flag):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        result = subprocess.run(
            [sys.executable, "-m", "daemon", "--dram", "16MiB",
             "--listen", address if flag == "--listen" else f"127.0.0.1:{free_port()}",
             *(["--metrics", address] if flag == "--metrics" else [])],
            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"kvstored: {flag} {address}: cannot listen there" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_an_nvme_path_that_is_a_file_is_named_by_its_flag(tmp_path):
    a_file = tmp_path / "not-a-directory"
    a_file.write_text("x")
    result = subprocess.run(
        [sys.executable, "-m", "daemon", "--dram", "16MiB", "--nvme-path", str(a_file),
         "--nvme", "64MiB", "--listen", f"127.0.0.1:{free_port()}"],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"kvstored: --nvme-path {a_file} is a file, not a directory" in result.stderr
    assert "Traceback" not in result.stderr

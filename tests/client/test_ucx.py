"""The UCX transport (``kvstored --ucx``, ``kvstore+ucx://`` URLs) against a real daemon
subprocess over loopback: the Store contract, the async client, tenants, a daemon that
goes away; and clear errors where ucxx is not installed.

The tests that need ucxx skip without it (their daemon fixtures call importorskip); the
ones about a missing ucxx run either way, hiding it where it is installed.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace
from typing import Any

import msgpack
import numpy as np
import pytest
import pytest_asyncio

import kvstore
from kvstore import AuthError, KVStoreError, StoreConnectionError
from kvstore.client import AsyncClient, Client

# The shared contract suite, run here over UCX (it takes this module's ``api`` fixture).
from tests.client.test_store_contract import (  # noqa: F401
    test_bad_input_raises_and_changes_nothing,
    test_chains_match_prefix_and_batches,
    test_closed_raises,
    test_flush_and_stats,
    test_get_into_buffers,
    test_get_into_wrong_size_raises_and_changes_nothing,
    test_large_chain_over_the_shared_pool,
    test_missing_keys,
    test_overwrite_and_delete,
    test_put_get_roundtrip,
    test_value_types,
)
from tests.conftest import make_key, make_value
from tests.daemon.conftest import REPO, DaemonProcess, free_port

KiB = 1024
MiB = 1024 * KiB
SIZES = [4 * KiB, 64 * KiB - 1, 64 * KiB, 256 * KiB, 1 * MiB, 4 * MiB]
TOKEN_A = "token-of-tenant-a-0123456789"
TOKEN_B = "token-of-tenant-b-0123456789"
_namespaces = itertools.count()


def start_ucx_daemon(daemon: DaemonProcess, timeout_s: float = 30.0) -> str:
    """Start ``daemon`` (made with ``--ucx``) and wait for its UCX listener; its UCX URL."""
    daemon.start()
    deadline = time.monotonic() + timeout_s
    while "serving UCX on" not in daemon.output():
        if daemon.proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"kvstored has no UCX listener: {daemon.output()}")
        time.sleep(0.05)
    ucx_address = daemon.flags[daemon.flags.index("--ucx") + 1]
    return f"kvstore+ucx://{ucx_address}"


@pytest.fixture(scope="module")
def ucx_url(tmp_path_factory):
    """One daemon (64 MiB DRAM + 64 MiB NVMe, values up to 4 MiB) for the module."""
    pytest.importorskip("ucxx")
    tmp = tmp_path_factory.mktemp("kvstored-ucx")
    daemon = DaemonProcess(tmp, "--dram", "64MiB", "--nvme-path", str(tmp / "nvme"),
                           "--nvme", "64MiB", "--max-value", "4MiB",
                           "--ucx", f"127.0.0.1:{free_port()}")
    url = start_ucx_daemon(daemon)
    yield url
    daemon.stop()


@pytest.fixture
def start_ucx(tmp_path):
    """``start_ucx(*flags)`` -> (DaemonProcess, UCX URL), stopped at teardown."""
    pytest.importorskip("ucxx")
    started: list[DaemonProcess] = []

    def start(*flags: str) -> tuple[DaemonProcess, str]:
        daemon = DaemonProcess(tmp_path, *flags, "--ucx", f"127.0.0.1:{free_port()}")
        started.append(daemon)
        return daemon, start_ucx_daemon(daemon)

    yield start
    for daemon in started:
        daemon.stop()


@pytest.fixture
def api(ucx_url):
    """A sync client over UCX, values in the frames (no shared pool: UCX carries them)."""
    client = Client(ucx_url, namespace=f"ucx-{next(_namespaces)}", shared_memory=False)
    assert type(client._idle[0]).__name__ == "UcxConnection"
    assert client._idle[0].session.pool is None
    yield client
    client.close()


def test_values_byte_for_byte(api):
    keys = [make_key(("bytes", n)) for n in SIZES]
    values = [make_value(("bytes", n), n) for n in SIZES]
    for key, value in zip(keys, values, strict=True):
        assert api.put(key, value) is True
        assert api.get(key) == value
        out = np.zeros(len(value), dtype=np.uint8)
        assert api.get_into(key, out) is True and out.tobytes() == value
    # Many values in one frame each way: the reads span UCX buffers and are joined.
    chained = kvstore.prefix_hashes(np.arange(16 * len(SIZES)), block_tokens=16,
                                    namespace="ucx-bytes")
    assert api.put_many(chained, values) == len(SIZES)
    assert api.get_many(chained) == values
    assert api.get_many([*chained[:2], make_key("absent"), chained[5]]) == [
        values[0], values[1], None, values[5]]
    assert api.match_prefix(chained) == len(SIZES)
    assert api.delete(chained[2]) is True
    assert api.match_prefix(chained) == 2
    stats = api.stats()
    assert stats["hits"] >= 2 * len(SIZES) and stats["clients"] >= 1


def test_one_client_from_many_threads(api):
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(8):
                key, value = make_key(("thread", t, i)), make_value(("thread", t, i), 100 * KiB)
                assert api.put(key, value) is True
                assert api.get(key) == value
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    assert len(api._idle) <= 8


def test_shared_memory_over_ucx_on_the_same_host(ucx_url):
    # The hello asks for the pool as the client says; on one host it is mapped and the
    # control messages of reserve/commit and pin/unpin travel over UCX.
    with Client(ucx_url, namespace=f"ucx-{next(_namespaces)}") as client:
        assert client._idle[0].session.pool is not None
        keys = kvstore.prefix_hashes(np.arange(64), block_tokens=16, namespace="ucx-shm")
        values = [make_value(("shm", i), 512 * KiB) for i in range(4)]
        assert client.put_many(keys, values) == 4
        assert client.get_many(keys) == values


@pytest_asyncio.fixture
async def aclient(ucx_url):
    client = await kvstore.aconnect(ucx_url, namespace=f"ucx-async-{next(_namespaces)}",
                                    shared_memory=False)
    yield client
    await client.aclose()


@pytest.mark.asyncio
async def test_async_client(aclient):
    keys = kvstore.prefix_hashes(np.arange(16 * len(SIZES)), block_tokens=16,
                                 namespace="ucx-async")
    values = [make_value(("async", n), n) for n in SIZES]
    assert await aclient.put_many(keys, values) == len(SIZES)
    assert await aclient.get_many(keys) == values
    for key, value in zip(keys, values, strict=True):
        assert await aclient.get(key) == value
        out = bytearray(len(value))
        assert await aclient.get_into(key, out) is True and bytes(out) == value
    assert await aclient.match_prefix(keys) == len(SIZES)
    assert await aclient.delete(keys[0]) is True
    assert await aclient.get(keys[0]) is None
    assert (await aclient.stats())["hits"] >= len(SIZES)


@pytest.mark.asyncio
async def test_async_concurrent_calls(aclient):
    async def one(i: int) -> bool:
        key, value = make_key(("c", i)), make_value(("c", i), 1000 + 997 * i)
        await aclient.put(key, value)
        return await aclient.get(key) == value

    assert all(await asyncio.gather(*(one(i) for i in range(64))))
    assert len(aclient._idle) <= 8


@pytest.mark.asyncio
async def test_async_cancelled_call_does_not_desync_the_pool(aclient):
    key, value = make_key("cancel"), make_value("cancel", 4 * MiB)
    task = asyncio.ensure_future(aclient.put(key, value))
    await asyncio.sleep(0.001)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for i in range(20):  # every pooled connection still answers its own requests
        small = make_value(("after", i), 10 * KiB)
        await aclient.put(make_key(("after", i)), small)
        assert await aclient.get(make_key(("after", i))) == small


def test_tenant_tokens(tmp_path, start_ucx):
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(f'''
[[tenant]]
name = "a"
token = "{TOKEN_A}"
namespaces = ["a"]

[[tenant]]
name = "b"
token = "{TOKEN_B}"
namespaces = ["b"]
''')
    _, url = start_ucx("--dram", "32MiB", "--token-file", str(tokens))
    with pytest.raises(AuthError, match="token"):
        Client(url, shared_memory=False)
    with pytest.raises(AuthError, match="token"):
        Client(url, token="not-a-token-of-anyone", shared_memory=False)
    with pytest.raises(AuthError, match="namespace"):
        Client(url, token=TOKEN_B, namespace="a", shared_memory=False)
    a = Client(url, token=TOKEN_A, shared_memory=False)
    b = Client(url, token=TOKEN_B, shared_memory=False)
    key, value = make_key("secret"), make_value("secret", 300 * KiB)
    assert a.put(key, value) is True
    assert b.get(key) is None and b.contains(key) is False and b.delete(key) is False
    assert a.get(key) == value
    a.close()
    b.close()


def test_refused_hello_is_never_lost(tmp_path, start_ucx):
    """The daemon answers a bad token with auth_failed and hangs up: the client gets that
    answer every time (`AuthError`), never a broken connection. (Closing the endpoint right
    after the send lost the answer about once in 30 connects.)"""
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(f'[[tenant]]\nname = "a"\ntoken = "{TOKEN_A}"\nnamespaces = ["a"]\n')
    daemon, url = start_ucx("--dram", "16MiB", "--token-file", str(tokens))
    for _ in range(100):
        with pytest.raises(AuthError, match="token"):
            Client(url, token="not-a-token-of-anyone", shared_memory=False)
    assert daemon.output().count("code=auth_failed") == 100


@pytest.mark.asyncio
async def test_async_refused_token_raises_auth_error_at_once(tmp_path, start_ucx):
    """Over UCX too, an answered error is raised as its class after one request."""
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(f'[[tenant]]\nname = "a"\ntoken = "{TOKEN_A}"\nnamespaces = ["a"]\n')
    daemon, url = start_ucx("--dram", "16MiB", "--token-file", str(tokens))
    client = AsyncClient(url, token="not-a-token-of-anyone", shared_memory=False)
    with pytest.raises(AuthError, match="token"):
        await client.stats()
    assert daemon.output().count("code=auth_failed") == 1, "the refused hello was retried"
    await client.aclose()


def test_daemon_stopped_raises_connection_error_naming_the_url(start_ucx):
    daemon, url = start_ucx("--dram", "16MiB")
    client = Client(url, shared_memory=False, timeout_s=5.0, connect_timeout_s=0.5)
    key = make_key("gone")
    assert client.put(key, b"v" * 5000) is True
    assert daemon.signal(signal.SIGTERM) == 0
    started = time.monotonic()
    with pytest.raises(StoreConnectionError, match=r"kvstore\+ucx://127\.0\.0\.1:\d+"):
        client.get(key)
    assert time.monotonic() - started < 10
    client.close()
    with pytest.raises(StoreConnectionError, match=r"kvstore\+ucx://127\.0\.0\.1:\d+"):
        Client(url, connect_timeout_s=0.5)


def _stall_over_ucx(url: str, tag: str) -> Any:
    """A UCX connection that says hello, then sends the start of a put whose body is 16 MiB
    (its header and 200 KB, one message) and nothing more; its stream."""
    from kvstore.client import settings
    from kvstore.client.ucx import _open_stream, ucx_loop
    from kvstore.wire import frames
    from tests.daemon.test_robustness import frame, hello, request

    async def stall() -> Any:
        _, address = settings.parse_url(url)
        stream = await _open_stream(SimpleNamespace(address=address, connect_timeout_s=5.0))
        stream.write(frame(hello()))
        await stream.drain()
        header = frames.HEADER.unpack(await stream.readexactly(frames.HEADER_BYTES))
        await stream.readexactly(header[3])  # the hello's answer
        meta = request("put", key=make_key(("ucx-stalled", tag)))
        meta_bytes = len(msgpack.packb(meta, use_bin_type=True))
        head = frame(meta, b"", data_bytes=16 * MiB - meta_bytes)
        stream.write(head + bytes(200_000 - len(head)))
        await stream.drain()
        return stream

    return asyncio.run_coroutine_threadsafe(stall(), ucx_loop()).result(30)


def test_a_put_waits_for_the_frame_memory_stalled_senders_hold(start_ucx):
    """Four UCX senders start 16 MiB bodies and stall: their shares fill the least frame
    memory (68 MiB), so a client's 16 MiB put waits, unread, until the frame timeout drops
    them and gives their shares back; then it is stored, and 20 more (320 MiB, over four
    times the budget) show that every share came back."""
    daemon, url = start_ucx("--dram", "128MiB", "--max-value", "16MiB",
                            "--frame-memory", "68MiB", "--frame-timeout", "1")
    stalled = [_stall_over_ucx(url, str(i)) for i in range(4)]
    with Client(url, shared_memory=False, timeout_s=60) as client:
        key, value = make_key("waited"), make_value("waited", 16 * MiB)
        assert client.put(key, value) is True
        assert client.get(key) == value
        for i in range(20):
            assert client.put(make_key(("after", i)), make_value("after", 16 * MiB)) is True
    output = daemon.output()
    assert "waits for frame memory" in output
    # the frame timeout (its ConnectionError) ended each stalled sender
    assert output.count("reason=connection lost (ConnectionError)") == len(stalled)


def test_without_ucxx_the_client_says_what_to_install(monkeypatch):
    from kvstore.client import ucx as client_ucx
    from kvstore.wire import ucx as wire_ucx

    monkeypatch.setattr(wire_ucx, "ucxx", None)
    monkeypatch.setattr(client_ucx, "_loop", None)
    with pytest.raises(KVStoreError, match=r"pip install 'kvstore\[ucx\]'"):
        Client(f"kvstore+ucx://127.0.0.1:{free_port()}")

    async def open_async() -> None:
        await AsyncClient(f"kvstore+ucx://127.0.0.1:{free_port()}").stats()

    with pytest.raises(KVStoreError, match=r"pip install 'kvstore\[ucx\]'"):
        asyncio.run(open_async())


def test_without_ucxx_the_daemon_refuses_ucx(tmp_path):
    hidden = tmp_path / "hide"
    (hidden / "ucxx").mkdir(parents=True)
    (hidden / "ucxx" / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hidden), str(REPO)])}
    done = subprocess.run(
        [sys.executable, "-m", "daemon", "--listen", f"127.0.0.1:{free_port()}", "--dram",
         "32MiB", "--ucx", f"127.0.0.1:{free_port()}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "pip install 'kvstore[ucx]'" in done.stderr


def test_a_ucx_port_in_use_is_an_oserror_kvstored_names_the_flag_of(monkeypatch):
    """ucxx reports a port in use as its busy error ("Device is busy"), seen once when a
    test's free port was taken meanwhile; the listener turns it into the OSError that
    kvstored reports as "--ucx HOST:PORT: cannot listen there" (exit 1), not a traceback.
    The busy error is ucxx's own class, raised where ucxx raised it."""
    ucxx = pytest.importorskip("ucxx")
    from ucxx.exceptions import UCXBusyError

    from daemon.ucx import UcxListener
    from kvstore.wire import ucx as wire_ucx

    wire_ucx.init_ucx()

    def busy(*args: Any, **kwargs: Any) -> None:
        raise UCXBusyError("Device is busy")

    monkeypatch.setattr(ucxx, "create_listener", busy)
    with pytest.raises(OSError) as raised:
        asyncio.run(UcxListener(SimpleNamespace(), "127.0.0.1", 1).start())
    assert raised.value.errno == errno.EADDRINUSE

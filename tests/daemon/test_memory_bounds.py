"""What hostile requests may cost a real `python -m daemon` subprocess in memory, read from
its /proc/PID/status: the peak (VmHWM, reset before each attack) and the resident set
after it (VmRSS). Each peak is bounded by what the daemon's configured limits allow
(`daemon.frame_memory`), plus `SLACK_BYTES` for the interpreter's own churn; after each
burst, the resident set comes back to within `KEPT_BYTES` of where it was.

- get_many naming one 1 MiB value 1,024 times: answers carry at most
  ``max_answer_data_bytes`` of values each; the client asks again and gets every value;
- 48 connections each announcing a 16 MiB put and sending 200 KB: their bodies hold at most
  ``--frame-memory`` (the rest wait, unread); whether the daemon drops them (frame timeout)
  or they close, the memory comes back; a largest frame queued behind them is admitted;
- a burst of large answers and puts from several connections: the heap's free pages go
  back to the system once it is over;
- a normal client is served throughout, and a repeat does not grow the daemon further.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import msgpack
import pytest

import kvstore
from daemon import tcp
from daemon.frame_memory import largest_body_bytes, max_answer_data_bytes
from kvstore.client import AsyncClient, Client
from tests.conftest import make_key, make_value
from tests.daemon.conftest import REPO, DaemonProcess, free_port
from tests.daemon.test_robustness import RawConnection, frame, request

KiB, MiB = 1024, 1024 * 1024
# What the daemon's heap, interpreter and sockets may move by on their own at a peak,
# above the bounds below, and what may stay after a burst (1-2 MiB each way, measured;
# without giving memory back, 9 to 120 MiB stayed).
SLACK_BYTES = 24 * MiB
KEPT_BYTES = 6 * MiB


# -- the daemon's memory --------------------------------------------------------------------------


def _status_bytes(daemon: DaemonProcess, field: str) -> int:
    assert daemon.proc is not None
    with open(f"/proc/{daemon.proc.pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/{daemon.proc.pid}/status")


def rss_bytes(daemon: DaemonProcess) -> int:
    return _status_bytes(daemon, "VmRSS")


def reset_peak(daemon: DaemonProcess) -> None:
    """Start VmHWM (the peak resident set) again from the current one."""
    assert daemon.proc is not None
    with open(f"/proc/{daemon.proc.pid}/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def peak_bytes(daemon: DaemonProcess) -> int:
    return _status_bytes(daemon, "VmHWM")


def settled_rss_bytes(daemon: DaemonProcess, at_most: int, within_s: float = 15.0) -> int:
    """The daemon's RSS once it is at most ``at_most`` (memory given back after a burst),
    or, failing that, the last one read after ``within_s``."""
    deadline = time.monotonic() + within_s
    while True:
        rss = rss_bytes(daemon)
        if rss <= at_most or time.monotonic() > deadline:
            return rss
        time.sleep(0.1)


@contextmanager
def normal_client(daemon: DaemonProcess) -> Iterator[list[int]]:
    """A client putting and reading small values over TCP and through shared memory in a
    thread while the block runs; yields its count of checked round trips, and raises what
    went wrong in it (a wrong value, an error) at the end."""
    done, errors, rounds = threading.Event(), [], [0]

    def work() -> None:
        try:
            with kvstore.connect(daemon.url, timeout_s=60) as shm, \
                    kvstore.connect(daemon.url, shared_memory=False, timeout_s=60) as wire:
                while not done.is_set():
                    for client, size in ((shm, 100 * KiB), (wire, 4 * KiB), (wire, 64 * KiB)):
                        key = make_key(("normal", rounds[0], size))
                        value = make_value(("normal", rounds[0], size), size)
                        assert client.put(key, value)
                        assert client.get(key) == value
                        assert client.contains(key)
                    rounds[0] += 1
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        yield rounds
    finally:
        done.set()
        thread.join(60)
    if errors:
        raise errors[0]
    assert not thread.is_alive(), "the normal client hung"


# -- one request, a large answer ------------------------------------------------------------------


def test_get_many_of_one_value_1024_times_answers_in_bounded_parts(start_daemon):
    """18 KiB of request naming a 1 MiB value 1,024 times made the daemon build 1 GiB of
    answer (and keep half of it). Now each answer carries at most the answer limit; the
    client asks again until it has all 1,024 values, each byte for byte."""
    daemon = start_daemon("--dram", "32MiB", "--max-value", "1MiB")
    limit = max_answer_data_bytes(MiB)
    key, value = make_key("amplified"), make_value("amplified", MiB)
    with kvstore.connect(daemon.url, shared_memory=False, timeout_s=60) as client:
        assert client.put(key, value)
        assert client.get_many([key] * 4) == [value] * 4  # the daemon's first answers
        start = rss_bytes(daemon)
        for attempt in range(2):  # a repeat does not grow it further
            reset_peak(daemon)
            with normal_client(daemon) as rounds:
                values = client.get_many([key] * 1024)
                assert len(values) == 1024
                assert all(v == value for v in values), "a value came back wrong"
                del values
            assert rounds[0] > 0
            rise = peak_bytes(daemon) - start
            # The answer's values, and once more while they are written out.
            assert rise <= 2 * limit + SLACK_BYTES, (attempt, rise // MiB)
            kept = settled_rss_bytes(daemon, start + KEPT_BYTES) - start
            assert kept <= KEPT_BYTES, (attempt, kept // MiB)
    assert "get_many answer cut at 16 of 1024 keys" in daemon.output()


def test_a_cut_answer_says_where_and_keeps_one_size_per_key(start_daemon):
    """On the wire: ``answered`` leading keys are answered; the others' sizes are nil, so a
    client that does not know ``answered`` sees misses there (still a valid answer)."""
    daemon = start_daemon("--dram", "32MiB", "--max-value", "1MiB")
    limit = max_answer_data_bytes(MiB)
    keys = [make_key(("cut", i)) for i in range(3)]
    values = [make_value(("cut", i), size) for i, size in enumerate((MiB, 300 * KiB, 0))]
    with kvstore.connect(daemon.url, shared_memory=False) as client:
        for k, v in zip(keys, values, strict=True):
            assert client.put(k, v)
    asked = [keys[2], make_key("absent"), *[keys[0], keys[1]] * 20]
    conn = RawConnection(daemon.port, timeout_s=30)
    try:
        conn.hello()
        conn.send(frame(request("get_many", id=9, keys=asked)))
        response = conn.read_frame()
    finally:
        conn.close()
    assert response is not None
    meta, data = response
    sizes = [0, None, *[MiB, 300 * KiB] * 20]
    answered, total = 0, 0  # the leading values that fit, duplicates counted each time
    while total + (sizes[answered] or 0) <= limit:
        total += sizes[answered] or 0
        answered += 1
    assert meta["ok"] and meta["answered"] == answered == 26, meta.get("answered")
    assert meta["sizes"] == sizes[:answered] + [None] * (len(asked) - answered)
    assert data == b"".join(([values[0], values[1]] * 20)[:answered - 2])


@pytest.mark.asyncio
async def test_every_transport_asks_again_for_the_rest(start_daemon):
    """Sync and asyncio clients over TCP, and (where ucxx is installed) both over UCX: a
    get_many of 40 MiB of values, over twice the answer limit, returns every one."""
    flags = ["--dram", "48MiB", "--max-value", "1MiB"]
    try:
        import ucxx  # noqa: F401
    except ImportError:
        ucx_port = None
    else:
        ucx_port = free_port()
        flags += ["--ucx", f"127.0.0.1:{ucx_port}"]
    daemon = start_daemon(*flags)
    urls = [daemon.url]
    if ucx_port is not None:
        deadline = time.monotonic() + 30
        while "serving UCX on" not in daemon.output():
            assert time.monotonic() < deadline, daemon.output()
            time.sleep(0.05)
        urls.append(f"kvstore+ucx://127.0.0.1:{ucx_port}")
    keys = [make_key(("every", i)) for i in range(24)]
    values = [make_value(("every", i), MiB - i) for i in range(24)]
    asked = keys + keys[:16] + [make_key("missing")]
    expected = values + values[:16] + [None]
    with kvstore.connect(daemon.url, shared_memory=False) as client:
        assert client.put_many(keys, values) == len(keys)
    for url in urls:
        with Client(url, shared_memory=False) as client:
            assert client.get_many(asked) == expected, url
        aclient = AsyncClient(url, shared_memory=False)
        try:
            assert await aclient.get_many(asked) == expected, url
        finally:
            await aclient.aclose()


# -- many large bodies announced, few bytes sent ---------------------------------------------------


BODY_BYTES = 16 * MiB
SENT_BYTES = 200 * 1000
NUM_STALLED = 48


def _stall(port: int, tag: str) -> RawConnection:
    """A connection that says hello, starts a put whose body (meta and value) is
    `BODY_BYTES` and sends `SENT_BYTES` of it, then nothing."""
    conn = RawConnection(port, timeout_s=30)
    conn.hello()
    meta = request("put", key=make_key(("stalled", tag)))
    meta_bytes = len(msgpack.packb(meta, use_bin_type=True))
    head = frame(meta, b"", data_bytes=BODY_BYTES - meta_bytes)
    conn.send(head + bytes(SENT_BYTES - len(head)))
    return conn


def _closed_by_daemon(conn: RawConnection, within_s: float) -> bool:
    conn.sock.settimeout(within_s)
    try:
        return conn.sock.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_announced_bodies_share_a_bounded_frame_memory_and_give_it_back(start_daemon):
    """48 connections each announce a 16 MiB put and send 200 KB: it took the daemon from
    97 to 867 MiB, never given back. Now their bodies hold at most --frame-memory (the
    others wait unread); the daemon drops each after the frame timeout once it is read,
    or the clients close them; either way RSS comes back near where it was."""
    frame_memory = 128 * MiB
    frame_timeout_s = 1.0
    daemon = start_daemon("--dram", "32MiB", "--max-value", "16MiB",
                          "--frame-memory", str(frame_memory),
                          "--frame-timeout", str(frame_timeout_s))
    # The receive buffers of the connections, on top of the frame memory.
    bound = frame_memory + NUM_STALLED * tcp.BUFFER_BYTES + SLACK_BYTES
    with kvstore.connect(daemon.url, timeout_s=60):
        start = rss_bytes(daemon)
        for attempt, ending in enumerate(("dropped by the daemon", "closed by the clients",
                                          "dropped by the daemon")):
            reset_peak(daemon)
            with normal_client(daemon) as rounds:
                stalled = [_stall(daemon.port, f"{attempt}-{i}") for i in range(NUM_STALLED)]
                try:
                    if ending == "closed by the clients":
                        time.sleep(2 * frame_timeout_s)
                    else:  # a few at a time: those admitted are dropped, then the next
                        rounds_needed = NUM_STALLED // (frame_memory // BODY_BYTES)
                        within_s = 10 + 3 * rounds_needed * frame_timeout_s
                        assert all(_closed_by_daemon(c, within_s) for c in stalled), ending
                finally:
                    for conn in stalled:
                        conn.close()
                served = rounds[0]
            assert served > 0
            rise = peak_bytes(daemon) - start
            assert rise <= bound, (ending, rise // MiB)
            kept = settled_rss_bytes(daemon, start + KEPT_BYTES) - start
            assert kept <= KEPT_BYTES, (ending, kept // MiB)
    assert "waits for frame memory" in daemon.output()


def test_a_largest_body_waits_its_turn_untimed_and_is_stored(start_daemon):
    """Four stalled bodies hold most of the frame memory and four more wait ahead of a
    largest put_many frame (64 MiB of values). The stalled ones are dropped in two rounds
    of the frame timeout; the large frame waits through both (the daemon is not reading
    it, so its frame timer does not run), then is admitted and stored whole."""
    frame_timeout_s = 1.0
    frame_memory = largest_body_bytes(16 * MiB) + 4 * MiB  # 72 MiB: four 16 MiB bodies
    daemon = start_daemon("--dram", "80MiB", "--max-value", "16MiB",
                          "--frame-memory", str(frame_memory),
                          "--frame-timeout", str(frame_timeout_s))
    stalled = [_stall(daemon.port, f"ahead-{i}") for i in range(8)]
    keys = [make_key(("largest", i)) for i in range(4)]
    values = [make_value(("largest", i), 16 * MiB) for i in range(4)]
    try:
        with kvstore.connect(daemon.url, shared_memory=False, timeout_s=60) as client:
            assert client.put_many(keys, values) == 4
            assert client.get_many(keys) == values
        assert all(_closed_by_daemon(conn, 10) for conn in stalled)
    finally:
        for conn in stalled:
            conn.close()
    output = daemon.output()
    assert output.count("frame not complete within the frame timeout") >= 8, output[-3000:]


def test_memory_goes_back_after_a_burst_of_large_frames(start_daemon):
    """Four TCP clients at once get 16 MiB and 1 MiB values many times over and put 4 MiB
    ones: the daemon's heap grows meanwhile (glibc keeps what Python frees), and gives its
    free pages back once the burst is over."""
    daemon = start_daemon("--dram", "128MiB", "--max-value", "16MiB")
    big = [make_key(("big", i)) for i in range(2)]
    small = [make_key(("small", i)) for i in range(8)]
    with kvstore.connect(daemon.url, timeout_s=60) as shm:  # values through shared memory
        for i in range(8):  # every page of the pool touched before the start is read
            assert shm.put(make_key(("fill", i)), make_value(("fill", i), 16 * MiB))
        for i in range(8):  # and room made again
            shm.delete(make_key(("fill", i)))
        for key in big:
            assert shm.put(key, make_value(key, 16 * MiB))
        for key in small:
            assert shm.put(key, make_value(key, MiB))
        time.sleep(1.5)
        start = rss_bytes(daemon)

        def burst(t: int) -> None:
            with kvstore.connect(daemon.url, shared_memory=False, timeout_s=60) as wire:
                for r in range(3):
                    assert wire.get_many(big * 2) == [make_value(k, 16 * MiB) for k in big * 2]
                    assert wire.get_many(small * 8) == [make_value(k, MiB) for k in small * 8]
                    assert wire.put(make_key(("wire", t)), make_value((t, r), 4 * MiB))

        with ThreadPoolExecutor(4) as pool:
            for done in [pool.submit(burst, t) for t in range(4)]:
                done.result(120)
        kept = settled_rss_bytes(daemon, start + KEPT_BYTES) - start
        assert kept <= KEPT_BYTES, kept // MiB


def test_a_frame_memory_below_one_largest_body_is_refused():
    result = subprocess.run([sys.executable, "-m", "daemon", "--max-value", "16MiB",
                             "--frame-memory", "32MiB"], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert "--frame-memory must hold one largest request body" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_meta_of_nested_containers_is_refused_as_it_is_decoded(start_daemon):
    """4 MiB of msgpack holding a list of a million empty lists decodes into some 60 MB
    of Python objects (300 MB for the largest meta): a request meta is refused once it
    holds more arrays and maps than any operation needs."""
    daemon = start_daemon("--dram", "16MiB")
    before = rss_bytes(daemon)
    conn = RawConnection(daemon.port)
    try:
        conn.hello()
        meta = request("get_many", id=9, keys=[[] for _ in range(1_000_000)])
        conn.send(frame(None, packed=msgpack.packb(meta)))
        answer = conn.answer()
        assert answer["ok"] is False and answer["code"] == "bad_frame"
        assert "arrays and maps" in answer["message"]
    finally:
        conn.close()
    assert rss_bytes(daemon) - before < 32 << 20


def test_a_key_pinned_many_times_in_one_request_takes_one_pin(start_daemon):
    """65,536 copies of one key in a pin request made as many pins, each held for a lease;
    now one pin, its handle at every place the key was asked."""
    daemon = start_daemon("--dram", "16MiB")
    key = make_key("pinned")
    with kvstore.connect(daemon.url) as client:
        assert client.put_many([key], [make_value("pinned", 100 * KiB)])
        assert client.get_many([key] * 100) == [make_value("pinned", 100 * KiB)] * 100
    conn = RawConnection(daemon.port)
    try:
        conn.hello(shm=True)
        blocks = conn.call("pin", keys=[key] * 65536)["blocks"]
        assert len(blocks) == 65536 and len({tuple(b) for b in blocks}) == 1
        assert conn.call("unpin", handles=[blocks[0][2]])["ok"]
    finally:
        conn.close()

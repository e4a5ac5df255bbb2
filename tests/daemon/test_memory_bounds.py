"""What hostile requests may cost a real `python -m daemon` subprocess in memory, read from
its /proc/PID/status: the peak (VmHWM, reset before each attack) and the resident set
after it (VmRSS). Each peak is bounded by what the daemon's configured limits allow
(`daemon.frame_memory`), plus `SLACK_BYTES` for the interpreter's own churn; after each
burst, the resident set comes back to within `KEPT_BYTES` of where it was.

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

import kvstore
from daemon import tcp
from daemon.frame_memory import largest_body_bytes
from tests.conftest import make_key, make_value
from tests.daemon.conftest import REPO, DaemonProcess
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

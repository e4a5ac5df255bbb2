"""How the daemon cuts TCP byte streams into frames (`daemon.tcp`), over real sockets to a
real `python -m daemon` subprocess: frames of every size around its receive buffer's limits,
sent back to back in one write or dribbled in pieces of random sizes, are each answered in
order and store exactly their bytes; frames sent while a request waits on the disk are kept
for after it; a stream that keeps arriving in pieces is not taken for a stalled sender.
"""

from __future__ import annotations

import random
import threading
import time

import pytest

import kvstore
from daemon import tcp
from tests.conftest import make_key, make_value
from tests.daemon.test_robustness import RawConnection, frame, request

KiB, MiB = 1024, 1024 * 1024
HALF = tcp.OWN_BUFFER_BYTES  # bodies larger than this get a buffer of their own
# Data sizes on both sides of every limit of the receive buffer.
SIZES = (0, 1, 4 * KiB, HALF - 200, HALF - 32, HALF, HALF + 1, HALF + 5000,
         tcp.BUFFER_BYTES - 100, tcp.BUFFER_BYTES + 7, 700 * KiB, MiB)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    """With an NVMe tier, so that puts wait on a worker thread (the frames behind them
    must wait their turn)."""
    from tests.daemon.conftest import DaemonProcess

    tmp = tmp_path_factory.mktemp("kvstored-framing")
    process = DaemonProcess(tmp, "--dram", "8MiB", "--nvme-path", str(tmp / "nvme"),
                            "--nvme", "64MiB", "--max-value", "1MiB").start()
    yield process
    process.stop()


def _puts(tag: str) -> tuple[list[bytes], list[bytes], bytes]:
    """Put frames of every size in SIZES (shuffled) and a contains after each: keys,
    values and the bytes of all the frames, back to back."""
    sizes = list(SIZES)
    random.Random(tag).shuffle(sizes)
    keys = [make_key((tag, i)) for i in range(len(sizes))]
    values = [make_value((tag, i), size) for i, size in enumerate(sizes)]
    frames = []
    for i, (key, value) in enumerate(zip(keys, values, strict=True)):
        frames.append(frame(request("put", id=2 * i + 10, key=key), value))
        frames.append(frame(request("contains", id=2 * i + 11, key=key)))
    return keys, values, b"".join(frames)


def _check_answers(conn: RawConnection, count: int) -> None:
    for i in range(count):
        put = conn.answer()
        assert put["id"] == 2 * i + 10 and put["ok"] and put["stored"], put
        contains = conn.answer()
        assert contains["id"] == 2 * i + 11 and contains["present"] is True, contains


def _check_stored(daemon, keys: list[bytes], values: list[bytes]) -> None:
    with kvstore.connect(daemon.url, shared_memory=False) as client:
        for key, value in zip(keys, values, strict=True):
            assert client.get(key) == value


def test_frames_back_to_back_are_each_answered_in_order(daemon):
    keys, values, payload = _puts("back-to-back")
    conn = RawConnection(daemon.port, timeout_s=30)
    try:
        conn.hello()
        conn.send(payload)  # one write: many frames arrive in each receive
        _check_answers(conn, len(keys))
    finally:
        conn.close()
    _check_stored(daemon, keys, values)


@pytest.mark.parametrize("seed", [1, 2])
def test_frames_dribbled_in_random_pieces_are_each_answered(daemon, seed):
    keys, values, payload = _puts(f"dribbled-{seed}")
    rng = random.Random(seed)
    conn = RawConnection(daemon.port, timeout_s=30)
    try:
        conn.hello()
        sent = 0
        while sent < len(payload):  # pieces that split headers, metas and data anywhere
            piece = rng.choice((1, 3, 17, 1000, 40 * KiB, 300 * KiB))
            conn.send(payload[sent:sent + piece])
            sent += piece
            if rng.random() < 0.05:
                time.sleep(0.01)  # let the daemon see a part on its own
        _check_answers(conn, len(keys))
    finally:
        conn.close()
    _check_stored(daemon, keys, values)


def test_a_long_stream_of_split_frames_is_not_taken_for_a_stalled_one(start_daemon):
    """Frames that keep coming in pieces, each piece ending inside a frame, for longer than
    the frame timeout: every frame is whole in time, so none is dropped."""
    frame_timeout_s = 1.0
    daemon = start_daemon("--dram", "16MiB", "--frame-timeout", str(frame_timeout_s))
    values = [make_value(("stream", i), 3000 + i % 7) for i in range(700)]
    payload = b"".join(frame(request("put", id=i + 10, key=make_key(("stream", i))), value)
                       for i, value in enumerate(values))
    conn = RawConnection(daemon.port, timeout_s=30)
    answers: list[dict] = []
    try:
        conn.hello()
        reader = threading.Thread(target=lambda: answers.extend(
            conn.answer() for _ in values))
        reader.start()
        started = time.monotonic()
        for offset in range(0, len(payload), 1000):  # ~2100 pieces, 1 ms apart
            conn.send(payload[offset:offset + 1000])
            time.sleep(0.001)
        assert time.monotonic() - started > 2 * frame_timeout_s
        reader.join(30)
    finally:
        conn.close()
    assert [a["id"] for a in answers] == [i + 10 for i in range(len(values))]
    assert all(a["ok"] and a["stored"] for a in answers)


def test_a_large_frame_before_hello_is_refused_without_room_for_it(daemon):
    """A header announcing a body of 60 MiB (within the frame limit), before any hello:
    refused (bad_frame) and the connection ends; nothing is set aside for it."""
    conn = RawConnection(daemon.port, timeout_s=10)
    try:
        conn.send(frame(request("put", key=make_key("early")), b"x" * 100,
                        data_bytes=60 * MiB))
        answer = conn.answer()
        assert answer["ok"] is False and answer["code"] == "bad_frame", answer
        assert conn.is_closed()
    finally:
        conn.close()


def test_sigterm_lets_an_answer_being_written_reach_its_reader(start_daemon):
    """A 16 MiB answer, more than the sockets' buffers hold, still in the daemon's write
    buffer when SIGTERM comes (its reader reads slowly): the daemon drains it before it
    exits 0."""
    import signal

    daemon = start_daemon("--dram", "64MiB", "--max-value", "16MiB")
    key, value = make_key(("big", 1)), make_value(("big", 1), 16 * MiB)
    with kvstore.connect(daemon.url, shared_memory=False) as client:
        assert client.put(key, value)
    conn = RawConnection(daemon.port, timeout_s=20, rcvbuf_bytes=16 * KiB)
    try:
        conn.hello()
        conn.send(frame(request("get", id=9, key=key)))
        time.sleep(0.3)  # answered at once; most of it waits in the daemon's buffer
        daemon.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        answer = conn.read_frame()
        assert answer is not None and answer[0]["found"] is True and answer[1] == value
    finally:
        conn.close()
    assert daemon.proc.wait(30) == 0

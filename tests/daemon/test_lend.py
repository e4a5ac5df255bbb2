"""`Client.lend`: blocks pinned where they lie in the daemon's shared DRAM pool, to be
read in place (the vLLM connector's GPU kernel reads them through the page-locked pool).
Real daemon subprocesses; what a loan promises: the lent bytes are the key's value and
stay whole while the loan is held, even if the key is overwritten or deleted meanwhile;
blocks elsewhere are not lent; the pins go when the loan ends."""

from __future__ import annotations

import contextlib
import os
import time

import pytest

import kvstore
from kvstore import InvalidKeyError
from kvstore.client import Client
from tests.conftest import make_key, make_value

KiB = 1024


def test_blocks_in_the_pool_are_lent_in_place_and_others_are_not(start_daemon, tmp_path):
    daemon = start_daemon("--dram", "16MiB", "--nvme-path", str(tmp_path / "nvme"),
                          "--nvme", "64MiB", "--max-value", "1MiB")
    with kvstore.connect(daemon.url) as client:
        keys = [make_key(i) for i in range(4)]
        assert client.put_many(keys[:2], [make_value(i, 256 * KiB) for i in range(2)]) == 2
        assert client.put_in_tier("nvme", [keys[2]], [make_value(2, 256 * KiB)]) == 1
        before = time.monotonic()
        with client.lend([*keys, keys[0]]) as loan:
            after = time.monotonic()  # key 3 absent, key 0 twice
            # page-locked where CUDA registered the pool, which `can_lend` tells first
            assert loan.page_locked == client.can_lend
            assert [a is not None for a in loan.addresses] == [True, True, False, False, True]
            assert loan.nbytes[:2] == [256 * KiB, 256 * KiB]
            assert loan.view(0).tobytes() == make_value(0, 256 * KiB)
            assert loan.view(1).tobytes() == make_value(1, 256 * KiB)
            assert loan.addresses[4] == loan.addresses[0]
            assert loan.view(2) is None and loan.view(3) is None
            assert len(loan.handles) == 2  # one pin per distinct key
            # valid for half the daemon's lease (30 s) from when the pin was asked for
            assert before + 15.0 <= loan.valid_until <= after + 15.0
        assert client.get(keys[0]) == make_value(0, 256 * KiB)


def test_lent_bytes_stay_whole_while_the_key_is_overwritten_and_deleted(start_daemon):
    """The daemon keeps a pinned slot as it was until its pins go: a loan held across an
    overwrite (another size: another slot), a delete, and puts that fill the pool
    several times over still reads the lent value; after it ends the key reads as the
    store now holds it."""
    daemon = start_daemon("--dram", "8MiB", "--max-value", "1MiB")
    with kvstore.connect(daemon.url) as reader, kvstore.connect(daemon.url) as writer:
        key, other = make_key("lent"), make_key("other")
        assert writer.put(key, make_value(1, 512 * KiB))
        assert writer.put(other, make_value(5, 512 * KiB))
        with reader.lend([key, other]) as loan:
            assert writer.put(key, make_value(2, 300 * KiB))
            assert writer.delete(other)
            for i in range(48):  # 24 MiB through an 8 MiB pool
                writer.put(make_key(("fill", i)), make_value(100 + i, 512 * KiB))
            assert loan.view(0).tobytes() == make_value(1, 512 * KiB)
            assert loan.view(1).tobytes() == make_value(5, 512 * KiB)
        assert reader.get(other) is None
        assert reader.get(key) in (None, make_value(2, 300 * KiB))


def test_a_loan_gives_its_pins_back_and_one_held_past_its_lease_loses_them(start_daemon):
    """With a 1 s lease: a loan that ended leaves no pin to expire; one held past the
    lease has its pin dropped by the daemon's sweeper (counted), and its ``valid_until``
    had passed by then."""
    daemon = start_daemon("--dram", "8MiB", "--max-value", "1MiB", "--lease", "1")
    with kvstore.connect(daemon.url) as client:
        key = make_key("k")
        assert client.put(key, make_value(1, 128 * KiB))
        with client.lend([key]) as loan:
            assert loan.addresses[0] is not None
        time.sleep(2.5)
        assert client.stats()["leases"]["expired_pins"] == 0
        with client.lend([key]) as loan:
            assert loan.valid_until - time.monotonic() <= 0.5  # half the lease
            time.sleep(3.5)  # (the sweeper runs every second)
            assert client.stats()["leases"]["expired_pins"] == 1


def test_without_the_pool_nothing_is_lent_and_bad_keys_are_refused(start_daemon):
    daemon = start_daemon("--dram", "8MiB", "--max-value", "1MiB")
    key = make_key("k")
    with kvstore.connect(daemon.url, shared_memory=False) as client:
        assert client.put(key, make_value(1, 128 * KiB))
        assert not client.can_lend
        with client.lend([key]) as loan:
            assert loan.addresses == [None] and loan.handles == [] and not loan.page_locked
    with kvstore.connect(daemon.url) as client:
        with pytest.raises(InvalidKeyError), client.lend([key, b"short"]):
            pass  # never reached
        with client.lend([]) as loan:
            assert loan.addresses == []
        assert client.get(key) == make_value(1, 128 * KiB)


@pytest.mark.timeout(60)  # (without its own connection, the loan's holder hangs)
def test_a_loan_leaves_the_client_s_connections_to_its_other_calls(start_daemon):
    """A loan's connection is its own: with one connection allowed, the calls its holder
    makes meanwhile (reading the blocks not lent) still run, and none waits on it."""
    daemon = start_daemon("--dram", "8MiB", "--max-value", "1MiB")
    key, other = make_key("k"), make_key("other")
    with Client(daemon.url, max_connections=1, timeout_s=5) as client:
        assert client.put_many([key, other], [make_value(1, 64 * KiB), make_value(2, 64 * KiB)])
        with client.lend([key]) as loan:
            assert loan.view(0).tobytes() == make_value(1, 64 * KiB)
            assert client.get_many([other]) == [make_value(2, 64 * KiB)]
            with client.lend([other]) as second:
                assert second.view(0).tobytes() == make_value(2, 64 * KiB)


def test_a_lent_pool_stays_registered_until_its_last_loan_ends(monkeypatch):
    """The client's pool bookkeeping, with CUDA's registration recorded instead of made
    (this machine may have no GPU; the GPU tests read lent pools for real): a pool that a
    restarted daemon's new pool replaces while it is lent is unregistered once, when its
    last loan ends, never before; one replaced while not lent is unregistered at once;
    a replaced pool lends nothing more."""
    from kvstore.client import session
    from kvstore.shm import page_lock
    from kvstore.shm.mapping import map_shared, shm_path

    events: list[tuple[str, int]] = []
    monkeypatch.setattr(page_lock, "register_with_cuda",
                        lambda array: events.append(("register", array.ctypes.data)) or True)
    monkeypatch.setattr(page_lock, "unregister_with_cuda",
                        lambda array: events.append(("unregister", array.ctypes.data)))
    names = [f"kvstore-test-lend-{i}-{time.monotonic_ns()}" for i in range(3)]
    mappings = [map_shared(name, 1 << 20, create=True) for name in names]
    address = ("127.0.0.1", 1)
    try:
        first, _ = session._shared_pool(address, names[0], 1 << 20)
        assert session.hold_pool(names[0]) and session.hold_pool(names[0])  # two loans
        second, _ = session._shared_pool(address, names[1], 1 << 20)  # the daemon restarted
        assert ("unregister", first.ctypes.data) not in events
        assert not session.hold_pool(names[0])  # replaced: nothing more is lent from it
        session.release_pool(names[0])
        assert ("unregister", first.ctypes.data) not in events  # one loan still reads it
        session.release_pool(names[0])
        assert events.count(("unregister", first.ctypes.data)) == 1
        session._shared_pool(address, names[2], 1 << 20)  # not lent: let go at once
        assert events.count(("unregister", second.ctypes.data)) == 1
        assert not session._loans and not session._retiring
    finally:
        with session._pools_lock:
            for name in names:
                session._pools.pop(name, None)
            session._pool_of_address.pop(address, None)
        for name, mapping in zip(names, mappings, strict=True):
            mapping.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(shm_path(name))

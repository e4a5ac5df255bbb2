"""The shared directory of a DRAM pool (`kvstore.shm.directory`): real POSIX shared
memory, a writer and readers that map it, also from another process."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys

import pytest

from kvstore.shm import directory as shm_directory
from kvstore.shm.directory import PROBES, Directory, rows_for
from kvstore.shm.mapping import shm_path
from tests.conftest import make_key

pytestmark = pytest.mark.skipif(not Directory.supported, reason="x86-64 only (see module)")


@pytest.fixture
def directory():
    writer = Directory(f"kvstore-test-{secrets.token_hex(4)}", 1024, create=True)
    reader = Directory(writer.name, create=False)
    yield writer, reader
    reader.close()
    writer.close()


def test_insert_lookup_remove(directory):
    writer, reader = directory
    assert reader.lookup(make_key("a")) is None
    assert writer.insert(make_key("a"), 4096, 100)
    row, seq, offset, nbytes = reader.lookup(make_key("a"))
    assert (offset, nbytes) == (4096, 100) and seq % 2 == 0 and reader.unchanged(row, seq)
    assert reader.lookup(make_key("b")) is None
    writer.remove(make_key("a"))
    assert reader.lookup(make_key("a")) is None and not reader.unchanged(row, seq)
    assert len(writer) == 0


def test_a_change_after_lookup_invalidates_the_read(directory):
    writer, reader = directory
    writer.insert(make_key("a"), 0, 10)
    row, seq, _, _ = reader.lookup(make_key("a"))
    writer.insert(make_key("a"), 8192, 10)  # overwritten: moved to another slot
    assert not reader.unchanged(row, seq)
    assert reader.lookup(make_key("a"))[2] == 8192


def test_a_full_probe_window_leaves_keys_unlisted(directory):
    writer, reader = directory
    # Keys whose first 8 bytes (their hash) collide on one home row.
    keys = [bytes(8) + i.to_bytes(8, "little") for i in range(1, PROBES + 3)]
    listed = [writer.insert(k, 4096 * i, 1) for i, k in enumerate(keys)]
    assert listed == [True] * PROBES + [False, False]
    assert [reader.lookup(k) is not None for k in keys] == listed
    writer.remove(keys[0])
    assert writer.insert(keys[-1], 1, 1)  # a freed row is taken again
    assert reader.lookup(keys[-1])[2:] == (1, 1)


def test_closed_or_stale_directory_is_not_read(directory, monkeypatch):
    writer, reader = directory
    writer.insert(make_key("a"), 0, 10)
    assert reader.lookup(make_key("a")) is not None
    stamped = shm_directory.time.monotonic_ns()
    monkeypatch.setattr(shm_directory.time, "monotonic_ns",
                        lambda: stamped + int(shm_directory.STALE_S * 1e9) + 1)
    assert reader.lookup(make_key("a")) is None  # the daemon stopped stamping
    writer.beat()
    assert reader.lookup(make_key("a")) is not None
    monkeypatch.undo()
    name = writer.name
    writer.close()
    assert reader.lookup(make_key("a")) is None  # closed: marked before the unlink
    assert not os.path.exists(shm_path(name))


def test_another_process_reads_what_the_writer_lists(directory):
    writer, _ = directory
    writer.insert(make_key("x"), 123 * 4096, 777)
    code = ("from kvstore.shm.directory import Directory\n"
            "from tests.conftest import make_key\n"
            f"d = Directory({writer.name!r}, create=False)\n"
            "print(d.lookup(make_key('x'))[2:], d.lookup(make_key('y')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(
                             os.path.abspath(__file__)))))
    assert out.stdout.strip() == "(503808, 777) None"


def test_not_a_directory_is_refused():
    name = f"kvstore-test-{secrets.token_hex(4)}"
    with open(shm_path(name), "wb") as f:
        f.write(bytes(4096))
    try:
        with pytest.raises(ValueError, match="not a kvstore directory"):
            Directory(name, create=False)
    finally:
        os.unlink(shm_path(name))


def test_rows_scale_with_the_pool_and_stay_a_power_of_two():
    assert rows_for(0) == 1024
    assert rows_for(64 << 20) == 2048
    assert rows_for(1 << 40) == 1 << 22
    assert all(r & (r - 1) == 0 for r in (rows_for(n) for n in (1, 5 << 20, 3 << 30)))


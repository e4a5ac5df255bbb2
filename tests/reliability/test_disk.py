"""A damaged or full disk under `kvstored`: bit flips, a segment cut short, a record forged
inside a value, a filesystem that fills up. Whatever the damage, a read returns the value
written for its key or nothing: never another key's bytes, never bytes nobody wrote."""

from __future__ import annotations

import os
import signal
import urllib.request

import pytest
import xxhash

import kvstore
from kvstore.keys import namespace_secret, scoped_key
from kvstore.tiers.nvme.record import pack_header
from tests.conftest import fill_disk
from tests.daemon.conftest import free_port
from tests.reliability.harness import (
    DAMAGE_FLAGS,
    DiskDamage,
    KiB,
    Verdicts,
    key_of,
    value_of,
    whose,
)


def test_bit_flips_and_cut_segments_never_serve_wrong_bytes(tmp_path, start_daemon, scale):
    damage = DiskDamage(tmp_path, start=start_daemon, seed=1515)
    damage.run(max(2, round(4 * scale)))
    assert damage.verdicts.foreign == damage.verdicts.corrupt == damage.verdicts.stale == 0, \
        damage.verdicts.examples
    assert damage.verdicts.checked == damage.rounds * 2 * damage.num_keys
    assert damage.num_missing > 0, "the damage should have cost some values"
    assert damage.unnoticed == 0, "values went missing with no damage counted"


@pytest.mark.parametrize("damage", ["header", "cut"])
def test_a_record_forged_inside_a_value_is_not_served(tmp_path, start_daemon, damage):
    """Tenant B stores a value holding a complete record for tenant A's block, under A's
    stored key (known here, as if it leaked; normally no tenant can compute it), with the
    best header B can make. A damaged header of B's own record, or a segment cut inside
    B's value, sends recovery looking for the next record: it must not find B's."""
    nvme = tmp_path / "nvme"
    daemon = start_daemon(*DAMAGE_FLAGS, "--nvme-path", str(nvme))
    key, value = key_of(1), value_of(1, 1, 3000)
    with kvstore.connect(daemon.url, namespace="tenant-a", shared_memory=False) as a:
        assert a.put(key, value)
    stored = scoped_key(namespace_secret("tenant-a", (nvme / "kvstored.key").read_bytes()), key)
    planted = value_of(2, 9, 3000)
    head = pack_header(0, stored, None, len(planted), len(planted),
                       xxhash.xxh3_64_intdigest(planted))
    record = head + xxhash.xxh3_64_intdigest(head).to_bytes(8, "little") + planted
    attack = bytes(1024) + record + bytes(4096)
    with kvstore.connect(daemon.url, namespace="tenant-b", shared_memory=False) as b:
        assert b.put(key_of(3), attack)
    assert daemon.signal(signal.SIGTERM) == 0
    segment = max(nvme.glob("seg-*.log"), key=lambda p: p.stat().st_size)
    data = segment.read_bytes()
    at = data.find(attack[:1024] + record[:8]) - 80  # B's header, right before its value
    assert at >= 0
    if damage == "header":
        with open(segment, "r+b") as f:
            f.seek(at + 40)
            f.write(b"\xff")
    else:
        os.truncate(segment, at + 80 + 2000)
    daemon = start_daemon(*DAMAGE_FLAGS, "--nvme-path", str(nvme))
    with kvstore.connect(daemon.url, namespace="tenant-a", shared_memory=False) as a:
        assert a.get(key) in (value, None)
        assert a.get(key) != planted


def test_a_filesystem_filling_up_under_load(start_daemon, tmpfs):
    """Finding 4: NVMe on a 48 MiB tmpfs declared as 256 MiB; another process fills the
    disk while a client writes. Puts keep being acknowledged (DRAM), every acknowledged
    value is served exactly or counted as evicted, the metrics say read only, and SIGTERM
    exits 0; a restart serves what reached the disk."""
    disk = tmpfs("48m")
    metrics = f"127.0.0.1:{free_port()}"
    flags = ("--dram", "16MiB", "--nvme-path", str(disk / "kv"), "--nvme", "256MiB",
             "--max-value", "1MiB")
    daemon = start_daemon(*flags, "--metrics", metrics)
    verdicts = Verdicts()
    with kvstore.connect(daemon.url) as client:
        for i in range(40):
            assert client.put(key_of(i), value_of(i, 1, 512 * KiB))
        client.flush()
        fill_disk(disk / "filler")
        for i in range(40, 180):
            assert client.put(key_of(i), value_of(i, 1, 512 * KiB)), f"put #{i} refused"
            assert client.get(key_of(i)) == value_of(i, 1, 512 * KiB)
        stats = client.stats()
        assert stats["tiers"]["nvme"]["read_only"]
        got = client.get_many([key_of(i) for i in range(180)])
        for i, value in enumerate(got):
            verdicts.judge(i, value, {1, None}, None)
        missing = sum(value is None for value in got)
        assert missing <= stats["evictions"] - stats["demotions"]
        # a key whose record is on the read-only disk cannot take a new value (a restart
        # would bring the old one back): refused, over shared memory and over TCP
        on_disk = next(i for i in range(40) if got[i] is not None)
        assert not client.put(key_of(on_disk), value_of(on_disk, 2, 512 * KiB))
        with kvstore.connect(daemon.url, shared_memory=False) as tcp:
            assert not tcp.put(key_of(on_disk), value_of(on_disk, 2, 512 * KiB))
        assert client.get(key_of(on_disk)) == value_of(on_disk, 1, 512 * KiB)
    assert verdicts.bad == 0, verdicts.examples
    with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=10) as response:
        assert 'kvstore_tier_read_only{tier="nvme"} 1.0' in response.read().decode()
    assert daemon.signal(signal.SIGTERM) == 0
    assert "not everything it held was written to NVMe" in daemon.output()
    (disk / "filler").unlink()
    daemon = start_daemon(*flags)
    with kvstore.connect(daemon.url) as client:
        for i, value in enumerate(client.get_many([key_of(i) for i in range(180)])):
            assert value is None or whose(value) == (i, 1)

"""The NVMe tier's contract on real files: round trips, reopen, options and misuse,
threads, a crash, and a dict model of random operations."""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings, target
from hypothesis import strategies as st

from kvstore.errors import BufferSizeError, ConfigError, InvalidKeyError, InvalidValueError
from kvstore.tiers.nvme import Compression, NvmeTier, NvmeTierConfig
from tests.conftest import make_key, make_value
from tests.tiers.nvme.disk import KiB, MiB, aligned_array, config, disk_bytes

ROOT = Path(__file__).resolve().parents[3]  # the repository
SIZES = [0, 1, 7, 4 * KiB, 4 * KiB + 1, 256 * KiB, 1 * MiB]


# -- round trips and reopen ---------------------------------------------------------------------

@pytest.mark.parametrize("direct_io", [True, False], ids=["direct", "buffered"])
def test_round_trip_and_reopen(tmp_path, direct_io):
    cfg = config(tmp_path / "nvme", direct_io=direct_io)
    with NvmeTier(cfg) as tier:
        for n in SIZES:
            assert tier.put(make_key(n), make_value(n, n), parent=make_key(("p", n)))
            assert tier.get(make_key(n)) == make_value(n, n)  # served from the write buffer
        for n in SIZES:
            out = bytearray(n)
            assert tier.read_into(make_key(n), out) and bytes(out) == make_value(n, n)
            assert tier.nbytes_of(make_key(n)) == n
        assert tier.stats()["direct_io"] is direct_io
        tier.flush()
    with NvmeTier(cfg) as tier:
        assert len(tier) == len(SIZES)
        assert [r.key for r in tier.recovered()] == [make_key(n) for n in SIZES]  # oldest first
        for n in SIZES:
            assert tier.get(make_key(n)) == make_value(n, n)
            assert tier.parent_of(make_key(n)) == make_key(("p", n))
        assert tier.stats()["corrupt_records_skipped"] == 0


def test_reads_span_disk_and_write_buffer(tmp_path):
    # A 4 KiB buffer: big values are partly written, partly still buffered; every flush
    # leaves a partial block that the next one rewrites.
    cfg = config(tmp_path, write_buffer_bytes=4 * KiB)
    with NvmeTier(cfg) as tier:
        for i in range(40):
            n = 997 * i + 13
            assert tier.put(make_key(i), make_value(i, n))
            assert tier.get(make_key(i)) == make_value(i, n)
            if i % 3 == 0:
                tier.flush()
        for i in range(40):
            assert tier.get(make_key(i)) == make_value(i, 997 * i + 13)
    with NvmeTier(cfg) as tier:
        for i in range(40):
            assert tier.get(make_key(i)) == make_value(i, 997 * i + 13)


def test_numpy_values_and_outputs(tmp_path):
    with NvmeTier(config(tmp_path)) as tier:
        array = np.arange(3000, dtype=np.float32).reshape(30, 100)
        assert tier.put(make_key("a"), array)
        assert tier.get(make_key("a")) == array.tobytes()
        out = np.empty_like(array)
        assert tier.read_into(make_key("a"), out)
        assert np.array_equal(out, array)
        with pytest.raises(BufferSizeError):
            tier.read_into(make_key("a"), bytearray(10))


def test_overwrite_and_delete_survive_reopen(tmp_path):
    cfg = config(tmp_path)
    with NvmeTier(cfg) as tier:
        for i in range(10):
            tier.put(make_key(i), make_value(("old", i), 5000))
        for i in range(0, 10, 2):
            tier.put(make_key(i), make_value(("new", i), 3000))
        for i in range(1, 10, 4):
            assert tier.delete(make_key(i))
        assert not tier.delete(make_key("never stored"))
    with NvmeTier(cfg) as tier:
        for i in range(10):
            got = tier.get(make_key(i))
            if i % 4 == 1:
                assert got is None
            elif i % 2 == 0:
                assert got == make_value(("new", i), 3000)
            else:
                assert got == make_value(("old", i), 5000)


def test_evicted_key_comes_back_with_its_last_value_only(tmp_path):
    cfg = config(tmp_path)
    with NvmeTier(cfg) as tier:
        tier.put(make_key("k"), make_value(1, 1000))
        tier.put(make_key("k"), make_value(2, 1000))
        assert tier.evict(make_key("k"))
        assert make_key("k") not in tier and tier.get(make_key("k")) is None
        assert not tier.evict(make_key("k"))
    with NvmeTier(cfg) as tier:
        assert tier.get(make_key("k")) == make_value(2, 1000)


# -- options and misuse --------------------------------------------------------------------------

def test_lz4_round_trip_and_ratio(tmp_path):
    cfg = config(tmp_path, compression=Compression.LZ4)
    compressible = b"kv-cache " * 20_000
    noise = np.random.default_rng(1).bytes(50_000)
    with NvmeTier(cfg) as tier:
        assert tier.put(make_key("z"), compressible)
        assert tier.put(make_key("n"), noise)  # stored raw: compressing would not shrink it
        assert tier.used_bytes < len(compressible) // 10 + len(noise) + 4 * KiB
        assert tier.stats()["compression_ratio"] > 2
        assert tier.get(make_key("z")) == compressible
        out = bytearray(len(compressible))
        assert tier.read_into(make_key("z"), out) and out == compressible
    with NvmeTier(cfg) as tier:
        assert tier.get(make_key("z")) == compressible and tier.get(make_key("n")) == noise
    with NvmeTier(config(tmp_path)) as tier:  # compression off: old records still read
        assert tier.get(make_key("z")) == compressible


def test_bad_input_changes_nothing(tmp_path):
    with NvmeTier(config(tmp_path)) as tier:
        with pytest.raises(InvalidKeyError):
            tier.put(b"short", b"v")
        with pytest.raises(InvalidKeyError):
            tier.put(make_key(1), b"v", parent=b"bad")
        with pytest.raises(InvalidValueError):
            tier.put(make_key(1), bytes(MiB + 1))
        with pytest.raises(InvalidValueError):
            tier.put(make_key(1), "text")
        with pytest.raises(InvalidKeyError):
            tier.get(b"x" * 17)
        assert len(tier) == 0 and tier.used_bytes == 0


def test_full_tier_refuses_and_changes_nothing(tmp_path):
    with NvmeTier(config(tmp_path)) as tier:
        i = 0
        while tier.put(make_key(i), make_value(i, 200 * KiB)):
            i += 1
        used, n = tier.used_bytes, len(tier)
        assert not tier.put(make_key(0), make_value("other", 200 * KiB))
        assert tier.used_bytes == used and len(tier) == n
        assert tier.get(make_key(0)) == make_value(0, 200 * KiB)
        assert disk_bytes(tmp_path) <= tier.config.capacity_bytes


@pytest.mark.parametrize("changes", [
    dict(segment_bytes=1 * MiB),                      # cannot hold a 1 MiB value + header
    dict(capacity_bytes=7 * MiB),                     # fewer than 4 segments
    dict(capacity_bytes=0),
    dict(write_buffer_bytes=True),
    dict(compression="zstd"),
])
def test_bad_config_is_refused(tmp_path, changes):
    with pytest.raises(ConfigError):
        config(tmp_path, **changes)


def test_threads_share_one_tier(tmp_path):
    errors: list[BaseException] = []
    with NvmeTier(config(tmp_path, capacity_bytes=16 * MiB)) as tier:
        def work(t: int) -> None:
            try:
                for i in range(150):
                    key = make_key((t, i % 20))
                    value = make_value((t, i), 1000 + 37 * i)
                    assert tier.put(key, value)
                    assert tier.get(key) == value
                    if i % 25 == 0:
                        tier.flush()
            except BaseException as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors
        assert len(tier) == 80


# -- a crash -------------------------------------------------------------------------------------

CHILD = """
import sys, time
sys.path.insert(0, {root!r})
from kvstore.tiers.nvme import NvmeTier, NvmeTierConfig
from tests.conftest import make_key, make_value
tier = NvmeTier(NvmeTierConfig(path={path!r}, capacity_bytes=32 << 20, max_value_bytes=64 << 10,
                               segment_bytes=1 << 20, write_buffer_bytes=64 << 10))
i = 0
while tier.put(make_key(i), make_value(i, 1 + i * 7919 % 20000)):
    i += 1
    if i % 25 == 0:
        tier.flush()
        print(i, flush=True)
time.sleep(60)
"""


def test_sigkill_keeps_every_flushed_value(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", CHILD.format(root=str(ROOT),
                                                                 path=str(tmp_path))],
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    flushed = 0
    for line in child.stdout:
        flushed = int(line)
        if flushed >= 1000:
            break
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert flushed >= 1000
    cfg = NvmeTierConfig(path=str(tmp_path), capacity_bytes=32 * MiB, max_value_bytes=64 * KiB,
                         segment_bytes=1 * MiB, write_buffer_bytes=64 * KiB)
    with NvmeTier(cfg) as tier:
        for i in range(flushed):
            assert tier.get(make_key(i)) == make_value(i, 1 + i * 7919 % 20000), i
        for i in range(flushed, flushed + 5000):
            got = tier.get(make_key(i))
            assert got is None or got == make_value(i, 1 + i * 7919 % 20000)


# -- the model -----------------------------------------------------------------------------------

NUM_KEYS = 10
OPS = st.lists(st.one_of(
    st.tuples(st.sampled_from(["put", "churn"]), st.integers(0, NUM_KEYS - 1),
              st.sampled_from([0, 1, 3000, 9000, 16 * KiB])),
    st.tuples(st.just("evict"), st.integers(0, NUM_KEYS - 1), st.just(0)),
    st.tuples(st.just("delete"), st.integers(0, NUM_KEYS - 1), st.just(0)),
    st.tuples(st.just("flush"), st.just(0), st.just(0)),
    st.tuples(st.just("reopen"), st.just(0), st.just(0)),
), min_size=10, max_size=100)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS)
def test_matches_a_dict_model(ops):
    """Live values are exact; an evicted key may come back at reopen, but only with its
    last value; a deleted key never does; the files stay within capacity."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        cfg = NvmeTierConfig(path=tmp, capacity_bytes=256 * KiB, max_value_bytes=16 * KiB,
                             segment_bytes=64 * KiB, write_buffer_bytes=8 * KiB)
        live: dict[bytes, bytes] = {}
        ghosts: dict[bytes, bytes] = {}  # evicted: may come back with exactly this value
        tier = NvmeTier(cfg)
        compactions = 0
        try:
            for step, (op, k, nbytes) in enumerate(ops):
                key = make_key(k)
                if op in ("put", "churn"):  # churn: overwrite a few times (dead bytes)
                    for i in range(6 if op == "churn" else 1):
                        value = make_value((step, k, i), nbytes)
                        source: object = value
                        if (step + i) % 2:  # page-aligned, as O_DIRECT could write it
                            source = aligned_array(nbytes)
                            source[:] = np.frombuffer(value, dtype=np.uint8)
                        stored = tier.put(key, source)
                        if source is not value:
                            source[:] = 0xFF  # the caller reuses its memory at once
                        if stored:
                            live[key] = value
                            ghosts.pop(key, None)
                        else:
                            assert (tier.used_bytes + tier.footprint_bytes(nbytes)
                                    > tier.capacity_bytes)
                elif op == "evict":
                    assert tier.evict(key) == (key in live)
                    if key in live:
                        ghosts[key] = live.pop(key)
                elif op == "delete":
                    assert tier.delete(key) == (key in live)
                    live.pop(key, None)
                    ghosts.pop(key, None)
                elif op == "flush":
                    tier.flush()
                else:
                    compactions += tier.stats()["compactions"]
                    tier.close()
                    tier = NvmeTier(cfg)
                    dropped = tier.stats()["records_dropped_at_open"]
                    for i in range(NUM_KEYS):
                        key = make_key(i)
                        got = tier.get(key)
                        if got is None:
                            if key in live:
                                assert dropped, "a live value was lost at reopen"
                                ghosts[key] = live.pop(key)
                        else:
                            assert got == live.get(key, ghosts.get(key)), "a wrong value"
                            live[key] = got
                            ghosts.pop(key, None)
                for i in range(NUM_KEYS):
                    key = make_key(i)
                    assert tier.get(key) == live.get(key)
                assert tier.used_bytes <= tier.capacity_bytes
                assert disk_bytes(path) <= cfg.capacity_bytes
            compactions += tier.stats()["compactions"]
            event(f"compactions: {min(compactions, 5)}")
            target(float(compactions))  # steer the search towards compaction
        finally:
            tier.close()

"""The contract every tier passes: HBM, DRAM and NVMe store, read and forget alike."""

from __future__ import annotations

import numpy as np
import pytest

from kvstore.errors import BufferSizeError, InvalidKeyError
from tests.conftest import make_key, make_value

MiB = 1024 * 1024
MAX_VALUE = 1 * MiB


def _dram(tmp_path):
    from kvstore.tiers.dram import dram_tier

    return dram_tier(8 * MiB, MAX_VALUE)


def _nvme(tmp_path):
    from kvstore.tiers.nvme import NvmeTier, NvmeTierConfig

    return NvmeTier(NvmeTierConfig(path=str(tmp_path / "nvme"), capacity_bytes=16 * MiB,
                                   max_value_bytes=MAX_VALUE, segment_bytes=2 * MiB))


def _hbm(tmp_path):
    from kvstore.tiers.hbm import hbm_tier

    return hbm_tier(8 * MiB, MAX_VALUE, "cuda")


@pytest.fixture(params=[
    pytest.param(_dram, id="dram"),
    pytest.param(_nvme, id="nvme"),
    pytest.param(_hbm, id="hbm", marks=pytest.mark.gpu),
])
def tier(request, tmp_path):
    tier = request.param(tmp_path)
    yield tier
    tier.close()


SIZES = [0, 1, 63, 4096, 4097, 256 * 1024, MAX_VALUE]


@pytest.mark.parametrize("nbytes", SIZES)
def test_round_trip(tier, nbytes):
    key, value = make_key(nbytes), make_value(nbytes, nbytes)
    assert tier.put(key, value)
    assert key in tier and len(tier) == 1
    assert tier.nbytes_of(key) == nbytes
    assert tier.get(key) == value
    out = bytearray(nbytes)
    assert tier.read_into(key, out)
    assert bytes(out) == value


def test_missing_key_is_a_miss(tier):
    key = make_key("absent")
    assert tier.get(key) is None
    assert not tier.read_into(key, bytearray(4))
    assert tier.nbytes_of(key) is None
    assert key not in tier
    assert not tier.evict(key) and not tier.delete(key)


def test_overwrite_replaces_value(tier):
    key = make_key("k")
    assert tier.put(key, make_value(1, 5000))
    assert tier.put(key, make_value(2, 300))
    assert tier.get(key) == make_value(2, 300)
    assert len(tier) == 1


def test_evict_and_delete_forget(tier):
    a, b = make_key("a"), make_key("b")
    tier.put(a, b"x" * 100)
    tier.put(b, b"y" * 100)
    assert tier.evict(a) and tier.delete(b)
    assert tier.get(a) is None and tier.get(b) is None and len(tier) == 0


def test_numpy_and_tensor_values(tier):
    import torch

    array = np.arange(1000, dtype=np.float32)
    tensor = torch.arange(500, dtype=torch.bfloat16)
    assert tier.put(make_key("np"), array)
    assert tier.put(make_key("t"), tensor)
    assert tier.get(make_key("np")) == array.tobytes()
    assert tier.get(make_key("t")) == tensor.view(torch.int16).numpy().tobytes()
    out = torch.empty(500, dtype=torch.bfloat16)
    assert tier.read_into(make_key("t"), out)
    assert torch.equal(out, tensor)


def test_capacity_is_a_hard_bound(tier):
    stored = []
    for i in range(200):
        if not tier.put(make_key(i), make_value(i, 256 * 1024)):
            break
        stored.append(i)
        assert tier.used_bytes <= tier.capacity_bytes
    assert stored and len(stored) < 200, "a full tier must refuse, not overcommit"
    assert tier.used_bytes <= tier.capacity_bytes
    for i in stored:
        assert tier.get(make_key(i)) == make_value(i, 256 * 1024)


def test_space_is_reused_after_eviction(tier):
    for round_ in range(3):
        keys = []
        for i in range(200):
            key = make_key((round_, i))
            if not tier.put(key, make_value((round_, i), 256 * 1024)):
                break
            keys.append(key)
        assert len(keys) >= 4
        for key in keys:
            assert tier.evict(key)
    assert len(tier) == 0


def test_bad_key_is_refused(tier):
    with pytest.raises(InvalidKeyError):
        tier.put(b"short", b"v")
    assert len(tier) == 0


def test_read_into_wrong_size_raises(tier):
    tier.put(make_key("k"), b"v" * 10)
    with pytest.raises((BufferSizeError, ValueError)):
        tier.read_into(make_key("k"), bytearray(11))


def test_read_exact_fills_a_checked_buffer_or_misses(tier):
    value = make_value("x", 8192)
    tier.put(make_key("x"), value)
    out = np.zeros(8192, dtype=np.uint8)
    assert tier.read_exact(make_key("x"), out) and out.tobytes() == value
    other = np.zeros(4096, dtype=np.uint8)  # another size: the value changed, a miss
    assert not tier.read_exact(make_key("x"), other) and not other.any()
    assert not tier.read_exact(make_key("absent"), out)
    assert tier.get(make_key("x")) == value


def test_flush_keeps_values(tier):
    tier.put(make_key("f"), make_value("f", 3000))
    tier.flush()
    assert tier.get(make_key("f")) == make_value("f", 3000)


def test_read_bytes_is_get_for_a_checked_key(tier):
    value = make_value("y", 4096)
    tier.put(make_key("y"), value)
    assert tier.read_bytes(make_key("y")) == value == tier.get(make_key("y"))
    assert tier.read_bytes(make_key("absent")) is None

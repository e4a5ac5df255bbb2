"""CUDA paths: the HBM tier, pinned DRAM, and copies between tensors on the GPU and tiers.

Skipped without CUDA; run on the GPU machine (see README, "GPU tests").
"""

from __future__ import annotations

import pytest
import torch

from kvstore import Store, StoreConfig
from tests.conftest import make_key

pytestmark = pytest.mark.gpu
MiB = 1024 * 1024


def test_dram_pool_is_pinned_with_cuda():
    with Store(StoreConfig(dram_bytes=8 * MiB, max_value_bytes=1 * MiB)) as store:
        assert store.stats()["tiers"]["dram"]["pinned"] is True


def test_cuda_tensor_round_trip_through_hbm():
    config = StoreConfig(hbm_bytes=8 * MiB, dram_bytes=8 * MiB, max_value_bytes=1 * MiB)
    with Store(config) as store:
        tensor = torch.randn(16, 8, 128, device="cuda").to(torch.bfloat16)
        key = make_key("g")
        assert store.put(key, tensor)
        assert store.tier_of(key) == "hbm"
        out = torch.empty_like(tensor)
        assert store.get_into(key, out)
        assert torch.equal(out, tensor)
        assert store.get(key) == tensor.view(torch.int16).cpu().numpy().tobytes()
        host_out = torch.empty(tensor.shape, dtype=tensor.dtype)
        assert store.get_into(key, host_out)
        assert torch.equal(host_out, tensor.cpu())


def test_hbm_demotes_to_dram_and_nvme_and_promotes_back(tmp_path):
    config = StoreConfig(hbm_bytes=4 * MiB, dram_bytes=4 * MiB, max_value_bytes=1 * MiB,
                         nvme_path=str(tmp_path / "nvme"), nvme_bytes=64 * MiB,
                         nvme_segment_bytes=4 * MiB)
    tensors = [torch.full((MiB // 2,), i, dtype=torch.int16, device="cuda") for i in range(12)]
    keys = [make_key(i) for i in range(12)]
    with Store(config) as store:
        assert store.put_many(keys, tensors) == 12
        tiers = [store.tier_of(k) for k in keys]
        assert tiers.count("hbm") == 4 and tiers.count("dram") == 4
        assert tiers.count("nvme") == 4
        out = torch.empty_like(tensors[0])
        for key, tensor in zip(keys, tensors, strict=True):
            assert store.get_into(key, out)
            assert torch.equal(out, tensor)
        assert store.stats()["promotions"] > 0
        for tier in store.stats()["tiers"].values():
            assert tier["used_bytes"] <= tier["capacity_bytes"]
    with Store(config) as store:  # everything was flushed on close
        for key, tensor in zip(keys, tensors, strict=True):
            assert store.get(key) == tensor.cpu().numpy().tobytes()


def test_cuda_tensor_into_dram_only_store():
    with Store(StoreConfig(dram_bytes=8 * MiB, max_value_bytes=1 * MiB)) as store:
        tensor = torch.arange(1000, device="cuda", dtype=torch.float32)
        assert store.put(make_key("d"), tensor)
        assert store.tier_of(make_key("d")) == "dram"
        out = torch.zeros_like(tensor)
        assert store.get_into(make_key("d"), out)
        assert torch.equal(out, tensor)


@pytest.mark.parametrize("corrupt", [None, 5])
def test_get_many_into_gpu_tensors_from_nvme_is_pipelined_and_exact(tmp_path, corrupt):
    """Blocks only on NVMe read into GPU tensors through the reader thread and two pinned
    buffers: every value arrives exact; a block that fails its checksum ends the run there
    (the blocks after it are not copied), and a DRAM block after NVMe ones still comes."""
    config = StoreConfig(dram_bytes=0, nvme_path=str(tmp_path / "nvme"), nvme_bytes=64 * MiB,
                         max_value_bytes=1 * MiB, promote_on_hit=False)
    values = [torch.randint(0, 256, (MiB,), dtype=torch.uint8) for _ in range(9)]
    keys = [make_key(f"n{i}") for i in range(9)]
    with Store(config) as store:
        assert store.put_many(keys, values) == 9
        store.flush()
        if corrupt is not None:
            from tests.engines.conftest import flip_on_disk
            flip_on_disk(tmp_path / "nvme", values[corrupt].numpy().tobytes())
        outs = [torch.zeros(MiB, dtype=torch.uint8, device="cuda") for _ in range(9)]
        got = store.get_many_into(keys, outs)
        assert got == (9 if corrupt is None else corrupt)
        for i in range(9):
            assert torch.equal(outs[i].cpu(), values[i]) == (i < got)
        assert store.stats()["checksum_failures"] == (0 if corrupt is None else 1)
    with Store(StoreConfig(dram_bytes=4 * MiB, nvme_path=str(tmp_path / "mixed"),
                           nvme_bytes=64 * MiB, max_value_bytes=1 * MiB,
                           promote_on_hit=False)) as store:
        assert store.put_many(keys, values) == 9  # the first ones go down to NVMe
        store.flush()
        tiers = [store.tier_of(k) for k in keys]
        assert "nvme" in tiers and "dram" in tiers
        outs = [torch.zeros(MiB, dtype=torch.uint8, device="cuda") for _ in range(9)]
        assert store.get_many_into(keys, outs) == 9
        assert all(torch.equal(o.cpu(), v) for o, v in zip(outs, values, strict=True))

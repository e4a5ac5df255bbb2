"""CUDA through the daemon's shared pool: the pool is page-locked on both sides, so a GPU
copies a tensor straight into it and back out (run on the GPU machine)."""

from __future__ import annotations

import pytest

import kvstore

pytestmark = pytest.mark.gpu
MiB = 1024 * 1024


def test_cuda_tensors_through_the_registered_shared_pool(start_daemon):
    import torch

    daemon = start_daemon("--dram", "256MiB", "--max-value", "8MiB")
    client = kvstore.connect(daemon.url)
    session = client._idle[0].session
    assert session.pool is not None and session.is_pool_registered
    assert client.stats()["tiers"]["dram"]["pinned"] is True  # the daemon registered it too
    keys = kvstore.prefix_hashes(list(range(16 * 6)), block_tokens=16, namespace="gpu")
    values = [torch.randn(2 * MiB, device="cuda").to(torch.float16) for _ in range(6)]
    assert client.put_many(keys, values) == 6
    assert client.put(keys[0], values[0]) is True
    outs = [torch.empty_like(v) for v in values]
    for key, out in zip(keys, outs, strict=True):
        assert client.get_into(key, out) is True
    assert all(torch.equal(a, b) for a, b in zip(values, outs, strict=True))
    # bytes back on the host match the tensor's bytes
    assert client.get(keys[3]) == values[3].cpu().numpy().tobytes()
    client.close()

"""The fetch planner over a daemon's client (`engines.cost_model.planner_for`): each tier's
cost measured in a real kvstored's own tiers through the client, the tiers of a request's
blocks asked over the wire (`tier_bits`), and a prefix on the daemon's NVMe recomputed once
its disk is made slow for real (a block-I/O cgroup capping the daemon's reads); the tokens
equal a plain recompute's either way."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import kvstore
from engines.cost_model import CostModel, planner_for
from engines.decode import DecodeEngine
from engines.prefill import PrefillEngine
from engines.presets import load_model
from engines.sampling import SamplingParams
from tests.daemon.conftest import start_daemon  # noqa: F401 (a fixture)

BLOCK = 16
DRAM, NVME = 2, 4
SLOW_READ_BYTES_S = 256 * 1024  # a 32 KiB block of the tiny model: ~128 ms from the disk


@pytest.fixture(scope="module")
def model():
    return load_model("tiny", device="cpu", dtype=torch.float32).model


@pytest.fixture
def daemon(tmp_path, start_daemon):  # noqa: F811
    return start_daemon("--dram", "16MiB", "--nvme-path", str(tmp_path / "nvme"), "--nvme",
                        "64MiB", "--max-value", "1MiB")


def compute_cost(per_token_s: float) -> CostModel:
    return CostModel(prefill_fixed_s=0.0, prefill_per_token_s=per_token_s,
                     prefill_per_token_ctx_s=0.0, fetch_fixed_s=0.0, fetch_per_block_s=0.0,
                     publish_fixed_s=0.0, publish_per_block_s=0.0, decode_step_s=0.0)


def prompt_of(n: int, seed: int) -> list[int]:
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def onto_nvme(client: kvstore.Client, keys: list[bytes]) -> None:
    """The blocks of ``keys`` on the daemon's disk only (a fetch promotes them to DRAM)."""
    values = client.get_many(keys)
    assert None not in values
    assert client.put_in_tier("nvme", keys, values) == len(keys)
    assert client.tier_bits(keys) == [NVME] * len(keys)


def test_a_planner_over_a_daemon_measures_its_tiers_through_the_client(model, daemon
                                                                       ) -> None:
    """Both of the daemon's tiers measured (the disk's blocks come over the socket, the
    DRAM ones through the shared pool: the disk costs more), the scratch blocks gone
    after; a prefix in DRAM is loaded whole, one on the disk is loaded when computing
    costs more (a token at 10 ms)."""
    prompt = prompt_of(200, seed=11)
    with kvstore.connect(daemon.url) as client, \
            PrefillEngine(model, client, num_pages=64) as engine:
        planner = planner_for(engine.io, compute_cost(0.01))
        assert planner is not None
        costs = planner.tiers.tiers
        assert set(costs) == {"dram", "nvme"}
        assert all(c.per_block_s > 0 for c in costs.values())
        assert costs["nvme"].load_s(8) > costs["dram"].load_s(8), costs
        tiers = client.stats()["tiers"]
        assert tiers["dram"]["blocks"] == tiers["nvme"]["blocks"] == 0  # scratch deleted
        cold = engine.prefill(prompt)
        keys = engine.io.keys(prompt)[:12]
        assert client.tier_bits(keys) == [DRAM] * 12
        engine.planner = planner
        from_dram = engine.prefill(prompt)
        onto_nvme(client, keys)
        from_disk = engine.prefill(prompt)
    for result in (from_dram, from_disk):
        assert result.plan is not None and result.plan.loads_everything, result.plan
        assert result.num_cached_tokens == 12 * BLOCK
        assert result.first_token == cold.first_token
    assert from_dram.plan.loaded_per_tier == {"dram": 12}
    assert from_disk.plan.loaded_per_tier == {"nvme": 12}


def skip_without_direct_io(client: kvstore.Client) -> None:
    if not client.stats()["tiers"]["nvme"]["direct_io"]:
        pytest.skip("the NVMe tier reads through the page cache here: a cap on the disk "
                    "would not slow it")


@contextlib.contextmanager
def slow_reads(pid: int, path: Path, bytes_per_s: int) -> Iterator[None]:
    """Process ``pid``'s reads from ``path``'s disk capped at ``bytes_per_s`` while inside:
    a block-I/O cgroup (v1 blkio, or v2 io.max) it is moved into and out of again. Skips
    where that cannot be done (not root, no such controller, no block device)."""
    dev = os.stat(path).st_dev
    node = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    if (node / "partition").exists():  # a cap is set on the whole disk
        node = node.resolve().parent
    if os.geteuid() != 0 or not (node / "dev").exists():
        pytest.skip(f"cannot cap reads from {path} (root and a block device needed)")
    disk = (node / "dev").read_text().strip()
    v1 = Path("/sys/fs/cgroup/blkio")
    if (v1 / "blkio.throttle.read_bps_device").exists():
        root, limit, line = v1, "blkio.throttle.read_bps_device", f"{disk} {bytes_per_s}"
    elif "io" in (Path("/sys/fs/cgroup") / "cgroup.controllers").read_text().split():
        root, limit, line = Path("/sys/fs/cgroup"), "io.max", f"{disk} rbps={bytes_per_s}"
        with open(root / "cgroup.subtree_control", "a") as f:
            f.write("+io")
    else:
        pytest.skip("no block-I/O cgroup controller to cap a disk's reads with")
    group = root / f"kvstore-slow-disk-{os.getpid()}"
    group.mkdir()
    try:
        (group / limit).write_text(line)
        (group / "cgroup.procs").write_text(str(pid))
        try:
            yield
        finally:
            (root / "cgroup.procs").write_text(str(pid))
    finally:
        group.rmdir()


def test_a_prefix_on_a_daemons_slow_disk_is_recomputed_not_loaded(model, daemon, tmp_path
                                                                   ) -> None:
    """A decode engine over the daemon's client, a token costing 1 ms to compute: the
    prefix on the daemon's disk is loaded while the disk reads at its speed (a block in
    about a ms), and recomputed once the daemon's reads are capped at 256 KB/s and the
    planner measures the disk again (a block: over 100 ms); the reply equals the
    reference both times."""
    prompt = prompt_of(200, seed=12)
    sampling = SamplingParams(max_new_tokens=6)
    reference = model.generate(prompt, sampling=sampling)
    cost = compute_cost(0.001)
    with kvstore.connect(daemon.url) as client:
        skip_without_direct_io(client)
        with PrefillEngine(model, client, num_pages=64) as prefill:
            prefill.prefill(prompt)
            keys = prefill.io.keys(prompt)[:12]
        cached_tokens = {}
        for disk in ("fast", "slow"):
            capped = (slow_reads(daemon.proc.pid, tmp_path, SLOW_READ_BYTES_S)
                      if disk == "slow" else contextlib.nullcontext())
            with capped, DecodeEngine(model, client, num_pages=64) as decode:
                decode.planner = planner = planner_for(decode.io, cost)
                assert planner is not None
                onto_nvme(client, keys)
                request = decode.add_request(prompt, sampling)
                while decode.has_work:
                    decode.step()
            cached_tokens[disk] = request.num_cached_tokens
            assert request.output == reference, disk
            nvme = planner.tiers.tiers["nvme"]
            assert (nvme.per_block_s < BLOCK * cost.prefill_per_token_s) == (disk == "fast")
    assert cached_tokens == {"fast": 12 * BLOCK, "slow": 0}


def test_a_planned_load_from_a_disk_that_slowed_down_is_cut_and_the_rest_computed(
        model, daemon, tmp_path) -> None:
    """The planner measures the daemon's disk while it is fast (a block in about a ms,
    against 16 ms to compute one), so its plan loads the prefix from disk; then the
    daemon's reads are capped at 256 KB/s (a block: about 128 ms) before the prefill
    runs. The load is cut after its first chunk (the rest would take over a second,
    computing it 160 ms), the rest is computed, and the first token equals a plain
    recompute's."""
    prompt = prompt_of(200, seed=13)
    cost = compute_cost(0.001)
    with kvstore.connect(daemon.url) as client:
        skip_without_direct_io(client)
        with PrefillEngine(model, client, num_pages=64) as prefill:
            cold = prefill.prefill(prompt)
            keys = prefill.io.keys(prompt)[:12]
            prefill.planner = planner = planner_for(prefill.io, cost)
            assert planner is not None
            assert planner.tiers.tiers["nvme"].per_block_s < BLOCK * cost.prefill_per_token_s
            onto_nvme(client, keys)
            with slow_reads(daemon.proc.pid, tmp_path, SLOW_READ_BYTES_S):
                result = prefill.prefill(prompt, publish=False)
    assert result.plan is not None and result.plan.loaded_per_tier.get("nvme", 0) >= 8, \
        result.plan
    stats = planner.stats()
    assert stats["cut_loads"] == 1, stats
    assert result.num_cached_tokens < result.plan.loaded_blocks * BLOCK
    assert stats["cut_blocks"] == result.plan.loaded_blocks - result.num_cached_tokens // BLOCK
    assert result.first_token == cold.first_token

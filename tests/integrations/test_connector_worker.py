"""`ConnectorWorker`, the vLLM connector's worker side, driven as vLLM's model runner
drives the connector (``register_kv_caches``; per step ``start_load_kv``, per layer
``wait_for_layer_load`` then ``save_kv_layer``, ``wait_for_save``,
``get_block_ids_with_load_errors``), against real stores: `kvstore.Store` on DRAM, on NVMe
only (real files) and, on a GPU, on HBM; a kvstored through its client (on a GPU, blocks
read in place from its page-locked pool). No vLLM is needed, so the GPU runs (marker
``gpu``) take CUDA caches in every layout of vLLM 0.32 where vLLM is not installed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import kvstore
from kvstore.integrations import connector_worker
from kvstore.integrations.connector_worker import ConnectorWorker, RankedTransfer
from kvstore.integrations.pages import KVViewCodec, PageLayout
from tests.daemon.conftest import start_daemon  # noqa: F401 (a fixture)
from tests.engines.conftest import flip_on_disk
from tests.engines.test_fetch_plan_daemon import onto_nvme, skip_without_direct_io, slow_reads
from tests.integrations.test_pages import (
    HS,
    LAYERS,
    PHYSICAL_ORDERS,
    VIEW_BLOCKS,
    VIEW_HEADS,
    VIEW_TOKENS,
    fill,
    kv_of,
    logical_views,
)

CODEC = KVViewCodec(num_kv_heads=VIEW_HEADS, block_tokens=VIEW_TOKENS, head_dim=HS)
NAMES = [f"layers.{i}.attn" for i in range(LAYERS)]
SAVED_FROM, LOADED_INTO = [5, 2, 0, 3], [1, 4, 2, 5]


class Source:
    """The store source a `StoreHandle` is, over one real store: it records failures."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.failures: list[BaseException] = []

    def get(self) -> Any:
        return self.store

    def failed(self, error: BaseException) -> None:
        self.failures.append(error)


def chain(n: int, salt: int = 0) -> list[bytes]:
    return kvstore.prefix_hashes([salt, *range(n * VIEW_TOKENS - 1)],
                                 block_tokens=VIEW_TOKENS, namespace="worker-test")


def step(worker: ConnectorWorker, loads: list[RankedTransfer] | None = None,
         saves: list[RankedTransfer] | None = None) -> set[int]:
    """One step of vLLM's model runner, as it calls the connector."""
    worker.start_load_kv(loads or [])
    for name in NAMES:
        worker.wait_for_layer_load(name)
        worker.save_kv_layer(name, saves or [])  # (after the layer's attention)
    worker.wait_for_save()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return worker.get_block_ids_with_load_errors()


def instance(store: Any, layout: str, device: str, seed: int | None) -> tuple[
        ConnectorWorker, dict[str, torch.Tensor], list[str]]:
    """A worker over caches in ``layout`` on ``device`` (random when ``seed``, else 0)."""
    views = logical_views(PHYSICAL_ORDERS[layout], device=device)
    if seed is not None:
        fill(views, seed)
    counts: list[str] = []
    worker = ConnectorWorker(Source(store), CODEC,
                             count=lambda **n: counts.extend(k for k, v in n.items() if v))
    worker.register_kv_caches(views, VIEW_BLOCKS)
    return worker, views, counts


def same_blocks(a: dict[str, torch.Tensor], a_ids: list[int], b: dict[str, torch.Tensor],
                b_ids: list[int]) -> bool:
    """Whether every layer's K and V of ``a``'s blocks equal ``b``'s, bit for bit."""
    for name in NAMES:
        for i, j in zip(a_ids, b_ids, strict=True):
            for x, y in zip(kv_of(a[name].cpu(), i, 1), kv_of(b[name].cpu(), j, 1),
                            strict=True):
                if not torch.equal(x.view(torch.int16), y.view(torch.int16)):
                    return False
    return True


def open_store(tier: str, tmp_path: Path) -> Any:
    if tier == "dram":
        return kvstore.Store(kvstore.StoreConfig(dram_bytes=32 << 20))
    if tier == "nvme":
        return kvstore.Store(kvstore.StoreConfig(dram_bytes=0, nvme_path=str(tmp_path / "nvme"),
                                                 nvme_bytes=64 << 20))
    return kvstore.Store(kvstore.StoreConfig(dram_bytes=0, hbm_bytes=32 << 20))


def devices() -> list[Any]:
    return ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def needs(device: str, tier: str = "dram") -> None:
    if (device == "cuda" or tier == "hbm") and not torch.cuda.is_available():
        pytest.skip("needs CUDA (run on the GPU machine)")


@pytest.mark.parametrize("tier", ["dram", "nvme", pytest.param("hbm", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("device", devices())
def test_blocks_saved_by_one_instance_load_into_another_s_pages_bit_for_bit(
        tier: str, device: str, tmp_path: Path) -> None:
    """Saved from one instance's pages (layout LBNHC), loaded into another's (every other
    layout on a GPU; two on the CPU) at other block ids: the same K and V."""
    needs(device, tier)
    keys = chain(4)
    layouts = sorted(PHYSICAL_ORDERS) if device == "cuda" else ["BLHNC", "LBHNC"]
    with open_store(tier, tmp_path) as store:
        saver, saved, counts = instance(store, "LBNHC", device, seed=1)
        assert step(saver, saves=[RankedTransfer("r", [keys], SAVED_FROM)]) == set()
        assert counts == ["blocks_saved"] and store.match_prefix(keys) == 4
        for layout in layouts:
            loader, loaded, counts = instance(store, layout, device, seed=None)
            assert step(loader, loads=[RankedTransfer("r", [keys], LOADED_INTO)]) == set()
            assert counts == ["blocks_loaded"]
            assert same_blocks(saved, SAVED_FROM, loaded, LOADED_INTO), layout
            untouched = [b for b in range(VIEW_BLOCKS) if b not in LOADED_INTO]
            assert all(not v.cpu()[untouched].any() for v in loaded.values())
            loader.shutdown()
        saver.shutdown()


@pytest.mark.parametrize("device", devices())
def test_a_corrupt_block_on_disk_is_a_load_error_and_never_reaches_the_pages(
        device: str, tmp_path: Path) -> None:
    """A block whose record on disk was damaged under the open store (still indexed, its
    bytes read back and their checksum failing): reported with every block after it, and
    none of their pages written; the blocks before it load whole."""
    needs(device)
    keys = chain(4, salt=7)
    with open_store("nvme", tmp_path) as store:
        saver, saved, _ = instance(store, "LBNHC", device, seed=2)
        step(saver, saves=[RankedTransfer("r", [keys], SAVED_FROM)])
        # More blocks after it, so that its record is not in the segment's last page,
        # which the tier may still serve from memory (a read found no damage there).
        step(saver, saves=[RankedTransfer("s", [chain(6, salt=8)], list(range(6)))])
        saver.shutdown()
        on_host = PageLayout({n: v.cpu() for n, v in saved.items()}, CODEC,
                             num_blocks=VIEW_BLOCKS)
        rows = on_host.staging(1)  # the damaged block as stored
        for layer in range(LAYERS):
            on_host.gather_layer(layer, [SAVED_FROM[2]], rows)
        store.flush()
        flip_on_disk(tmp_path / "nvme", rows[0].numpy().tobytes())
        assert store.match_prefix(keys) == 4  # still indexed: the read must catch it
        loader, loaded, counts = instance(store, "BLHNC", device, seed=None)
        errors = step(loader, loads=[RankedTransfer("r", [keys], LOADED_INTO)])
        assert errors == set(LOADED_INTO[2:])
        assert "load_failures" in counts and store.stats()["checksum_failures"] == 1
        assert not loader.store.failures  # a bad value, not a failed store
        assert same_blocks(saved, SAVED_FROM[:2], loaded, LOADED_INTO[:2])
        assert all(not v.cpu()[LOADED_INTO[2:]].any() for v in loaded.values())
        loader.shutdown()


@pytest.mark.parametrize("device", devices())
def test_a_step_whose_load_failed_stores_nothing(device: str, tmp_path: Path) -> None:
    """A block the store never had: a load error for it and the rest of its chain, and
    the step's saves are dropped (its forward may have read those pages)."""
    needs(device)
    stored, missing, new = chain(2, salt=3), chain(3, salt=4), chain(2, salt=5)
    with open_store("dram", tmp_path) as store:
        worker, _, counts = instance(store, "LBNHC", device, seed=3)
        step(worker, saves=[RankedTransfer("a", [stored], [0, 1])])
        errors = step(worker, loads=[RankedTransfer("b", [missing], [2, 3, 4])],
                      saves=[RankedTransfer("c", [new], [0, 1])])
        assert errors == {2, 3, 4}
        assert store.match_prefix(new) == 0 and "save_failures" in counts
        # The next step, whose loads are whole, stores again.
        assert step(worker, loads=[RankedTransfer("d", [stored], [4, 5])],
                    saves=[RankedTransfer("c", [new], [0, 1])]) == set()
        assert store.match_prefix(new) == 2
        worker.shutdown()


def test_a_failed_load_asked_for_before_wait_for_save_still_stores_nothing(
        tmp_path: Path) -> None:
    """With speculative decoding vLLM asks for the failed blocks before `wait_for_save`:
    the step's saves are dropped all the same (their KV may have read those pages)."""
    missing, new = chain(2, salt=11), chain(2, salt=12)
    with open_store("dram", tmp_path) as store:
        worker, _, counts = instance(store, "LBNHC", "cpu", seed=5)
        worker.start_load_kv([RankedTransfer("b", [missing], [2, 3])])
        for name in NAMES:
            worker.wait_for_layer_load(name)
            worker.save_kv_layer(name, [RankedTransfer("c", [new], [0, 1])])
        assert worker.get_block_ids_with_load_errors() == {2, 3}
        worker.wait_for_save()
        assert store.match_prefix(new) == 0 and "save_failures" in counts
        assert worker.get_block_ids_with_load_errors() == set()
        assert step(worker, saves=[RankedTransfer("c", [new], [0, 1])]) == set()
        assert store.match_prefix(new) == 2  # the next step stores again
        worker.shutdown()


class Down(Source):
    """A store source whose store is down (as `StoreHandle.get` says after a failure)."""

    def get(self) -> None:
        return None


def test_a_store_that_is_down_fails_the_loads_and_the_saves_of_the_step() -> None:
    counts: list[str] = []
    worker = ConnectorWorker(Down(None), CODEC,
                             count=lambda **n: counts.extend(k for k, v in n.items() if v))
    views = logical_views(PHYSICAL_ORDERS["LBNHC"])
    fill(views, 5)
    worker.register_kv_caches(views, VIEW_BLOCKS)
    before = {n: v.clone() for n, v in views.items()}
    assert step(worker, loads=[RankedTransfer("a", [chain(2, salt=9)], [1, 2])],
                saves=[RankedTransfer("b", [chain(2, salt=10)], [3, 4])]) == {1, 2}
    assert "load_failures" in counts and "save_failures" in counts
    assert all(torch.equal(views[n], before[n]) for n in views)  # no page written
    worker.shutdown()


def test_a_step_whose_layers_were_not_all_saved_stores_nothing(tmp_path: Path) -> None:
    """vLLM skipped ``save_kv_layer`` for a layer: the staging rows lack it, so nothing of
    the step is stored."""
    keys = chain(2, salt=11)
    with open_store("dram", tmp_path) as store:
        worker, _, counts = instance(store, "LBNHC", "cpu", seed=6)
        saves = [RankedTransfer("a", [keys], [0, 1])]
        worker.start_load_kv([])
        for name in NAMES[:-1]:  # the last layer's save never comes
            worker.wait_for_layer_load(name)
            worker.save_kv_layer(name, saves)
        worker.wait_for_save()
        assert store.match_prefix(keys) == 0 and counts == ["save_failures"]
        worker.shutdown()


def test_each_tensor_parallel_rank_moves_its_own_shard_s_keys(tmp_path: Path) -> None:
    """The scheduler sends every rank's keys; the worker of rank 1 saves and loads under
    rank 1's only, never rank 0's."""
    rank0, rank1 = chain(2, salt=12), chain(2, salt=13)
    with open_store("dram", tmp_path) as store:
        saver = ConnectorWorker(Source(store), CODEC, rank=1)
        saved = logical_views(PHYSICAL_ORDERS["LBNHC"])
        fill(saved, 7)
        saver.register_kv_caches(saved, VIEW_BLOCKS)
        step(saver, saves=[RankedTransfer("a", [rank0, rank1], [0, 1])])
        assert store.match_prefix(rank1) == 2 and store.match_prefix(rank0) == 0
        loader = ConnectorWorker(Source(store), CODEC, rank=1)
        loaded = logical_views(PHYSICAL_ORDERS["BLHNC"])
        loader.register_kv_caches(loaded, VIEW_BLOCKS)
        assert step(loader, loads=[RankedTransfer("b", [rank0, rank1], [2, 3])]) == set()
        assert same_blocks(saved, [0, 1], loaded, [2, 3])
        saver.shutdown()
        loader.shutdown()


@pytest.mark.parametrize("from_device", [False, True])
@pytest.mark.parametrize("device", devices())
def test_blocks_in_a_daemon_s_pool_are_read_in_place_on_a_gpu(
        device: str, from_device: bool, start_daemon, monkeypatch) -> None:  # noqa: F811
    """Through a kvstored's client (as the connector runs): saved from one instance's
    pages, loaded into another's bit for bit. On a GPU the blocks lie in the daemon's
    page-locked pool, lent for the step (`Client.lend`), and the copy kernel reads them
    there (counted as loaded in place); on the CPU they come through staging rows. With
    ``from_device`` (`SAVES_FROM_DEVICE`) a GPU's saves go from the device rows by DMA
    straight into the pool's slots."""
    needs(device)
    monkeypatch.setattr(connector_worker, "SAVES_FROM_DEVICE", from_device)
    daemon = start_daemon("--dram", "32MiB", "--max-value", "1MiB")
    keys = chain(4, salt=7)
    layouts = sorted(PHYSICAL_ORDERS) if device == "cuda" else ["BLHNC"]
    with kvstore.connect(daemon.url) as store:
        saver, saved, counts = instance(store, "LBNHC", device, seed=3)
        assert step(saver, saves=[RankedTransfer("r", [keys], SAVED_FROM)]) == set()
        # (from the device: the gathered rows go by DMA straight into the pool's slots)
        assert counts == (["blocks_saved", "blocks_saved_from_device"]
                          if device == "cuda" and from_device else ["blocks_saved"])
        assert store.tier_bits(keys) == [2] * 4
        for layout in layouts:
            loader, loaded, counts = instance(store, layout, device, seed=None)
            assert step(loader, loads=[RankedTransfer("r", [keys], LOADED_INTO)]) == set()
            assert counts == (["blocks_loaded_in_place", "blocks_loaded"] if device == "cuda"
                              else ["blocks_loaded"]), layout
            assert same_blocks(saved, SAVED_FROM, loaded, LOADED_INTO), layout
            loader.shutdown()
        saver.shutdown()


@pytest.mark.gpu
def test_lent_and_staged_blocks_load_together_and_a_late_loan_fails_its_request(
        start_daemon, tmp_path: Path) -> None:  # noqa: F811
    """A request of 6 blocks: the first 2 in the daemon's pool (lent, read in place), the
    other 4 on its disk only (read into staging rows, by address too). On time, all 6
    land bit for bit. Then the daemon's disk reads are capped at 8 KB/s, so the staged
    blocks take seconds to come, and the lent ones are copied only after that, past
    their loan (the daemon's lease is 1 s: a loan is good for 0.5 s): every block of the
    request is a load error (vLLM recomputes them) and the step stores nothing."""
    needs("cuda")
    daemon = start_daemon("--dram", "32MiB", "--nvme-path", str(tmp_path / "nvme"),
                          "--nvme", "64MiB", "--max-value", "1MiB", "--lease", "1")
    keys, saved_from, loaded_into = chain(6, salt=8), [5, 4, 3, 2, 1, 0], list(range(6))
    with kvstore.connect(daemon.url) as store:
        skip_without_direct_io(store)
        saver, saved, _ = instance(store, "LBNHC", "cuda", seed=4)
        assert step(saver, saves=[RankedTransfer("r", [keys], saved_from)]) == set()
        onto_nvme(store, keys[2:])
        assert store.tier_bits(keys) == [2, 2, 4, 4, 4, 4]
        numbers: dict[str, int] = {}

        def count(**n: int) -> None:
            for name, value in n.items():
                numbers[name] = numbers.get(name, 0) + value

        loader = ConnectorWorker(Source(store), CODEC, count=count)
        loaded = logical_views(PHYSICAL_ORDERS["BLHNC"], device="cuda")
        loader.register_kv_caches(loaded, VIEW_BLOCKS)
        loads = [RankedTransfer("r", [keys], loaded_into)]
        assert step(loader, loads=loads) == set()
        assert numbers == {"blocks_loaded_in_place": 2, "blocks_loaded": 6}
        assert same_blocks(saved, saved_from, loaded, loaded_into)
        onto_nvme(store, keys[2:])  # (the load promoted them)
        numbers.clear()
        with slow_reads(daemon.proc.pid, tmp_path, 8192):
            errors = step(loader, loads=loads,
                          saves=[RankedTransfer("s", [chain(1, salt=9)], [0])])
        assert errors == set(loaded_into)
        assert numbers["load_failures"] == 6 and numbers["blocks_loaded_in_place"] == 2
        assert store.match_prefix(chain(1, salt=9)) == 0
        loader.shutdown()
        saver.shutdown()

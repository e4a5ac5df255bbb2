"""The worker side of `KVStoreConnector` (`kvstore.integrations.vllm`), apart from vLLM's
classes: it runs, and is tested, where vLLM is not installed (the GPU machine, whose
image has no vLLM), driven exactly as the connector drives it.

vLLM's model runner calls the connector, each step: ``bind_connector_metadata`` (the
scheduler's loads and saves), ``start_load_kv``, then per attention layer
``wait_for_layer_load`` before it and ``save_kv_layer`` after it, ``wait_for_save`` at the
step's end, and ``get_block_ids_with_load_errors``. The connector passes each call on to
`ConnectorWorker` with the step's transfers (`RankedTransfer`: every rank's keys; each
worker reads its own rank's).

    start_load_kv: an I/O thread fetches every block into staging rows, then writes the
      pages layer by layer (on a GPU: the copy kernel on a side stream, `LayerLoads`,
      reading the blocks a daemon's page-locked pool holds in place, lent for the step
      by `kvstore.Client.lend`: no host copy; the others from staging rows)
    wait_for_layer_load(i): layer i written (on a GPU: the compute stream waits for it)
    save_kv_layer(i): layer i's new pages gathered into staging rows (on a GPU: beside the
      caches, then to page-locked host rows on a side stream, `LayerSaves`: with CuPy a
      2-D DMA copy, no host sync; without it torch's copy of the column views; not with
      `SAVES_FROM_DEVICE`, see below)
    wait_for_save: the host rows complete, then put_many of the new blocks (on a GPU,
      with a daemon's pool page-locked here and `SAVES_FROM_DEVICE`: put_many of the
      gathered rows on the device, which the client copies by DMA straight into the slots
      it reserved in the pool, and commits once every copy landed: no host rows, no CPU
      copy)

A block that is missing, corrupt or unreadable is reported with every block after it
(`get_block_ids_with_load_errors`): vLLM recomputes them, and no page of a failed block is
ever written from the store. The one exception: blocks read in place whose copies may have
ended after their loan (a slot could have been reused meanwhile): their pages were written,
and every block of their request is reported failed. A step with a failed load stores
nothing, whenever vLLM asks for the failed blocks.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from kvstore.errors import ConfigError
from kvstore.integrations.gpu_loads import ALIGN, LayerLoads, LayerSaves
from kvstore.integrations.pages import (
    STORE_FAILURES,
    KVViewCodec,
    PageLayout,
    fetch_blocks,
    store_blocks,
)

log = logging.getLogger(__name__)
# Saves into a daemon whose pool is page-locked here go from the device rows by DMA straight
# into its slots (`_saves_to_pool`). Off until its GPU tests have run on a GPU (written
# 2026-12-07, when no GPU could be had); `connector_gpu_bench.py --saves-from-device`
# measures it, the in-place GPU test runs both ways.
SAVES_FROM_DEVICE = False


@dataclass
class BlockTransfer:
    """Blocks of one request on one TP rank: their keys (a chain, parent first) and vLLM
    block ids."""

    req_id: str
    keys: list[bytes]
    block_ids: list[int]


@dataclass
class RankedTransfer:
    """Blocks of one request, as the scheduler sends them to every rank: each rank's
    chain of keys (its shard's namespace), and the vLLM block ids (the same on all)."""

    req_id: str
    rank_keys: list[list[bytes]]
    block_ids: list[int]

    def on_rank(self, rank: int) -> BlockTransfer:
        return BlockTransfer(self.req_id, self.rank_keys[rank], self.block_ids)


class StoreSource(Protocol):
    """Where the worker gets its store (`kvstore.integrations.vllm_store.StoreHandle`):
    ``get()`` it (None: known to be down), and say when it ``failed``."""

    def get(self) -> Any | None: ...

    def failed(self, error: BaseException) -> None: ...


class ConnectorWorker:
    """One worker's loads and saves; see the module docstring. ``count(**n)`` is told the
    blocks moved and failed (the connector's stats)."""

    def __init__(self, store: StoreSource, codec: Any, *, rank: int = 0,
                 count: Callable[..., None] = lambda **n: None) -> None:
        self.store = store
        self.codec = codec
        self.rank = rank
        self._count = count
        self.pages: PageLayout | None = None
        self._gpu_loads: LayerLoads | None = None  # CUDA caches: copies on a side stream
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvstore-vllm")
        self._fetch: Future[None] | None = None
        self._layer_ready: list[threading.Event] = []
        self._gpu_saves: LayerSaves | None = None  # CUDA caches: to the host per layer
        # This step's saves: each transfer's rows the store reads (page-locked host rows
        # on a GPU; None where the device rows are put straight into a daemon's pool)
        # and, on a GPU, the rows beside the caches its layers are gathered into.
        self._save_staging: list[tuple[BlockTransfer, torch.Tensor | None,
                                       torch.Tensor | None]] = []
        self._gathered: set[int] = set()  # layers save_kv_layer gathered this step
        # Whether saves go from the device straight into the store's pool (`_saves_to_pool`:
        # asked at the first save, then after each step's put, not during a forward).
        self._to_pool: bool | None = None
        self._load_errors: set[int] = set()  # reported (and cleared) by vLLM's ask
        # Whether this step had a failed load: its saves are not stored, even when vLLM
        # asked for the failed blocks before `wait_for_save` (speculative decoding).
        self._step_failed = False
        # Blocks read in place from the store's page-locked pool this step (`Client.lend`):
        # the loans, held until the copies are done, and the block ids they cover.
        self._loans: contextlib.ExitStack | None = None
        self._lent: list[int] = []
        self._loans_valid_until = math.inf
        self._copies_done_at: float | None = None  # when the step's copies were seen done

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor],
                           num_blocks: int | None) -> None:
        """vLLM's caches (layer name -> its tensor); ``num_blocks``: the blocks its views
        hold (vLLM's KV cache config)."""
        shapes = {tuple(t.shape) for t in kv_caches.values()}
        if isinstance(self.codec, KVViewCodec):
            if num_blocks is None:
                raise ConfigError("KVStoreConnector: vLLM gave no KV cache config (the "
                                  "number of blocks its views hold)")
        elif num_blocks is not None and any(shape[0] != num_blocks for shape in shapes):
            raise ConfigError(f"KVStoreConnector handles KV caches with the blocks on dim 0 "
                              f"(vLLM's CPU backend), got shapes {sorted(shapes)} for "
                              f"{num_blocks} blocks")
        try:
            self.pages = PageLayout(kv_caches, self.codec, num_blocks=num_blocks)
        except ValueError as e:
            raise ConfigError(f"KVStoreConnector cannot store these KV caches: {e}") from e
        if self.pages.device.type == "cuda":
            self._gpu_saves = LayerSaves(self.pages)
            if isinstance(self.codec, KVViewCodec):
                self._gpu_loads = LayerLoads(self.pages)

    def start_load_kv(self, loads: list[RankedTransfer]) -> None:
        if not loads:
            return
        assert self.pages is not None
        self._finish_loads()  # (a step vLLM did not end with wait_for_save)
        self._layer_ready = [threading.Event() for _ in self.pages.layer_names]
        self._fetch = self._io.submit(self._load_all, [t.on_rank(self.rank) for t in loads],
                                      self._layer_ready)

    def _load_all(self, loads: list[BlockTransfer], layer_ready: list[threading.Event]) -> None:
        """On the I/O thread: fetch every block, then write the pages layer by layer,
        each layer signalled as soon as it is written (layer i's pages are written while
        vLLM computes the layers before it)."""
        assert self.pages is not None
        try:
            store = self.store.get()
            fetched = []
            self._loans = contextlib.ExitStack()
            lent_runs = self._lend(store, loads, self._loans)
            for load, staging, lent in zip(loads, self.pages.staging_for("load", loads),
                                           lent_runs, strict=True):
                num_ok = len(lent)
                if store is not None and num_ok < len(load.keys):
                    num_ok += fetch_blocks(store, load.keys[num_ok:], staging[num_ok:],
                                           on_failure=self.store.failed)
                rows: torch.Tensor | list[int] = staging
                if lent:  # the rest from the staging rows, by address too
                    rows = [*lent, *(staging.data_ptr() + i * staging.stride(0)
                                     for i in range(len(lent), num_ok))]
                    # A late loan fails the request (those after num_ok failed already).
                    self._lent += load.block_ids[:num_ok]
                    self._count(blocks_loaded_in_place=len(lent))
                if num_ok < len(load.keys):
                    self._fail(load.block_ids[num_ok:])
                    self._count(load_failures=len(load.keys) - num_ok)
                    log.warning("kvstore: request %s: %d of %d blocks could not be loaded; "
                                "vLLM recomputes them", load.req_id,
                                len(load.keys) - num_ok, len(load.keys))
                self._count(blocks_loaded=num_ok)
                fetched.append((load, rows, num_ok))
            for layer, ready in enumerate(layer_ready):
                if self._gpu_loads is not None:  # queued on its stream; waited per layer
                    self._gpu_loads.load_layer(layer, [(rows, load.block_ids[:num_ok])
                                                       for load, rows, num_ok in fetched])
                else:
                    for load, rows, num_ok in fetched:
                        assert isinstance(rows, torch.Tensor)
                        self.pages.scatter_layer(layer, rows, load.block_ids[:num_ok])
                ready.set()
            if self._lent and self._gpu_loads is not None:
                # When the copies out of the lent slots ended, at the latest: checked
                # against the loans when they are given back.
                self._gpu_loads.stream.synchronize()
                self._copies_done_at = time.monotonic()
        except BaseException:
            # Nothing half-written is handed over: every claimed block is reported failed.
            for load in loads:
                self._fail(load.block_ids)
            raise
        finally:
            for ready in layer_ready:
                ready.set()

    def _lend(self, store: Any, loads: list[BlockTransfer], loans: contextlib.ExitStack
              ) -> list[list[int]]:
        """For each load, where its leading blocks lie in the store's page-locked pool,
        lent in place for this step (the copy kernel reads them there: no host copy), as
        far as the store lends them whole: one loan for the step (it holds a connection
        of the client's until the step ends). [] for a load where none is lent: no
        kernel, a store without `lend`, a pool not page-locked here, a first block
        elsewhere or of another size. (The loan is taken before the step's other blocks
        are read into staging rows, and the in-place copies start after those reads: a
        step whose reads outlast half a lease, 15 s by default, fails its lent requests,
        and vLLM recomputes them.)"""
        none: list[list[int]] = [[] for _ in loads]
        if store is None or self._gpu_loads is None or not self._gpu_loads.use_kernel:
            return none
        keys = [key for load in loads for key in load.keys]
        try:
            if not getattr(store, "can_lend", False):  # (asking may connect: may fail)
                return none
            loan = loans.enter_context(store.lend(keys))
        except STORE_FAILURES as e:  # (the reads that follow find out too, and report)
            log.info("kvstore: lending %d blocks failed (%s); reading them", len(keys), e)
            return none
        if not loan.page_locked:  # (a daemon restarted meanwhile)
            return none
        runs, first = [], 0
        for load in loads:
            lent = []
            for address, nbytes in zip(loan.addresses[first:first + len(load.keys)],
                                       loan.nbytes[first:first + len(load.keys)],
                                       strict=True):
                if address is None or nbytes != self.pages.block_bytes or address % ALIGN:
                    break
                lent.append(address)
            runs.append(lent)
            first += len(load.keys)
        if any(runs):
            self._loans_valid_until = min(self._loans_valid_until, loan.valid_until)
        return runs

    def _return_loans(self) -> None:
        """After the copies are done: give the step's loans back. A copy that may have
        ended after a loan's ``valid_until`` may have read a reused slot: the blocks of
        each load that read lent slots are reported failed (vLLM recomputes them), as
        any failed load is."""
        loans, self._loans = self._loans, None
        lent, self._lent = self._lent, []
        valid_until, self._loans_valid_until = self._loans_valid_until, math.inf
        done_at, self._copies_done_at = self._copies_done_at, None
        if loans is None:
            return
        # (seen done on the I/O thread; else, at the latest, by now)
        late = (time.monotonic() if done_at is None else done_at) > valid_until
        try:
            loans.close()
        except STORE_FAILURES as e:  # (the daemon drops a lost connection's pins)
            log.warning("kvstore: giving back lent blocks failed: %s", e)
        if late and lent:
            self._fail(lent)
            self._count(load_failures=len(lent))
            log.warning("kvstore: %d blocks read in place outlived their loan; vLLM "
                        "recomputes them", len(lent))

    def _fail(self, block_ids: Any) -> None:
        self._load_errors.update(block_ids)
        self._step_failed = True

    def wait_for_layer_load(self, layer_name: str) -> None:
        if self._fetch is None or self.pages is None:
            return
        layer = self.pages.layer_index(layer_name)
        if layer is not None:
            self._layer_ready[layer].wait()
            if self._gpu_loads is not None:
                self._gpu_loads.wait(layer)

    def _finish_loads(self) -> None:
        """Wait for the whole load (vLLM may skip a layer's wait) and surface its errors."""
        fetch, self._fetch = self._fetch, None
        if fetch is not None:
            try:
                fetch.result()
            except Exception as e:  # already reported as failed blocks: vLLM recomputes
                log.error("kvstore: loading blocks failed: %s", e)
            if self._gpu_loads is not None:  # (the staging rows are reused next step)
                self._gpu_loads.synchronize()
            self._return_loans()

    def save_kv_layer(self, layer_name: str, saves: list[RankedTransfer]) -> None:
        if self.pages is None or not saves:
            return
        layer = self.pages.layer_index(layer_name)
        if layer is None:
            return
        if not self._save_staging:
            mine = [t.on_rank(self.rank) for t in saves]
            # On a GPU, gathered beside the caches (no host sync per layer), then copied
            # to the host rows on a side stream while the forward goes on; or, into a
            # daemon's pool page-locked here, put from the device at the step's end.
            device: list[torch.Tensor | None] = (
                list(self.pages.staging_for("save-device", mine, on_device=True))
                if self._gpu_saves is not None else [None] * len(mine))
            if self._gpu_saves is not None and self._to_pool is None:
                self._to_pool = self._saves_to_pool()  # (once; then after each step's put)
            host: list[torch.Tensor | None] = (
                [None] * len(mine) if self._gpu_saves is not None and self._to_pool
                else list(self.pages.staging_for("save", mine)))
            self._save_staging = list(zip(mine, host, device, strict=True))
        if self._gpu_saves is not None:
            self._gpu_saves.save_layer(layer, [(dev, host, save.block_ids)
                                               for save, host, dev in self._save_staging])
        else:
            for save, host, _ in self._save_staging:
                assert host is not None
                self.pages.gather_layer(layer, save.block_ids, host)
        self._gathered.add(layer)

    def _saves_to_pool(self) -> bool:
        """Whether this step's saves can go from the device straight into the store's
        pool: a daemon whose DRAM pool is mapped and page-locked here (`Client.can_lend`)."""
        if not SAVES_FROM_DEVICE:
            return False
        try:
            store = self.store.get()
            return store is not None and bool(getattr(store, "can_lend", False))
        except STORE_FAILURES as e:  # (asking may connect; the put finds out too)
            log.info("kvstore: asking the store where saves go failed: %s", e)
            return False

    def wait_for_save(self) -> None:
        self._finish_loads()
        staged, self._save_staging = self._save_staging, []
        gathered, self._gathered = self._gathered, set()
        failed, self._step_failed = self._step_failed, False  # (the step ends here)
        if not staged:
            return
        assert self.pages is not None
        if self._gpu_saves is not None:  # (the rows are read, or reused, after this)
            self._gpu_saves.synchronize()
            self._gpu_saves.wait_gathered()  # (device rows stored from this stream)
        if failed or len(gathered) < len(self.pages.layer_names):
            # A failed load leaves pages that this step's forward may have read (vLLM
            # recomputes them), and a layer vLLM did not hand over is not in the staging
            # rows: store nothing from this step rather than anything wrong.
            num = sum(len(save.keys) for save, _, _ in staged)
            self._count(save_failures=num)
            log.warning("kvstore: not storing %d blocks of a step with %s", num,
                        "failed loads" if failed else "layers not saved")
            return
        store = self.store.get()
        for save, staging, device in staged:
            rows = staging if staging is not None else device
            assert rows is not None
            num_saved = 0 if store is None else store_blocks(
                store, save.keys, rows, on_failure=self.store.failed)
            self._count(blocks_saved=num_saved, save_failures=len(save.keys) - num_saved,
                        blocks_saved_from_device=num_saved if staging is None else 0)
            log.debug("kvstore: request %s: stored %d of %d new blocks", save.req_id,
                      num_saved, len(save.keys))
        if self._gpu_saves is not None:  # for the next step's saves, asked off the forward
            self._to_pool = self._saves_to_pool()

    def get_block_ids_with_load_errors(self) -> set[int]:
        self._finish_loads()  # (with speculative decoding vLLM asks before wait_for_save)
        errors, self._load_errors = self._load_errors, set()
        return errors

    def shutdown(self) -> None:
        self._finish_loads()  # (gives back what a step left lent)
        self._io.shutdown(wait=True)

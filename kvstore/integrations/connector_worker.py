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
      pages layer by layer (on a GPU: the copy kernel on a side stream, `LayerLoads`)
    wait_for_layer_load(i): layer i written (on a GPU: the compute stream waits for it)
    save_kv_layer(i): layer i's new pages gathered into staging rows (on a GPU: beside the
      caches, then to page-locked host rows on a side stream, `LayerSaves`; no host sync)
    wait_for_save: the host rows complete, then put_many of the new blocks

A block that is missing, corrupt or unreadable is reported with every block after it
(`get_block_ids_with_load_errors`): vLLM recomputes them, and no page of a failed block is
ever written from the store. A step with a failed load stores nothing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from kvstore.errors import ConfigError
from kvstore.integrations.gpu_loads import LayerLoads, LayerSaves
from kvstore.integrations.pages import KVViewCodec, PageLayout, fetch_blocks, store_blocks

log = logging.getLogger(__name__)


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
        # on a GPU) and, on a GPU, the rows beside the caches its layers are gathered into.
        self._save_staging: list[tuple[BlockTransfer, torch.Tensor, torch.Tensor | None]] = []
        self._gathered: set[int] = set()  # layers save_kv_layer gathered this step
        self._load_errors: set[int] = set()

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
            for load, staging in zip(loads, self.pages.staging_for("load", loads),
                                     strict=True):
                num_ok = 0 if store is None else fetch_blocks(
                    store, load.keys, staging, on_failure=self.store.failed)
                if num_ok < len(load.keys):
                    self._load_errors.update(load.block_ids[num_ok:])
                    self._count(load_failures=len(load.keys) - num_ok)
                    log.warning("kvstore: request %s: %d of %d blocks could not be loaded; "
                                "vLLM recomputes them", load.req_id,
                                len(load.keys) - num_ok, len(load.keys))
                self._count(blocks_loaded=num_ok)
                fetched.append((load, staging, num_ok))
            for layer, ready in enumerate(layer_ready):
                if self._gpu_loads is not None:  # queued on its stream; waited per layer
                    self._gpu_loads.load_layer(layer, [(staging, load.block_ids[:num_ok])
                                                       for load, staging, num_ok in fetched])
                else:
                    for load, staging, num_ok in fetched:
                        self.pages.scatter_layer(layer, staging, load.block_ids[:num_ok])
                ready.set()
        except BaseException:
            # Nothing half-written is handed over: every claimed block is reported failed.
            for load in loads:
                self._load_errors.update(load.block_ids)
            raise
        finally:
            for ready in layer_ready:
                ready.set()

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

    def save_kv_layer(self, layer_name: str, saves: list[RankedTransfer]) -> None:
        if self.pages is None or not saves:
            return
        layer = self.pages.layer_index(layer_name)
        if layer is None:
            return
        if not self._save_staging:
            mine = [t.on_rank(self.rank) for t in saves]
            host = self.pages.staging_for("save", mine)
            # On a GPU, gathered beside the caches (no host sync per layer), then copied
            # to the host rows on a side stream while the forward goes on.
            device: list[torch.Tensor | None] = (
                list(self.pages.staging_for("save-device", mine, on_device=True))
                if self._gpu_saves is not None else [None] * len(mine))
            self._save_staging = list(zip(mine, host, device, strict=True))
        if self._gpu_saves is not None:
            self._gpu_saves.save_layer(layer, [(dev, host, save.block_ids)
                                               for save, host, dev in self._save_staging])
        else:
            for save, host, _ in self._save_staging:
                self.pages.gather_layer(layer, save.block_ids, host)
        self._gathered.add(layer)

    def wait_for_save(self) -> None:
        self._finish_loads()
        staged, self._save_staging = self._save_staging, []
        gathered, self._gathered = self._gathered, set()
        if not staged:
            return
        assert self.pages is not None
        if self._gpu_saves is not None:  # (the rows are read, or reused, after this)
            self._gpu_saves.synchronize()
        if self._load_errors or len(gathered) < len(self.pages.layer_names):
            # A failed load leaves pages that this step's forward may have read (vLLM
            # recomputes them), and a layer vLLM did not hand over is not in the staging
            # rows: store nothing from this step rather than anything wrong.
            num = sum(len(save.keys) for save, _, _ in staged)
            self._count(save_failures=num)
            log.warning("kvstore: not storing %d blocks of a step with %s", num,
                        "failed loads" if self._load_errors else "layers not saved")
            return
        store = self.store.get()
        for save, staging, _ in staged:
            num_saved = 0 if store is None else store_blocks(
                store, save.keys, staging, on_failure=self.store.failed)
            self._count(blocks_saved=num_saved, save_failures=len(save.keys) - num_saved)
            log.debug("kvstore: request %s: stored %d of %d new blocks", save.req_id,
                      num_saved, len(save.keys))

    def get_block_ids_with_load_errors(self) -> set[int]:
        self._finish_loads()  # (with speculative decoding vLLM asks before wait_for_save)
        errors, self._load_errors = self._load_errors, set()
        return errors

    def shutdown(self) -> None:
        self._io.shutdown(wait=True)

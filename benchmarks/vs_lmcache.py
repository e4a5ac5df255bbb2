#!/usr/bin/env python3
"""kvstore beside LMCache (0.5.x) on the same machine: the same KV chunks (256 tokens of a
model's KV in bf16) stored and retrieved through each system's local tiers, one worker
process per system, requests of a few chunks each.

    DRAM  kvstore  Store(StoreConfig(dram_bytes=C)): put_many of a request's chunks (one
                   chain), get_many_into the caller's buffers
          LMCache  StorageManager over LocalCPUBackend (local_cpu=True,
                   max_local_cpu_size=C), driven as LMCacheEngine.store / retrieve drive it
                   around the GPU connector: allocate a MemoryObj per chunk, copy the chunk
                   in, batched_put; get_block_mapping, batched_get, copy each chunk out to the
                   caller's buffer, ref_count_down
    disk  kvstore  an NVMe-only Store (dram_bytes=0): log-structured segment files written
                   and read with O_DIRECT; put_many, then flush (fsync) for the durable figure
          LMCache  LocalDiskBackend with local_cpu=False (its CPU pool only stages chunks):
                   one file per chunk, written by its I/O threads after batched_put returns,
                   never fsynced; buffered I/O by default (lmcache_disk: through the page
                   cache) and extra_config use_odirect=True (lmcache_odirect)

Both systems get the same bytes, the same chunk size, the same capacity (DRAM: kvstore's
slab-rounded pool, given to LMCache as max_local_cpu_size) and the same copy (np.copyto,
one thread). Store is timed until the system holds every chunk by its own rule (LMCache's
disk backend: until its I/O threads have written every file); "durable" adds kvstore's
flush, and an fsync of each of LMCache's files (it issues none itself). Before a disk read
the page cache is dropped (sync, drop_caches, fadvise DONTNEED); the read is then repeated
with the cache as the first read left it ("reread"): LMCache's buffered files come back
from the page cache there, kvstore's O_DIRECT reads from the disk again. Raw limits of the
same run: memcpy of the same chunks; O_DIRECT write+fsync and read of the same bytes in the
same directory.

Each repeat runs every system (the order rotates from repeat to repeat) and then clears
them; figures are medians over repeats, ratios (kvstore / LMCache) medians of per-repeat
ratios. The first repeat checks the bytes read back, for every system. Memory: resident
set size of each worker (/proc/self/status) after allocating its chunks and buffers (the
base), after opening the store, and after a store pass, against the bytes stored.

LMCache's GPU connector (the GPU<->CPU path) needs CUDA: without it, "lmcache" in the JSON
says so and nothing of it is timed. If LMCache cannot run at all, "lmcache" says why and
the kvstore half is still reported (exit 0). LMCache is a benchmark peer only, never a
project dependency: it lives in its own venv (see docs/LMCACHE.md), found by
--lmcache-python, $LMCACHE_PYTHON or /tmp/venv-lmcache.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

_HERE = Path(__file__).resolve().parent
_REPO = _HERE.parent
for _path in (_REPO, _HERE):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

# The LMCache worker imports these too (with the kvstore package, as store_bench does) but
# never opens a kvstore Store.
from store_bench import (  # noqa: E402
    PageCache,
    aligned,
    default_nvme_base,
    dram_pool_bytes,
    emit,
    gbps,
    log,
    machine_info,
    mount_of,
    quit_worker,
    raw_direct_io,
    settle,
    size_label,
    slices,
    summarize,
    timed,
)

import kvstore  # noqa: E402
from kvstore.model_shapes import kv_layout  # noqa: E402
from kvstore.units import parse_size  # noqa: E402

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
CHUNK_TOKENS = 256  # LMCache's default chunk_size
MODELS = ("llama3-8b", "smollm2-135m")
TIERS = ("dram", "disk")
LMCACHE_VENV_PYTHON = "/tmp/venv-lmcache/bin/python"
LMCACHE_INSTALL = ("python3 -m venv /tmp/venv-lmcache && /tmp/venv-lmcache/bin/pip install "
                   "torch==2.13.0 lmcache==0.5.6")


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * KiB
    raise RuntimeError("no VmRSS in /proc/self/status")


def chunk_bytes_of(model: str) -> int:
    return kv_layout(model, dtype="bfloat16", block_tokens=CHUNK_TOKENS).block_bytes


def make_data(nbytes: int) -> np.ndarray:
    """Seeded random bytes (bf16 KV is opaque to both systems: neither compresses)."""
    data = aligned(nbytes)
    rng = np.random.default_rng(0)
    step = 64 * MiB
    for start in range(0, nbytes, step):
        stop = min(start + step, nbytes)
        data[start:stop] = rng.integers(0, 256, stop - start, dtype=np.uint8)
    return data


def request_slice(i: int, chunks_per_request: int) -> slice:
    return slice(i * chunks_per_request, (i + 1) * chunks_per_request)


# -- the systems -------------------------------------------------------------------------------


class Side(Protocol):
    """One system over one tier, as the worker times it. Request i is chunks
    i * chunks_per_request onwards; wait_stored ends a store pass (timed with it),
    make_durable follows it (timed only in the durable figure)."""

    info: dict[str, Any]

    def store_request(self, i: int) -> int: ...
    def wait_stored(self) -> None: ...
    def make_durable(self) -> None: ...
    def retrieve_request(self, i: int) -> int: ...
    def disk_paths(self) -> list[str]: ...
    def clear(self) -> None: ...
    def close(self) -> None: ...


class KvstoreSide:
    """The embedded Store: the DRAM tier, or an NVMe-only store in a fresh directory."""

    def __init__(self, spec: dict[str, Any], values: list[np.ndarray],
                 outs: list[np.ndarray]) -> None:
        self.spec = spec
        self.values, self.outs = values, outs
        num_chunks = len(values)
        self.keys = kvstore.prefix_hashes(
            np.arange(num_chunks * CHUNK_TOKENS, dtype=np.uint32) + spec["chunk_bytes"],
            block_tokens=CHUNK_TOKENS, namespace="vs-lmcache")
        self.path: str | None = None
        self.store: Any = None
        self.info: dict[str, Any] = {"version": kvstore.__version__}
        self._open()

    def _open(self) -> None:
        spec = self.spec
        if spec["tier"] == "dram":
            config = kvstore.StoreConfig(dram_bytes=spec["capacity_bytes"], hbm_bytes=0,
                                         max_value_bytes=spec["chunk_bytes"])
        else:
            self.path = tempfile.mkdtemp(prefix="kvstore-", dir=spec["disk_dir"])
            config = kvstore.StoreConfig(
                dram_bytes=0, hbm_bytes=0, nvme_path=self.path,
                nvme_bytes=2 * spec["total_bytes"] + 256 * MiB,
                max_value_bytes=max(16 * MiB, spec["chunk_bytes"]))
        self.info["config"] = repr(config)
        self.store = kvstore.Store(config)

    def store_request(self, i: int) -> int:
        part = request_slice(i, self.spec["chunks_per_request"])
        return self.store.put_many(self.keys[part], self.values[part])

    def wait_stored(self) -> None:
        pass

    def make_durable(self) -> None:
        self.store.flush()

    def retrieve_request(self, i: int) -> int:
        part = request_slice(i, self.spec["chunks_per_request"])
        return self.store.get_many_into(self.keys[part], self.outs[part])

    def disk_paths(self) -> list[str]:
        return [self.path] if self.path else []

    def clear(self) -> None:
        if self.path is None:
            for key in self.keys:
                self.store.delete(key)
            return
        self.store.close()
        shutil.rmtree(self.path, ignore_errors=True)
        self._open()  # a fresh directory each repeat, as store_bench.py does

    def close(self) -> None:
        self.store.close()
        if self.path:
            shutil.rmtree(self.path, ignore_errors=True)


class LmcacheSide:
    """LMCache's StorageManager, driven as LMCacheEngine drives it (module docstring)."""

    def __init__(self, spec: dict[str, Any], values: list[np.ndarray],
                 outs: list[np.ndarray]) -> None:
        import torch
        from lmcache import __version__
        from lmcache.utils import CacheEngineKey
        from lmcache.v1.memory_management import MemoryFormat
        from lmcache.v1.metadata import LMCacheMetadata

        self.spec = spec
        self.values, self.outs = values, outs
        layout = kv_layout(spec["model"])
        layers, kv_heads, head_dim = layout.num_layers, layout.num_kv_heads, layout.head_dim
        # KV_2LTD, the format LMCacheEngine.store allocates when not layer-wise
        self.shape = torch.Size([2, layers, CHUNK_TOKENS, kv_heads * head_dim])
        self.dtype = torch.bfloat16
        self.fmt = MemoryFormat.KV_2LTD
        self.metadata = LMCacheMetadata(
            model_name=spec["model"], world_size=1, local_world_size=1, worker_id=0,
            local_worker_id=0, kv_dtype=self.dtype,
            kv_shape=(layers, 2, CHUNK_TOKENS, kv_heads, head_dim), chunk_size=CHUNK_TOKENS)
        self.keys = [CacheEngineKey(spec["model"], 1, 0, spec["chunk_bytes"] << 32 | i,
                                    self.dtype) for i in range(len(values))]
        self.path: str | None = None
        self.disk: Any = None
        self.options = self._open()
        self.info: dict[str, Any] = {
            "version": __version__, "config": self.options,
            "backends": list(self.manager.storage_backends),
            "disk_io": (("O_DIRECT" if self.disk.use_odirect else "buffered")
                        if self.disk is not None else None)}

    def _open(self) -> dict[str, Any]:
        from lmcache.v1.config import LMCacheEngineConfig
        from lmcache.v1.event_manager import EventManager
        from lmcache.v1.storage_backend.storage_manager import StorageManager

        spec = self.spec
        is_disk = spec["tier"] == "disk"
        options: dict[str, Any] = {
            "chunk_size": CHUNK_TOKENS, "local_cpu": not is_disk,
            "max_local_cpu_size": spec["capacity_bytes"] / GiB,
            "local_disk": None, "max_local_disk_size": 0.0}
        if is_disk:
            self.path = tempfile.mkdtemp(prefix="lmcache-", dir=spec["disk_dir"])
            options.update(local_disk=self.path,
                           max_local_disk_size=(2 * spec["total_bytes"] + 256 * MiB) / GiB)
            if spec["lmcache_odirect"]:
                options["extra_config"] = {"use_odirect": True}
        config = LMCacheEngineConfig.from_defaults(**options)
        self.manager = StorageManager(config, self.metadata, event_manager=EventManager())
        self.disk = self.manager.storage_backends.get("LocalDiskBackend")
        if is_disk and self.disk is None:
            raise RuntimeError(f"no LocalDiskBackend among {list(self.manager.storage_backends)}")
        return options

    def store_request(self, i: int) -> int:
        part = request_slice(i, self.spec["chunks_per_request"])
        objs = []
        for value in self.values[part]:
            # LMCacheEngine.store allocates with busy_loop=False: no room, fewer chunks
            obj = self.manager.allocate(self.shape, self.dtype, fmt=self.fmt, busy_loop=False)
            if obj is None:
                break
            np.copyto(np.frombuffer(obj.byte_array, np.uint8), value)
            objs.append(obj)
        self.manager.batched_put(self.keys[part][:len(objs)], objs)
        return len(objs)

    def wait_stored(self) -> None:
        """The disk backend writes after batched_put returns; wait until every file is in."""
        if self.disk is None:
            return
        for key in self.keys:
            # A write inserts the key before it leaves the put tasks: neither means refused.
            while not self.disk.contains(key):
                if not self.disk.exists_in_put_tasks(key) and not self.disk.contains(key):
                    raise RuntimeError(f"LMCache's disk backend did not take chunk "
                                       f"{key.chunk_hash:#x} (full by its own count)")
                time.sleep(0.0005)

    def make_durable(self) -> None:
        """What LMCache never does: fsync each chunk's file (the data on the device)."""
        for key in self.keys:
            fd = os.open(self.disk._key_to_path(key), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def retrieve_request(self, i: int) -> int:
        part = request_slice(i, self.spec["chunks_per_request"])
        keys = self.keys[part]
        chunks = [(key, 0, 0) for key in keys]  # (key, start, end): only the keys are read
        copied = 0
        for location, blocks in self.manager.get_block_mapping(chunks).items():
            objs = self.manager.batched_get([key for key, _, _ in blocks], location=location)
            for obj in objs:
                if obj is None:
                    continue
                np.copyto(self.outs[part][copied], np.frombuffer(obj.byte_array, np.uint8))
                obj.ref_count_down()
                copied += 1
        return copied

    def disk_paths(self) -> list[str]:
        return [self.path] if self.path else []

    def clear(self) -> None:
        if self.path is None:
            self.manager.batched_remove(self.keys)
            return
        # A fresh backend and directory each repeat, as for kvstore. (Reusing one does not
        # work: in 0.5.6 LocalDiskBackend.remove leaves its current_cache_size as it was,
        # so after a few runs' removes it is full by its own count and drops every put.)
        self.manager.close()
        shutil.rmtree(self.path, ignore_errors=True)
        self._open()

    def close(self) -> None:
        self.manager.close()
        if self.path:
            shutil.rmtree(self.path, ignore_errors=True)


def gpu_connector_probe() -> dict[str, Any]:
    """Can LMCache's vLLM GPU connector be made here? (It needs CUDA.)"""
    import torch

    probe: dict[str, Any] = {"torch": torch.__version__,
                             "cuda_available": torch.cuda.is_available()}
    try:
        from lmcache.v1.gpu_connector.gpu_connectors import VLLMPagedMemGPUConnectorV2

        VLLMPagedMemGPUConnectorV2(hidden_dim_size=1024, num_layers=1)
        probe["constructs"] = True
    except Exception as e:
        probe.update(constructs=False, error=f"{type(e).__name__}: {e}")
    return probe


# -- the worker process --------------------------------------------------------------------------


class Worker:
    """One system's process: its chunks, its buffers, its store; one JSON line per command."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        # The system's modules load before the base RSS is read: it counts only the store.
        if spec["system"] == "lmcache":
            import lmcache.v1.storage_backend.storage_manager  # noqa: F401
        else:
            import kvstore.store  # noqa: F401
        chunk_bytes = spec["chunk_bytes"]
        self.num_chunks = spec["num_chunks"]
        self.num_requests = self.num_chunks // spec["chunks_per_request"]
        nbytes = self.num_chunks * chunk_bytes
        self.data = make_data(nbytes)
        self.out = aligned(nbytes)
        self.values = slices(self.data, chunk_bytes, self.num_chunks)
        self.outs = slices(self.out, chunk_bytes, self.num_chunks)
        self.cache = PageCache()
        self.raw_path: str | None = None
        self.rss_base_bytes = rss_bytes()
        side_type = KvstoreSide if spec["system"] == "kvstore" else LmcacheSide
        self.side: Side
        open_s, self.side = timed(lambda: side_type(spec, self.values, self.outs))
        self.ready = {"ready": True, "num_chunks": self.num_chunks, "open_s": open_s,
                      "rss_base_bytes": self.rss_base_bytes,
                      "rss_open_bytes": rss_bytes() - self.rss_base_bytes, **self.side.info}
        if spec["system"] == "lmcache":
            self.ready["gpu_connector"] = gpu_connector_probe()

    def run(self, verify: bool) -> dict[str, Any]:
        side, nbytes, is_disk = self.side, self.out.nbytes, self.spec["tier"] == "disk"
        requests = range(self.num_requests)

        def store_all() -> int:
            stored = sum(map(side.store_request, requests))
            side.wait_stored()
            return stored

        def retrieve_all() -> int:
            return sum(map(side.retrieve_request, requests))

        run: dict[str, Any] = {}
        store_s, stored = timed(store_all)
        rss_stored = rss_bytes() - self.rss_base_bytes
        if stored != self.num_chunks:
            raise RuntimeError(f"stored {stored} of {self.num_chunks} chunks")
        figures = {"store": store_s}
        if is_disk:
            durable_s, _ = timed(side.make_durable)
            figures["store_durable"] = store_s + durable_s
            self.cache.drop(*side.disk_paths())
        if verify:
            self.out.fill(0)
        figures["retrieve"], got = timed(retrieve_all)
        if verify:
            run["verified"] = got == self.num_chunks and bool(np.array_equal(self.out,
                                                                            self.data))
        if is_disk:
            figures["reread"], got_again = timed(retrieve_all)
            got = min(got, got_again)
        if got != self.num_chunks:
            raise RuntimeError(f"retrieved {got} of {self.num_chunks} chunks")
        for name, seconds in figures.items():
            run[f"{name}_gbps"] = gbps(nbytes, seconds)
            run[f"{name}_chunks_per_s"] = self.num_chunks / seconds
        run["rss_stored_bytes"] = rss_stored
        run["rss_per_stored_byte"] = rss_stored / nbytes
        return run

    def raw(self) -> dict[str, Any]:
        """The limits of the same run, on this process's buffers."""
        nbytes, chunk_bytes = self.out.nbytes, self.spec["chunk_bytes"]
        if self.spec["tier"] == "dram":
            copy_s, _ = timed(lambda: list(map(np.copyto, self.outs, self.values)))
            return {"memcpy_gbps": gbps(nbytes, copy_s)}
        self.raw_path = os.path.join(self.spec["disk_dir"], f"raw-{os.getpid()}.bin")
        raw = raw_direct_io(self.raw_path, memoryview(self.data), memoryview(self.out),
                            chunk_bytes, self.num_chunks, self.cache)
        return {"o_direct_write_gbps": gbps(nbytes, raw["write_s"]),
                "o_direct_read_gbps": gbps(nbytes, raw["read_s"]),
                "o_direct": raw["o_direct"], "verified": raw["verified"]}

    def clear(self) -> dict[str, Any]:
        self.side.clear()
        if self.raw_path:
            with contextlib.suppress(OSError):
                os.unlink(self.raw_path)
            self.raw_path = None
        return {"cleared": True}

    def serve(self) -> None:
        commands: dict[str, Callable[[], dict[str, Any]]] = {
            "run": lambda: self.run(False), "verify": lambda: self.run(True),
            "raw": self.raw, "clear": self.clear}
        print(json.dumps(self.ready), flush=True)
        for line in sys.stdin:
            command = line.strip()
            if command == "quit":
                break
            try:
                answer = commands[command]()
            except Exception as e:
                answer = {"error": f"{type(e).__name__}: {e}",
                          "traceback": traceback.format_exc()[-2000:]}
            print(json.dumps(answer), flush=True)
        self.side.close()


def worker_main(spec_json: str) -> int:
    try:
        worker = Worker(json.loads(spec_json))
    except Exception as e:
        print(json.dumps({"error": f"{type(e).__name__}: {e}",
                          "traceback": traceback.format_exc()[-2000:]}), flush=True)
        return 1
    worker.serve()
    return 0


class WorkerProcess:
    """The benchmark's end of a worker: start it, send commands, read answers."""

    def __init__(self, name: str, python: str, spec: dict[str, Any], workdir: str) -> None:
        self.name = name
        self.log_path = os.path.join(workdir, f"{name}.log")
        env = dict(os.environ, LMCACHE_LOG_LEVEL="ERROR", PYTHONUNBUFFERED="1")
        with open(self.log_path, "wb") as log_file:
            self.process = subprocess.Popen(
                [python, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file, text=True,
                cwd=workdir, env=env)
        self.ready = self._answer()

    def _answer(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            tail = Path(self.log_path).read_text(errors="replace")[-1500:]
            raise RuntimeError(f"{self.name} worker exited with {self.process.wait()}: {tail}")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"{self.name}: {answer['error']}\n{answer.get('traceback', '')}")
        return answer

    def ask(self, command: str) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self._answer()

    def close(self) -> None:
        quit_worker(self.process, 60)


# -- the benchmark -------------------------------------------------------------------------------


def find_lmcache_python(given: str | None) -> tuple[str | None, str]:
    """An interpreter that imports lmcache, and how it was found (or why none was)."""
    candidates = ([given] if given else
                  [p for p in (os.environ.get("LMCACHE_PYTHON"), LMCACHE_VENV_PYTHON) if p])
    for python in candidates:
        if not os.access(python, os.X_OK):
            continue
        probe = subprocess.run([python, "-c", "import lmcache, sys; "
                                "print(lmcache.__version__, sys.version.split()[0])"],
                               capture_output=True, text=True, timeout=300,
                               env=dict(os.environ, LMCACHE_LOG_LEVEL="ERROR"))
        if probe.returncode == 0:
            return python, probe.stdout.strip().splitlines()[-1]
        return None, f"{python} cannot import lmcache: {probe.stderr.strip()[-800:]}"
    return None, f"no interpreter with lmcache among {candidates}; create one: {LMCACHE_INSTALL}"


def lmcache_names(tier: str) -> list[str]:
    return ["lmcache"] if tier == "dram" else ["lmcache_disk", "lmcache_odirect"]


class Phase:
    """One model and tier: kvstore's worker and LMCache's, the repeats, the summary.

    An LMCache worker that fails is dropped, its reason kept in "lmcache"; a kvstore worker
    that fails stops the benchmark (that is a kvstore or benchmark bug).
    """

    def __init__(self, model: str, tier: str, args: argparse.Namespace,
                 lmcache_python: str | None, workdir: str, lmcache_info: dict[str, Any]) -> None:
        self.model, self.tier, self.lmcache_info = model, tier, lmcache_info
        chunk_bytes = chunk_bytes_of(model)
        per_request = args.chunks_per_request
        num_chunks = max(1, args.total_bytes // (chunk_bytes * per_request)) * per_request
        total_bytes = num_chunks * chunk_bytes
        self.spec = {
            "system": "kvstore", "model": model, "tier": tier, "chunk_bytes": chunk_bytes,
            "num_chunks": num_chunks, "chunks_per_request": per_request,
            "total_bytes": total_bytes, "disk_dir": workdir, "lmcache_odirect": False,
            # DRAM: kvstore's slab-rounded pool, the same for LMCache. Disk: LMCache's staging
            # pool holds every chunk, so that it never drops one (LMCacheEngine.store does
            # when its pool is full: busy_loop=False).
            "capacity_bytes": (dram_pool_bytes(chunk_bytes, num_chunks, chunk_bytes)
                               if tier == "dram" else total_bytes)}
        self.entry: dict[str, Any] = {
            "chunk_bytes": chunk_bytes, "chunk_tokens": CHUNK_TOKENS, "num_chunks": num_chunks,
            "chunks_per_request": per_request, "total_bytes": total_bytes,
            "capacity_bytes": self.spec["capacity_bytes"]}
        log(f"{model} {tier}: {num_chunks} chunks of {size_label(chunk_bytes)}")
        self.workers = {"kvstore": WorkerProcess("kvstore", sys.executable, self.spec, workdir)}
        for name in lmcache_names(tier) if lmcache_python else []:
            spec = dict(self.spec, system="lmcache", lmcache_odirect=name == "lmcache_odirect")
            try:
                self.workers[name] = WorkerProcess(name, lmcache_python, spec, workdir)
            except Exception as e:
                self.drop(name, e)
        self.entry["ready"] = {name: w.ready for name, w in self.workers.items()}

    def drop(self, name: str, error: Exception) -> None:
        reason = f"{self.model} {self.tier} {name}: {type(error).__name__}: {error}"
        self.lmcache_info.setdefault("errors", []).append(reason)
        log(f"LMCache dropped: {reason}")
        worker = self.workers.pop(name, None)
        if worker is not None:
            worker.close()

    def ask(self, name: str, command: str) -> dict[str, Any]:
        if name == "kvstore":
            return self.workers[name].ask(command)
        try:
            return self.workers[name].ask(command)
        except Exception as e:
            self.drop(name, e)
            return {}

    def run(self, repeats: int) -> dict[str, Any]:
        for name in list(self.workers):  # warm-up: first touches, thread pools, files
            self.ask(name, "run")
            self.ask(name, "clear")
        runs = []
        for repeat in range(repeats):
            run = {f"raw_{k}": v for k, v in self.ask("kvstore", "raw").items()}
            names = list(self.workers)
            for name in names[repeat % len(names):] + names[:repeat % len(names)]:
                answer = self.ask(name, "verify" if repeat == 0 else "run")
                run.update({f"{name}_{k}": v for k, v in answer.items()})
            for name in list(self.workers):
                self.ask(name, "clear")
            if self.tier == "disk":
                settle()  # the deletes' TRIMs (the disk is mounted with discard)
            names = [n for n in names if f"{n}_store_gbps" in run]
            add_ratios(run, self.tier, [n for n in names if n != "kvstore"])
            runs.append(run)
            figures = figure_names(self.tier)
            log(f"{self.model} {self.tier} run {repeat}: " + "; ".join(
                f"{n} " + " / ".join(f"{run[f'{n}_{f}_gbps']:.2f}" for f in figures)
                for n in names) + f" GB/s ({' / '.join(figures)})")
        summary = summarize(runs)
        for prefix in ("raw", "kvstore", *lmcache_names(self.tier)):
            part = {k[len(prefix) + 1:]: v for k, v in summary.items()
                    if k.startswith(prefix + "_")}
            if part:
                self.entry[prefix] = part
        self.entry["runs"] = runs
        return self.entry

    def close(self) -> None:
        for worker in self.workers.values():
            worker.close()


def figure_names(tier: str) -> list[str]:
    return ["store", "retrieve"] if tier == "dram" else [
        "store", "store_durable", "retrieve", "reread"]


def add_ratios(run: dict[str, Any], tier: str, peers: list[str]) -> None:
    for peer in peers:
        for figure in figure_names(tier):
            run[f"kvstore_{figure}_vs_{peer}"] = (run[f"kvstore_{figure}_gbps"]
                                                  / run[f"{peer}_{figure}_gbps"])
    for name in ("kvstore", *peers):
        if tier == "dram":
            for figure in ("store", "retrieve"):
                run[f"{name}_{figure}_vs_memcpy"] = (run[f"{name}_{figure}_gbps"]
                                                     / run["raw_memcpy_gbps"])
        else:
            run[f"{name}_store_durable_vs_o_direct"] = (run[f"{name}_store_durable_gbps"]
                                                        / run["raw_o_direct_write_gbps"])
            run[f"{name}_retrieve_vs_o_direct"] = (run[f"{name}_retrieve_gbps"]
                                                   / run["raw_o_direct_read_gbps"])


def headline(results: dict[str, Any]) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for model, tiers in results.items():
        for tier, entry in tiers.items():
            for peer in lmcache_names(tier):
                for figure in figure_names(tier):
                    table[f"{model} {tier} {figure} vs {peer}"] = {
                        "kvstore_gbps": entry["kvstore"][f"{figure}_gbps"],
                        f"{peer}_gbps": entry.get(peer, {}).get(f"{figure}_gbps"),
                        "ratio": entry["kvstore"].get(f"{figure}_vs_{peer}")}
    return table


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="kvstore's DRAM and NVMe tiers beside LMCache's local CPU and local disk "
                    "backends, the same KV chunks, one worker process each; prints one JSON "
                    "document.")
    parser.add_argument("--models", default=",".join(MODELS),
                        help="KV shapes of 256-token chunks (default: %(default)s)")
    parser.add_argument("--tiers", default=",".join(TIERS), help="dram,disk (default: both)")
    parser.add_argument("--total-bytes", default=None,
                        help="bytes of chunks per model and tier (default: 512MiB; quick: "
                             "one request)")
    parser.add_argument("--chunks-per-request", type=int, default=8,
                        help="chunks stored or retrieved per call (default: %(default)s, "
                             "2048 tokens)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="runs per figure; the median is reported (default: 5, quick: 2)")
    parser.add_argument("--quick", action="store_true", help="small totals and 2 repeats")
    parser.add_argument("--disk-dir", default=None,
                        help="where both systems' files go (fresh subdirectories, removed "
                             "after); default: /var/tmp or the repo's parent")
    parser.add_argument("--lmcache-python", default=None,
                        help="an interpreter that imports lmcache (default: $LMCACHE_PYTHON, "
                             f"else {LMCACHE_VENV_PYTHON})")
    parser.add_argument("--no-lmcache", action="store_true", help="the kvstore half only")
    parser.add_argument("--json-out", default=None, help="also write the JSON to this file")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.tiers = [t.strip() for t in args.tiers.split(",") if t.strip()]
    if not set(args.models) <= set(MODELS) or not set(args.tiers) <= set(TIERS):
        parser.error(f"--models takes {', '.join(MODELS)}; --tiers {', '.join(TIERS)}")
    if args.repeats is None:
        args.repeats = 2 if args.quick else 5
    args.total_bytes = (parse_size(args.total_bytes, what="--total-bytes")
                        if args.total_bytes else 0 if args.quick else 512 * MiB)
    if args.repeats < 1 or args.chunks_per_request < 1:
        parser.error("--repeats and --chunks-per-request must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        return worker_main(argv[1])
    args = parse_args(argv)
    started_s = time.perf_counter()
    base_dir = args.disk_dir or default_nvme_base()
    workdir = tempfile.mkdtemp(prefix="vs-lmcache-", dir=base_dir)
    lmcache_info: dict[str, Any] = {"available": False}
    lmcache_python = None
    if args.no_lmcache:
        lmcache_info["reason"] = "--no-lmcache"
    else:
        lmcache_python, found = find_lmcache_python(args.lmcache_python)
        if lmcache_python:
            lmcache_info.update(available=True, python=lmcache_python,
                                version_and_python=found)
        else:
            lmcache_info["reason"] = found
            log(f"LMCache cannot run: {found}")
    doc: dict[str, Any] = {
        "benchmark": "kvstore/benchmarks/vs_lmcache.py",
        "units": {"gbps": "1e9 bytes per second", "figures": "median over runs",
                  "ratio": "kvstore / LMCache, median of per-run ratios",
                  "rss_per_stored_byte": "(RSS after a store pass - RSS before the store "
                                         "was opened) / bytes stored"},
        "setup": {
            "kvstore": "embedded kvstore.Store in its own process: DRAM tier (put_many, "
                       "get_many_into); NVMe-only tier (O_DIRECT segments; flush = fsync)",
            "lmcache": "lmcache.v1 StorageManager in its own process (its venv): "
                       "LocalCPUBackend (local_cpu=True) or LocalDiskBackend (local_cpu=False; "
                       "buffered files, or extra_config use_odirect=True); allocate + copy + "
                       "batched_put, get_block_mapping + batched_get + copy out",
            "copies": "np.copyto, one thread, for both",
            "disk_reads": "page cache dropped before 'retrieve'; 'reread' right after, "
                          "cache as the first read left it",
            "order": "every repeat runs every system, the order rotated per repeat",
        },
        "config": {"models": args.models, "tiers": args.tiers, "repeats": args.repeats,
                   "quick": args.quick, "total_bytes": args.total_bytes,
                   "chunks_per_request": args.chunks_per_request, "disk_dir": workdir},
        "machine": machine_info(workdir),
    }
    doc["machine"]["disk_dir_mount"] = mount_of(workdir)
    results: dict[str, Any] = {}
    try:
        for model in args.models:
            for tier in args.tiers:
                phase = Phase(model, tier, args, lmcache_python, workdir, lmcache_info)
                try:
                    results.setdefault(model, {})[tier] = phase.run(args.repeats)
                finally:
                    phase.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    ready = [r.get("ready", {}) for tiers in results.values() for r in tiers.values()]
    probes = [w["gpu_connector"] for r in ready for w in r.values() if "gpu_connector" in w]
    if probes:
        lmcache_info["gpu_connector"] = probes[0]
        if not probes[0].get("constructs"):
            lmcache_info["gpu_path"] = ("not measured: LMCache's GPU connector needs CUDA and "
                                        "this machine has no GPU (" +
                                        probes[0].get("error", "") + ")")
    doc["lmcache"] = lmcache_info
    doc["results"] = results
    doc["headline"] = headline(results)
    emit(doc, started_s, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

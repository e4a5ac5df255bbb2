#!/usr/bin/env python3
"""Storage benchmark of kvstore: every store figure beside its raw limit, measured in the run.

    section     store figure                          raw limit (same run, same bytes)
    dram        put / get / get_into GB/s             np.copyto between preallocated arrays
    pool_use    share of a pool holding values of a   a byte-exact LRU cache of the pool's
                seeded mix of sizes, values kept      capacity (the newest values that fit)
    nvme        put+flush, get_into, get GB/s         O_DIRECT pwrite+fsync / pread, same
                (store reopened, page cache dropped)  value-size chunks; `dd` with 4 MiB
    nvme lz4    same, fp16 KV-like values             lz4.block (de)compress, one thread
    batch_ops   put_many / get_many ops/s             dict + np.copyto per op (Python floor)
    prefix_hash prefix_hashes tokens/s                one keyed BLAKE2b over the same tokens

Prints one JSON document on stdout (progress goes to stderr). GB/s is 1e9 bytes/s. Each
figure is the median of ``--repeats`` runs; ``runs`` holds every run; a ratio is the median
of the per-run ratios store / raw. ``--profile`` adds, per section, the top functions of one
extra (untimed) pass run under cProfile.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import cProfile
import gc
import hashlib
import importlib.metadata
import json
import os
import platform
import pstats
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

_REPO = Path(__file__).resolve().parents[1]
if (_REPO / "kvstore" / "__init__.py").is_file() and str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))  # this checkout's kvstore, installed or not

import kvstore  # noqa: E402
from kvstore.buffers import page_aligned_buffer  # noqa: E402
from kvstore.tiers.slab import size_class  # noqa: E402
from kvstore.units import parse_size  # noqa: E402

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
DIRECT_ALIGN_BYTES = 4096
DRAM_TARGET_RATIO = 0.70  # for values of at least DRAM_TARGET_MIN_BYTES
DRAM_TARGET_MIN_BYTES = 256 * KiB
NVME_TARGET_RATIO = 0.70
SETTLE_S = 2.0  # after deleting a repeat's files (see remove_and_settle)
BATCH_TARGET_OPS_PER_S = 100_000
PROFILE_TOP = 12

_deque = collections.deque


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def size_label(nbytes: int) -> str:
    for unit, factor in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if nbytes >= factor and nbytes % factor == 0:
            return f"{nbytes // factor}{unit}"
    return f"{nbytes}B"


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else float("inf")


def rounded(value: Any) -> Any:
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return value


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start_s = time.perf_counter()
    result = fn()
    return time.perf_counter() - start_s, result


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of each numeric field over the runs (a ratio: median of per-run ratios);
    a flag is true only if it held in every run."""
    summary: dict[str, Any] = {}
    for field in dict.fromkeys(k for run in runs for k in run):
        values = [run[field] for run in runs if field in run]
        if all(isinstance(v, bool) for v in values):
            summary[field] = all(values)
        elif all(isinstance(v, int) for v in values):
            summary[field] = statistics.median_low(values)
        elif all(isinstance(v, int | float) for v in values):
            summary[field] = statistics.median(values)
    return summary


def aligned(nbytes: int) -> np.ndarray:
    """A page-aligned uint8 array (anonymous mmap), its pages already faulted in.

    Page alignment is what O_DIRECT needs, and it matches how torch (64-byte aligned) and
    pinned buffers are laid out. It matters for memcpy too: on this kind of CPU a copy whose
    source and destination differ in alignment mod 64 runs at about half speed, and a large
    ``np.empty`` array starts 16 bytes past a page; see ``get_into_offset16`` in the DRAM
    section.
    """
    # The store's own buffers (private memory on huge pages where offered): on Python's
    # default shared anonymous map O_DIRECT ran at a quarter to a half of this speed here,
    # which would understate every raw limit measured on it.
    array = np.frombuffer(page_aligned_buffer(nbytes), dtype=np.uint8)
    array.fill(0)
    return array


def kv_like_bytes(nbytes: int, seed: int = 0) -> np.ndarray:
    """Bytes of fp16 values drawn from N(0, 1): what KV activations look like to a codec."""
    rng = np.random.default_rng(seed)
    halves = aligned(2 * ((nbytes + 1) // 2)).view(np.float16)
    step = 16 * MiB
    for start in range(0, halves.shape[0], step):
        stop = min(start + step, halves.shape[0])
        halves[start:stop] = rng.standard_normal(stop - start, dtype=np.float32)
    return halves.view(np.uint8)[:nbytes]


def chain_keys(num_keys: int, namespace: str, seed: int) -> list[bytes]:
    """``num_keys`` keys of one chain of 16-token blocks."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 128_256, num_keys * 16, dtype=np.uint32)
    keys = kvstore.prefix_hashes(tokens, block_tokens=16, namespace=namespace)
    assert len(keys) == num_keys, "prefix_hashes returned the wrong number of keys"
    return keys


def slices(array: np.ndarray, value_bytes: int, num_values: int) -> list[np.ndarray]:
    return [array[i * value_bytes:(i + 1) * value_bytes] for i in range(num_values)]


def dram_pool_bytes(value_bytes: int, num_values: int, max_value_bytes: int) -> int:
    """A DRAM tier that holds ``num_values`` values in slabs of the largest value's class,
    plus two of them spare (the allocator cuts a pool of fewer than 64 finer)."""
    slab_bytes = size_class(max_value_bytes)
    per_slab = slab_bytes // size_class(value_bytes)
    return (-(-num_values // per_slab) + 2) * slab_bytes


def profile_top(fn: Callable[[], Any]) -> list[dict[str, Any]]:
    """The functions with the most own time in one call of ``fn`` under cProfile."""
    profiler = cProfile.Profile()
    profiler.runcall(fn)
    table = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    total_s = sum(row[2] for row in table.values()) or 1.0
    rows = sorted(table.items(), key=lambda item: item[1][2], reverse=True)
    top = []
    for (file, line, func), (_, num_calls, own_s, cum_s, _) in rows[:PROFILE_TOP]:
        where = f"{Path(file).name}:{line}({func})" if line else func
        top.append({"function": where, "calls": num_calls, "own_s": own_s, "cum_s": cum_s,
                    "own_share": own_s / total_s})
    return top


def profile_phases(phases: dict[str, Callable[[], Any]],
                   reset: Callable[[], Any] | None = None) -> dict[str, Any]:
    out = {}
    for name, fn in phases.items():
        if reset is not None and name.startswith("put"):
            reset()
        out[name] = profile_top(fn)
        log(f"  profile {name}: " + ", ".join(
            f"{r['function']} {r['own_share']:.0%}" for r in out[name][:4]))
    return out


# -- machine ----------------------------------------------------------------------------------


def mount_of(path: str) -> dict[str, Any]:
    """The mount holding ``path``: device, filesystem type, options (from /proc/mounts)."""
    path = os.path.realpath(path)
    best: dict[str, Any] = {}
    try:
        with open("/proc/mounts") as f:
            for line in f:
                device, mount_point, fstype, options = line.split()[:4]
                mount_point = mount_point.replace("\\040", " ")
                inside = path == mount_point or path.startswith(mount_point.rstrip("/") + "/")
                if inside and len(mount_point) >= len(best.get("mount_point", "")):
                    best = {"device": device, "mount_point": mount_point, "fstype": fstype,
                            "options": options}
    except OSError:
        return {"path": path, "fstype": "unknown"}
    best["path"] = path
    name = os.path.basename(os.path.realpath(best.get("device", "")))
    for sys_dir in (f"/sys/class/block/{name}", f"/sys/class/block/{name}/.."):
        for field, rel in (("rotational", "queue/rotational"), ("model", "device/model")):
            try:
                best.setdefault(field, Path(sys_dir, rel).read_text().strip())
            except OSError:
                pass
    try:
        st = os.statvfs(path)
        best["free_bytes"] = st.f_bavail * st.f_frsize
    except OSError:
        pass
    return best


def machine_info(nvme_dir: str | None) -> dict[str, Any]:
    cpu_model = platform.processor() or "unknown"
    mem_bytes = None
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        match = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
        cpu_model = match.group(1).strip() if match else cpu_model
        meminfo = Path("/proc/meminfo").read_text()
        match = re.search(r"^MemTotal:\s*(\d+) kB", meminfo, re.M)
        mem_bytes = int(match.group(1)) * 1024 if match else None
    except OSError:
        pass
    versions = {}
    for package in ("numpy", "xxhash", "lz4", "torch"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "cpu_model": cpu_model,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "memory_bytes": mem_bytes,
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "packages": versions,
        "kvstore": kvstore.__version__,
        "nvme_dir_filesystem": mount_of(nvme_dir) if nvme_dir else None,
    }


# -- DRAM -------------------------------------------------------------------------------------


def bench_dram(data: np.ndarray, value_bytes: int, total_bytes: int, repeats: int,
               profile: bool) -> dict[str, Any]:
    num_values = max(1, total_bytes // value_bytes)
    nbytes = num_values * value_bytes
    values = slices(data, value_bytes, num_values)
    out_pages = aligned(nbytes + 64)
    out = out_pages[:nbytes]
    outs = slices(out, value_bytes, num_values)
    out16 = out_pages[16:16 + nbytes]  # where a large np.empty array starts
    outs16 = slices(out16, value_bytes, num_values)
    reused = [aligned(value_bytes)] * num_values  # what `get` writes to: malloc recycles it
    keys = chain_keys(num_values, "bench-dram", seed=value_bytes)
    max_value_bytes = max(16 * MiB, value_bytes)
    config = kvstore.StoreConfig(
        dram_bytes=dram_pool_bytes(value_bytes, num_values, max_value_bytes),
        max_value_bytes=max_value_bytes, hbm_bytes=0)
    src = data[:nbytes]
    result: dict[str, Any] = {"value_bytes": value_bytes, "num_values": num_values,
                              "total_bytes": nbytes, "dram_bytes": config.dram_bytes}
    with kvstore.Store(config) as store:
        put, get, get_into = store.put, store.get, store.get_into

        def put_all() -> int:
            return sum(map(put, keys, values))

        def get_into_all() -> int:
            return sum(map(get_into, keys, outs))

        def get_into16_all() -> int:
            return sum(map(get_into, keys, outs16))

        def get_all() -> int:
            return sum(1 for value in map(get, keys) if value is not None)

        def delete_all() -> None:
            _deque(map(store.delete, keys), maxlen=0)

        # The first put faults in the pool's pages; later runs reuse them (steady state).
        put_cold_s, stored = timed(put_all)
        if stored != num_values:
            raise RuntimeError(f"DRAM store kept {stored} of {num_values} values")
        result["put_cold_gbps"] = gbps(nbytes, put_cold_s)
        delete_all()
        runs = []
        for repeat in range(repeats):
            memcpy_s, _ = timed(lambda: np.copyto(out, src))
            memcpy_chunked_s, _ = timed(
                lambda: _deque(map(np.copyto, outs, values), maxlen=0))
            put_s, stored = timed(put_all)
            if repeat == 0:
                out.fill(0)
            get_into_s, hits_into = timed(get_into_all)
            if repeat == 0:
                result["verified"] = bool(np.array_equal(out, src))
            get_s, hits = timed(get_all)
            memcpy_reused_s, _ = timed(
                lambda: _deque(map(np.copyto, reused, values), maxlen=0))
            memcpy16_s, _ = timed(lambda: _deque(map(np.copyto, outs16, values), maxlen=0))
            get_into16_s, hits16 = timed(get_into16_all)
            if not stored == hits_into == hits == hits16 == num_values:
                raise RuntimeError(f"DRAM run {repeat}: stored {stored}, get_into hits "
                                   f"{hits_into}, get hits {hits} of {num_values}")
            run = {
                "memcpy_gbps": gbps(nbytes, memcpy_s),
                "memcpy_chunked_gbps": gbps(nbytes, memcpy_chunked_s),
                "memcpy_reused_dst_gbps": gbps(nbytes, memcpy_reused_s),
                "put_gbps": gbps(nbytes, put_s),
                "get_gbps": gbps(nbytes, get_s),
                "get_into_gbps": gbps(nbytes, get_into_s),
                "put_ops_per_s": num_values / put_s,
                "get_ops_per_s": num_values / get_s,
                "get_into_ops_per_s": num_values / get_into_s,
                "memcpy_offset16_gbps": gbps(nbytes, memcpy16_s),
                "get_into_offset16_gbps": gbps(nbytes, get_into16_s),
            }
            # The raw limit of a store of N-byte values is memcpy in N-byte pieces (a store
            # cannot copy a value in one piece with its neighbours); one large memcpy of all
            # the bytes, which glibc runs with non-temporal stores, is reported beside it.
            for op in ("put", "get_into"):
                run[f"{op}_ratio"] = run[f"{op}_gbps"] / run["memcpy_chunked_gbps"]
                run[f"{op}_vs_one_memcpy"] = run[f"{op}_gbps"] / run["memcpy_gbps"]
            # `get` returns a fresh bytes object that the loop drops, so malloc hands the same
            # (cache-hot) block back every time: its raw limit copies into one reused buffer.
            run["get_ratio"] = run["get_gbps"] / run["memcpy_reused_dst_gbps"]
            run["get_vs_memcpy"] = run["get_gbps"] / run["memcpy_gbps"]
            run["get_into_offset16_ratio"] = (run["get_into_offset16_gbps"]
                                              / run["memcpy_offset16_gbps"])
            run["get_into_offset16_vs_aligned_memcpy"] = (run["get_into_offset16_gbps"]
                                                          / run["memcpy_gbps"])
            runs.append(run)
            delete_all()
        if profile:
            put_all()
            result["profile"] = profile_phases(
                {"get_into": get_into_all, "get": get_all, "put": put_all}, reset=delete_all)
    result.update(summarize(runs))
    applies = value_bytes >= DRAM_TARGET_MIN_BYTES
    result["target"] = {
        "ratio": DRAM_TARGET_RATIO, "applies": applies,
        "met": {op: result[f"{op}_ratio"] >= DRAM_TARGET_RATIO
                for op in ("put", "get", "get_into")} if applies else None,
    }
    result["runs"] = runs
    return result


# -- NVMe -------------------------------------------------------------------------------------


class PageCache:
    """Drops the page cache before a read pass: /proc/sys/vm/drop_caches, else fadvise."""

    def __init__(self) -> None:
        self.drop_caches_ok: bool | None = None
        self.drop_caches_error: str | None = None
        self.fadvise_files = 0

    def drop(self, *paths: str) -> None:
        os.sync()
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("1\n")
            self.drop_caches_ok = self.drop_caches_ok is not False
        except OSError as e:
            self.drop_caches_ok = False
            self.drop_caches_error = f"{type(e).__name__}: {e}"
        # Portable and unprivileged: evict each file's clean pages (after the sync above).
        if hasattr(os, "posix_fadvise"):
            for path in paths:
                for file in ([path] if os.path.isfile(path) else
                             [str(p) for p in Path(path).rglob("*") if p.is_file()]):
                    fd = os.open(file, os.O_RDONLY)
                    try:
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                        self.fadvise_files += 1
                    finally:
                        os.close(fd)

    def report(self) -> dict[str, Any]:
        return {"drop_caches_written": self.drop_caches_ok,
                "drop_caches_error": self.drop_caches_error,
                "fadvise_dontneed_calls": self.fadvise_files,
                "note": "before every read pass: sync, echo 1 > /proc/sys/vm/drop_caches, "
                        "then posix_fadvise(DONTNEED) on every file read"}


def raw_direct_io(path: str, src: memoryview, dst: memoryview, chunk_bytes: int,
                  num_chunks: int, cache: PageCache) -> dict[str, Any]:
    """pwrite+fsync then pread ``num_chunks`` chunks with O_DIRECT (buffered if refused)."""
    direct = getattr(os, "O_DIRECT", 0)
    run: dict[str, Any] = {"o_direct": bool(direct)}
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | direct, 0o644)
        try:
            os.pwrite(fd, src[:chunk_bytes], 0)
        except OSError as e:
            os.close(fd)
            run.update(o_direct=False, o_direct_error=str(e))
            direct = 0
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    except OSError as e:
        run.update(o_direct=False, o_direct_error=str(e))
        direct = 0
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        start_s = time.perf_counter()
        for i in range(num_chunks):
            offset = i * chunk_bytes
            os.pwrite(fd, src[offset:offset + chunk_bytes], offset)
        os.fsync(fd)
        run["write_s"] = time.perf_counter() - start_s
    finally:
        os.close(fd)
    cache.drop(path)
    fd = os.open(path, os.O_RDONLY | direct)
    try:
        start_s = time.perf_counter()
        for i in range(num_chunks):
            offset = i * chunk_bytes
            os.preadv(fd, [dst[offset:offset + chunk_bytes]], offset)
        run["read_s"] = time.perf_counter() - start_s
    finally:
        os.close(fd)
    run["verified"] = src[:num_chunks * chunk_bytes] == dst[:num_chunks * chunk_bytes]
    return run  # the file goes with the repeat's directory, once the store's run is timed


def remove_and_settle(path: str) -> None:
    """Delete a repeat's files, then let the device absorb it before the next timed phase:
    on a disk mounted with ``discard`` (this VM's), deleting hundreds of MiB issues TRIMs
    that slow whatever runs next, raw or store, by up to 2x."""
    shutil.rmtree(path, ignore_errors=True)
    settle()


def settle() -> None:
    os.sync()
    time.sleep(SETTLE_S)


def run_dd(path: str, nbytes: int, cache: PageCache) -> dict[str, Any]:
    """``dd`` with 4 MiB blocks and O_DIRECT: the device's sequential limit."""
    count = max(1, nbytes // (4 * MiB))
    figures: dict[str, Any] = {}
    commands = {
        "write": ["dd", "if=/dev/zero", f"of={path}", "bs=4M", f"count={count}",
                  "oflag=direct"],
        "read": ["dd", f"if={path}", "of=/dev/null", "bs=4M", "iflag=direct"],
    }
    for op, command in commands.items():
        if op == "read":
            cache.drop(path)
        proc = subprocess.run(command, capture_output=True, text=True, check=False)
        match = re.search(r"(\d+) bytes.*copied, ([0-9.]+) s", proc.stderr)
        if proc.returncode or not match:
            figures[f"{op}_error"] = proc.stderr.strip()[-300:]
            continue
        figures[f"{op}_gbps"] = gbps(int(match.group(1)), float(match.group(2)))
    figures["command_write"] = " ".join(commands["write"])
    if os.path.exists(path):
        os.unlink(path)
        settle()  # as `remove_and_settle` does
    return figures


def raw_read_files(path: str, chunk_bytes: int, buf: memoryview) -> tuple[float, int]:
    """O_DIRECT read of every file under ``path`` in ``chunk_bytes`` pieces: (seconds, bytes).

    Run on the store's own segment files right before the store reads them, so that the raw
    read and the store's read meet the disk (and any cache of the host under a virtual disk)
    in the same state.
    """
    direct = getattr(os, "O_DIRECT", 0)
    files = sorted(p for p in Path(path).rglob("*") if p.is_file() and p.stat().st_size)
    view = buf[:chunk_bytes]
    num_bytes = 0
    start_s = time.perf_counter()
    for file in files:
        try:
            fd = os.open(file, os.O_RDONLY | direct)
        except OSError:
            fd = os.open(file, os.O_RDONLY)
        try:
            offset = 0
            while True:
                got = os.preadv(fd, [view], offset)
                num_bytes += got
                offset += got
                if got < chunk_bytes:
                    break
        finally:
            os.close(fd)
    return time.perf_counter() - start_s, num_bytes


def dir_disk_bytes(path: str) -> int:
    return sum(p.stat().st_blocks * 512 for p in Path(path).rglob("*") if p.is_file())


def nvme_store_run(base_dir: str, data: np.ndarray, out_pages: np.ndarray, value_bytes: int,
                   num_values: int, keys: list[bytes], compression: str, cache: PageCache,
                   want_stats: bool, profile: bool, full: bool) -> dict[str, Any]:
    """put all + flush; reopen; get_into all; get all (page cache dropped before each).

    With ``full``, the store's reads are bracketed by two raw O_DIRECT reads of its segment
    files (their mean is ``raw_read_segments_gbps``), which cancels the drift of a shared or
    virtual disk; without it only put+flush and get_into run.
    """
    nbytes = num_values * value_bytes
    values = slices(data, value_bytes, num_values)
    out = out_pages[:nbytes]
    outs = slices(out, value_bytes, num_values)
    path = tempfile.mkdtemp(prefix=f"store-{compression}-", dir=base_dir)
    config = kvstore.StoreConfig(
        dram_bytes=0, nvme_path=path, nvme_bytes=2 * nbytes + 256 * MiB,
        max_value_bytes=max(16 * MiB, value_bytes), hbm_bytes=0,
        nvme_compression=compression)
    run: dict[str, Any] = {}
    # The directory stays until the repeat ends (`remove_and_settle`): deleting it now
    # would slow the phase timed next.
    store = kvstore.Store(config)
    try:
        def write_all() -> int:
            stored = sum(map(store.put, keys, values))
            store.flush()
            return stored

        write_s, stored = timed(write_all)
        if stored != num_values:
            raise RuntimeError(f"NVMe store ({compression}) kept {stored} of {num_values}")
        run["write_gbps"] = gbps(nbytes, write_s)
        run["write_ops_per_s"] = num_values / write_s
        tier_stats = store.stats()["tiers"]["nvme"]
        run["tier_used_bytes"] = tier_stats.get("used_bytes")
        if want_stats:
            run["tier_stats"] = tier_stats
    finally:
        store.close()
    run["disk_bytes"] = dir_disk_bytes(path)
    cache.drop(path)
    open_s, store = timed(lambda: kvstore.Store(config))
    try:
        run["reopen_s"] = open_s  # recovery: the index is rebuilt from the segments
        run["reopen_gbps"] = gbps(nbytes, open_s)
        chunk_bytes = -(-value_bytes // DIRECT_ALIGN_BYTES) * DIRECT_ALIGN_BYTES
        raw_gbps = []
        if full:
            cache.drop(path)
            raw_gbps.append(gbps(*reversed(raw_read_files(path, chunk_bytes,
                                                          memoryview(out_pages)))))
        out.fill(0)
        cache.drop(path)
        read_s, hits = timed(lambda: sum(map(store.get_into, keys, outs)))
        run["read_gbps"] = gbps(nbytes, read_s)
        run["read_ops_per_s"] = num_values / read_s
        run["verified"] = hits == num_values and bool(np.array_equal(out, data[:nbytes]))
        if full:
            cache.drop(path)
            get_s, hits = timed(
                lambda: sum(1 for v in map(store.get, keys) if v is not None))
            run["get_gbps"] = gbps(nbytes, get_s)
            if hits != num_values:
                run["get_misses"] = num_values - hits
            cache.drop(path)
            raw_gbps.append(gbps(*reversed(raw_read_files(path, chunk_bytes,
                                                          memoryview(out_pages)))))
            run["raw_read_segments_gbps"] = statistics.mean(raw_gbps)
            run["raw_read_segments_spread"] = max(raw_gbps) / min(raw_gbps)
        if profile:
            run["profile"] = profile_phases({
                "get_into": lambda: sum(map(store.get_into, keys, outs)),
                "get": lambda: sum(1 for v in map(store.get, keys) if v is not None)})
    finally:
        store.close()
    if profile:
        shutil.rmtree(path)
        with kvstore.Store(config) as store:
            run.setdefault("profile", {}).update(profile_phases(
                {"put+flush": lambda: (sum(map(store.put, keys, values)), store.flush())}))
    return run


def lz4_reference(values: Sequence[np.ndarray]) -> dict[str, Any]:
    """lz4.block on each value, one thread: the compression path's own limit."""
    import lz4.block

    nbytes = sum(v.shape[0] for v in values)
    packed = [lz4.block.compress(v, store_size=False) for v in values]
    # Timed without keeping the output, so that page faults of new memory do not count.
    compress_s, _ = timed(lambda: sum(len(lz4.block.compress(v, store_size=False))
                                      for v in values))
    sizes = [v.shape[0] for v in values]
    decompress_s, _ = timed(lambda: _deque(
        map(lambda p, n: lz4.block.decompress(p, uncompressed_size=n), packed, sizes),
        maxlen=0))
    return {"lz4_block_ratio": nbytes / sum(len(p) for p in packed),
            "lz4_compress_gbps": gbps(nbytes, compress_s),
            "lz4_decompress_gbps": gbps(nbytes, decompress_s)}


def bench_nvme(data: np.ndarray, sizes: list[int], totals: dict[int, int], repeats: int,
               base_dir: str, with_lz4: bool, with_dd: bool, profile: bool) -> dict[str, Any]:
    section: dict[str, Any] = {}
    try:
        import kvstore.tiers.nvme  # noqa: F401
    except Exception as e:
        log(f"NVMe store part skipped: import kvstore.tiers.nvme failed: {e!r}")
        section["store_available"] = False
        section["note"] = (f"import kvstore.tiers.nvme failed ({type(e).__name__}: {e}); "
                           "store figures skipped, raw limits still measured")
    else:
        section["store_available"] = True
    cache = PageCache()
    store_ok = section["store_available"]
    if with_dd:
        dd_total = max(totals[s] for s in sizes)
        dd_runs = []
        for repeat in range(repeats):
            log(f"nvme dd {size_label(dd_total)} run {repeat + 1}/{repeats}")
            dd_runs.append(run_dd(os.path.join(base_dir, "dd.bin"), dd_total, cache))
        section["dd"] = {**summarize(dd_runs), "total_bytes": dd_total,
                         "command_write": dd_runs[0].get("command_write"),
                         "note": "bytes from /dev/zero; the write has no fsync (as in "
                                 "`dd oflag=direct`)", "runs": dd_runs}
    dd_figures = section.get("dd", {})
    for value_bytes in sizes:
        num_values = max(1, totals[value_bytes] // value_bytes)
        nbytes = num_values * value_bytes
        chunk_bytes = -(-value_bytes // DIRECT_ALIGN_BYTES) * DIRECT_ALIGN_BYTES
        src = aligned(num_values * chunk_bytes)
        dst = aligned(num_values * chunk_bytes)
        src.reshape(num_values, chunk_bytes)[:, :value_bytes] = (
            data[:nbytes].reshape(num_values, value_bytes))
        keys = chain_keys(num_values, "bench-nvme", seed=value_bytes)
        values = slices(data, value_bytes, num_values)
        entry: dict[str, Any] = {"value_bytes": value_bytes, "num_values": num_values,
                                 "total_bytes": nbytes, "raw_chunk_bytes": chunk_bytes}
        runs = []
        compressions = ["none", "lz4"] if with_lz4 else ["none"]
        for repeat in range(repeats):
            log(f"nvme {size_label(value_bytes)} run {repeat + 1}/{repeats}")
            repeat_dir = tempfile.mkdtemp(prefix="repeat-", dir=base_dir)
            raw = raw_direct_io(os.path.join(repeat_dir, "raw.bin"), memoryview(src),
                                memoryview(dst), chunk_bytes, num_values, cache)
            run: dict[str, Any] = {
                "raw_write_gbps": gbps(nbytes, raw["write_s"]),
                "raw_read_gbps": gbps(nbytes, raw["read_s"]),
                "raw_o_direct": raw["o_direct"], "raw_verified": raw["verified"]}
            if "o_direct_error" in raw:
                run["raw_o_direct_error"] = raw["o_direct_error"]
            if with_lz4 and repeat == 0:
                entry["lz4_reference"] = lz4_reference(values)
            for compression in compressions if store_ok else []:
                prefix = "" if compression == "none" else "lz4_"
                try:
                    store_run = nvme_store_run(
                        repeat_dir, data, dst, value_bytes, num_values, keys, compression,
                        cache, want_stats=repeat == 0, profile=profile and repeat == 0,
                        full=compression == "none")
                except Exception as e:
                    log(f"  store ({compression}) failed: {e!r}")
                    entry[f"{prefix}store_error"] = "".join(
                        traceback.format_exception_only(type(e), e)).strip()
                    entry[f"{prefix}store_traceback"] = traceback.format_exc()[-2000:]
                    continue
                for key in ("tier_stats", "profile"):
                    if key in store_run:
                        entry[f"{prefix}{key}"] = store_run.pop(key)
                run.update({f"{prefix}{k}": v for k, v in store_run.items()})
            if "write_gbps" in run:
                run["write_ratio"] = run["write_gbps"] / run["raw_write_gbps"]
                run["read_ratio"] = run["read_gbps"] / run["raw_read_gbps"]
                run["get_ratio"] = run["get_gbps"] / run["raw_read_gbps"]
                run["read_ratio_vs_segments"] = (run["read_gbps"]
                                                 / run["raw_read_segments_gbps"])
                run["get_ratio_vs_segments"] = run["get_gbps"] / run["raw_read_segments_gbps"]
                if "write_gbps" in dd_figures:
                    run["write_ratio_vs_dd"] = run["write_gbps"] / dd_figures["write_gbps"]
                if "read_gbps" in dd_figures:
                    run["read_ratio_vs_dd"] = run["read_gbps"] / dd_figures["read_gbps"]
            if "lz4_write_gbps" in run and "write_gbps" in run:
                run["lz4_write_vs_uncompressed"] = run["lz4_write_gbps"] / run["write_gbps"]
                run["lz4_read_vs_uncompressed"] = run["lz4_read_gbps"] / run["read_gbps"]
                if run.get("tier_used_bytes") and run.get("lz4_tier_used_bytes"):
                    run["lz4_compression_ratio"] = (run["tier_used_bytes"]
                                                    / run["lz4_tier_used_bytes"])
                if run.get("disk_bytes") and run.get("lz4_disk_bytes"):
                    run["lz4_disk_ratio"] = run["disk_bytes"] / run["lz4_disk_bytes"]
            runs.append(run)
            remove_and_settle(repeat_dir)
        del src, dst
        entry.update(summarize(runs))
        if "write_ratio" in entry:
            entry["target"] = {"ratio": NVME_TARGET_RATIO, "met": {
                "write": entry["write_ratio"] >= NVME_TARGET_RATIO,
                "read": entry["read_ratio"] >= NVME_TARGET_RATIO,
                "read_vs_segments": entry["read_ratio_vs_segments"] >= NVME_TARGET_RATIO}}
        entry["runs"] = runs
        section[size_label(value_bytes)] = entry
    section["page_cache"] = cache.report()
    section["config"] = {"dram_bytes": 0, "note": "NVMe-only Store (dram_bytes=0): every put "
                         "goes to NVMe, every get reads NVMe (nothing to promote into)",
                         "values": "fp16 N(0,1) bytes", "nvme_direct_io": True}
    return section


# -- pool use with mixed sizes -----------------------------------------------------------------

# (label, dram_bytes, max_value_bytes; None: derived from the pool)
USE_POOLS = [("1MiB pool, 1MiB max", 1 * MiB, 1 * MiB), ("1MiB pool", 1 * MiB, None),
             ("8MiB pool", 8 * MiB, None), ("1GiB pool, 16MiB max", 1 * GiB, 16 * MiB)]
USE_MIXES = {"1-8KiB": "uniform 1 KiB to 8 KiB", "1KiB-256KiB": "log-uniform 1 KiB to 256 KiB"}
USE_OFFERED = 1.5  # the overfilled pool is offered this many times its capacity


def use_sizes(mix: str, max_value_bytes: int, total_bytes: int, seed: int) -> list[int]:
    """Seeded value sizes of ``mix`` that add up to about ``total_bytes``."""
    rng = np.random.default_rng(seed)
    sizes: list[int] = []
    while sum(sizes) < total_bytes:
        if mix == "1-8KiB":
            batch = rng.integers(1 * KiB, 8 * KiB, 4096, endpoint=True)
        else:
            batch = np.exp(rng.uniform(np.log(1 * KiB), np.log(256 * KiB), 4096)).astype(int)
        sizes.extend(int(n) for n in np.minimum(batch, max_value_bytes))
    total = np.cumsum(sizes)
    return sizes[:int(np.searchsorted(total, total_bytes)) + 1]


def fill_pool(store: kvstore.Store, data: np.ndarray, sizes: list[int], tag: str) -> int:
    """Put values of ``sizes`` under fresh keys (bytes of ``data``); how many were taken."""
    put = store.put
    return sum(put(hashlib.blake2b(f"{tag}{i}".encode(), digest_size=16).digest(), data[:n])
               for i, n in enumerate(sizes))


def bench_pool_use(data: np.ndarray) -> dict[str, Any]:
    """How much of a pool holds values of a seeded mix of sizes, small pools beside a large
    one. The limit is a byte-exact LRU cache: the newest values that fit in the capacity.

    ``half``: values adding up to half the pool, into an empty one (all should stay);
    ``overfilled``: values adding up to ``USE_OFFERED`` times the pool.
    """
    section: dict[str, Any] = {"mixes": USE_MIXES, "offered_times_capacity": USE_OFFERED,
                               "limit": "a byte-exact LRU cache of the pool's capacity: "
                                        "the newest values that fit"}
    for label, dram_bytes, max_value_bytes in USE_POOLS:
        config = kvstore.StoreConfig(dram_bytes=dram_bytes, max_value_bytes=max_value_bytes,
                                     hbm_bytes=0)
        entry: dict[str, Any] = {"dram_bytes": dram_bytes,
                                 "max_value_bytes": config.max_value_bytes}
        for seed, mix in enumerate(USE_MIXES):
            log(f"pool use: {label}, {mix}")
            with kvstore.Store(config) as store:
                capacity = store.stats()["tiers"]["dram"]["capacity_bytes"]
                half = use_sizes(mix, config.max_value_bytes, capacity // 2, seed)
                half_kept = fill_pool(store, data, half, "half")
                half_held = store.stats()["tiers"]["dram"]["blocks"]
            with kvstore.Store(config) as store:
                sizes = use_sizes(mix, config.max_value_bytes, int(USE_OFFERED * capacity),
                                  seed)
                fill_pool(store, data, sizes, "full")
                tier = store.stats()["tiers"]["dram"]
            lru_bytes = lru_count = 0
            for n in reversed(sizes):
                if lru_bytes + n > capacity:
                    break
                lru_bytes += n
                lru_count += 1
            entry["slab_bytes"] = tier["slab_bytes"]
            entry[mix] = {
                "half": {"values_offered": len(half), "values_kept": half_held,
                         "puts_true": half_kept},
                "overfilled": {
                    "values_offered": len(sizes), "values_kept": tier["blocks"],
                    "value_fraction": tier["value_bytes"] / capacity,
                    "slot_fraction": tier["used_bytes"] / capacity,
                    "limit_values_kept": lru_count, "limit_value_fraction": lru_bytes / capacity,
                    "value_ratio": tier["value_bytes"] / lru_bytes,
                    "kept_ratio": tier["blocks"] / lru_count},
            }
        section[label] = entry
    return section


# -- batch ops and prefix hashing ---------------------------------------------------------------


def bench_batch(data: np.ndarray, value_bytes: int, num_chains: int, chain_len: int,
                repeats: int, profile: bool) -> dict[str, Any]:
    num_ops = num_chains * chain_len
    values = slices(data, value_bytes, num_ops)
    chains = []  # each chain its own prefix tree, as one request's blocks would be
    rng = np.random.default_rng(value_bytes)
    for c in range(num_chains):
        tokens = rng.integers(0, 128_256, chain_len * 16, dtype=np.uint32)
        chain = kvstore.prefix_hashes(tokens, block_tokens=16, namespace="bench-batch")
        chains.append((chain, values[c * chain_len:(c + 1) * chain_len]))
    keys = [k for chain, _ in chains for k in chain]
    max_value_bytes = 16 * MiB
    config = kvstore.StoreConfig(
        dram_bytes=dram_pool_bytes(value_bytes, num_ops, max_value_bytes),
        max_value_bytes=max_value_bytes, hbm_bytes=0)
    pool = aligned(num_ops * value_bytes)
    result: dict[str, Any] = {"value_bytes": value_bytes, "chain_len": chain_len,
                              "num_chains": num_chains, "num_ops": num_ops}

    def floor_put() -> dict[bytes, int]:
        table: dict[bytes, int] = {}
        offset = 0
        copyto = np.copyto
        for chain, chain_values in chains:
            for key, value in zip(chain, chain_values, strict=True):
                copyto(pool[offset:offset + value_bytes], value)
                table[key] = offset
                offset += value_bytes
        return table

    def floor_get(table: dict[bytes, int]) -> int:
        found = 0
        for chain, _ in chains:
            got = [pool[o:o + value_bytes].tobytes() for o in map(table.__getitem__, chain)]
            found += len(got)
        return found

    with kvstore.Store(config) as store:
        def put_many_all() -> int:
            return sum(store.put_many(chain, chain_values) for chain, chain_values in chains)

        def get_many_all() -> int:
            return sum(sum(v is not None for v in store.get_many(chain)) for chain, _ in chains)

        def delete_all() -> None:
            _deque(map(store.delete, keys), maxlen=0)

        put_many_all()  # fault in the pool's pages
        delete_all()
        runs = []
        for repeat in range(repeats):
            floor_put_s, table = timed(floor_put)
            floor_get_s, _ = timed(lambda table=table: floor_get(table))
            put_s, stored = timed(put_many_all)
            get_s, hits = timed(get_many_all)
            if not stored == hits == num_ops:
                raise RuntimeError(f"batch run {repeat}: stored {stored}, hits {hits} of "
                                   f"{num_ops}")
            run = {"put_many_ops_per_s": num_ops / put_s, "get_many_ops_per_s": num_ops / get_s,
                   "floor_put_ops_per_s": num_ops / floor_put_s,
                   "floor_get_ops_per_s": num_ops / floor_get_s,
                   "put_many_us_per_op": put_s / num_ops * 1e6,
                   "get_many_us_per_op": get_s / num_ops * 1e6}
            run["put_many_ratio"] = run["put_many_ops_per_s"] / run["floor_put_ops_per_s"]
            run["get_many_ratio"] = run["get_many_ops_per_s"] / run["floor_get_ops_per_s"]
            runs.append(run)
            delete_all()
        if profile:
            put_many_all()
            result["profile"] = profile_phases(
                {"get_many": get_many_all, "put_many": put_many_all}, reset=delete_all)
    result.update(summarize(runs))
    result["target"] = {"ops_per_s": BATCH_TARGET_OPS_PER_S, "met": {
        op: result[f"{op}_ops_per_s"] >= BATCH_TARGET_OPS_PER_S
        for op in ("put_many", "get_many")}}
    result["runs"] = runs
    return result


def bench_prefix_hash(num_tokens: int, block_tokens: int, repeats: int,
                      profile: bool) -> dict[str, Any]:
    tokens = np.random.default_rng(block_tokens).integers(0, 128_256, num_tokens,
                                                          dtype=np.uint32)
    token_list = tokens.tolist()
    token_bytes = tokens.astype("<u4").tobytes()
    ns_key = hashlib.blake2b(b"bench", digest_size=32).digest()
    runs = []
    for _ in range(repeats):
        numpy_s, keys = timed(lambda: kvstore.prefix_hashes(
            tokens, block_tokens=block_tokens, namespace="bench"))
        list_s, _ = timed(lambda: kvstore.prefix_hashes(
            token_list, block_tokens=block_tokens, namespace="bench"))
        raw_s, _ = timed(lambda: hashlib.blake2b(token_bytes, key=ns_key,
                                                 digest_size=16).digest())
        run = {"tokens_per_s": num_tokens / numpy_s, "list_tokens_per_s": num_tokens / list_s,
               "raw_blake2b_tokens_per_s": num_tokens / raw_s,
               "blocks_per_s": len(keys) / numpy_s}
        run["ratio"] = run["tokens_per_s"] / run["raw_blake2b_tokens_per_s"]
        runs.append(run)
    result: dict[str, Any] = {"num_tokens": num_tokens, "block_tokens": block_tokens,
                              **summarize(runs), "runs": runs}
    if profile:
        result["profile"] = profile_phases({"prefix_hashes": lambda: kvstore.prefix_hashes(
            tokens, block_tokens=block_tokens, namespace="bench")})
    return result


# -- main -------------------------------------------------------------------------------------


def default_total_bytes(value_bytes: int, tier: str) -> int:
    """512 MiB of large values; for small ones, a count of values that runs in about a second."""
    count = 16_384 if tier == "dram" else 4_096
    return min(512 * MiB, value_bytes * count)


def default_nvme_base() -> str:
    """A directory on the repository's filesystem (never tmpfs): /var/tmp or the repo's parent."""
    repo_dev = os.stat(_REPO).st_dev
    candidates = ["/var/tmp", str(_REPO.parent)]
    usable = [c for c in candidates if os.path.isdir(c) and os.access(c, os.W_OK)
              and mount_of(c).get("fstype") not in ("tmpfs", "ramfs")]
    for candidate in usable:
        if os.stat(candidate).st_dev == repo_dev:
            return candidate
    return usable[0] if usable else str(_REPO.parent)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="kvstore storage benchmark: prints one JSON document, every store "
                    "figure beside its raw limit (memcpy, O_DIRECT I/O, dd) and the ratio.")
    parser.add_argument("--sizes", default="4KiB,256KiB,4MiB",
                        help="value sizes for the DRAM and NVMe sections (default: %(default)s)")
    parser.add_argument("--total-bytes", default=None,
                        help="bytes per size per run (default: 512MiB for large values, "
                             "16384 values (DRAM) / 4096 values (NVMe) for small ones)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="runs per figure; the median is reported (default: 5, quick: 2)")
    parser.add_argument("--nvme-dir", default=None,
                        help="where the NVMe files go (a fresh subdirectory, removed after); "
                             "default: /var/tmp or the repo's parent, on the repo's filesystem")
    parser.add_argument("--tiers", default="dram,nvme", help="tiers to bench: dram,nvme")
    parser.add_argument("--skip", default="",
                        help="comma list of parts to leave out: batch, prefix, lz4, dd, use "
                             "(the use of small and large pools with mixed sizes)")
    parser.add_argument("--batch-chains", type=int, default=None,
                        help="chains of 64 keys per batch_ops run (default: 512, quick: 32)")
    parser.add_argument("--prefix-tokens", type=int, default=None,
                        help="tokens hashed per prefix_hash run (default: 1M, quick: 64K)")
    parser.add_argument("--quick", action="store_true",
                        help="small totals and 2 repeats: a smoke run of every section")
    parser.add_argument("--profile", action="store_true",
                        help="also run each store phase once under cProfile (untimed) and "
                             "report its top functions")
    parser.add_argument("--json-out", default=None, help="also write the JSON to this file")
    args = parser.parse_args(argv)
    args.sizes = [parse_size(s.strip(), what="--sizes") for s in args.sizes.split(",")
                  if s.strip()]
    args.tiers = {t.strip() for t in args.tiers.split(",") if t.strip()}
    if not args.tiers <= {"dram", "nvme"}:
        parser.error(f"--tiers takes dram and/or nvme, got {sorted(args.tiers)}")
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if not args.skip <= {"batch", "prefix", "lz4", "dd", "use"}:
        parser.error(f"--skip takes batch, prefix, lz4, dd, use; got {sorted(args.skip)}")
    if args.total_bytes is not None:
        args.total_bytes = parse_size(args.total_bytes, what="--total-bytes")
    if args.repeats is None:
        args.repeats = 2 if args.quick else 5
    if args.repeats < 1 or not args.sizes or min(args.sizes) <= 0:
        parser.error("--repeats and every size must be positive")
    if args.batch_chains is None:
        args.batch_chains = 32 if args.quick else 512
    if args.prefix_tokens is None:
        args.prefix_tokens = 65_536 if args.quick else 1_000_000
    return args


def totals_for(args: argparse.Namespace, tier: str) -> dict[int, int]:
    if args.total_bytes is not None:
        return {s: max(s, args.total_bytes) for s in args.sizes}
    if args.quick:
        return {s: max(s, min(16 * MiB, 1024 * s)) for s in args.sizes}
    return {s: default_total_bytes(s, tier) for s in args.sizes}


def targets_summary(doc: dict[str, Any]) -> list[dict[str, Any]]:
    checks = []
    for label, entry in doc.get("dram", {}).items():
        if entry.get("target", {}).get("applies"):
            for op in ("put", "get", "get_into"):
                checks.append({"check": f"dram {label} {op} / memcpy",
                               "value": entry[f"{op}_ratio"], "target": DRAM_TARGET_RATIO,
                               "met": entry[f"{op}_ratio"] >= DRAM_TARGET_RATIO})
    for label, entry in doc.get("nvme", {}).items():
        if isinstance(entry, dict) and "target" in entry:
            for op, field, raw in (("write", "write_ratio", "raw O_DIRECT file"),
                                   ("read", "read_ratio", "raw O_DIRECT file"),
                                   ("read", "read_ratio_vs_segments",
                                    "raw O_DIRECT read of its segments")):
                if field in entry:
                    checks.append({"check": f"nvme {label} {op} / {raw}",
                                   "value": entry[field], "target": NVME_TARGET_RATIO,
                                   "met": entry[field] >= NVME_TARGET_RATIO})
    for label, entry in doc.get("batch_ops", {}).items():
        for op in ("put_many", "get_many"):
            value = entry[f"{op}_ops_per_s"]
            checks.append({"check": f"batch {label} {op} ops/s", "value": value,
                           "target": BATCH_TARGET_OPS_PER_S,
                           "met": value >= BATCH_TARGET_OPS_PER_S})
    return checks


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started_s = time.perf_counter()
    base_dir = None
    if "nvme" in args.tiers:
        parent = args.nvme_dir or default_nvme_base()
        os.makedirs(parent, exist_ok=True)
        base_dir = tempfile.mkdtemp(prefix="kvstore-bench-", dir=parent)
    dram_totals, nvme_totals = totals_for(args, "dram"), totals_for(args, "nvme")
    doc: dict[str, Any] = {
        "benchmark": "kvstore/benchmarks/store_bench.py",
        "units": {"gbps": "1e9 bytes per second", "ratio": "store / raw limit, median of "
                  "per-run ratios", "figures": "median over runs"},
        "raw_limits": {
            "dram memcpy_chunked": "np.copyto of each value into its own place in a "
                                   "page-aligned array: the raw limit of put and get_into "
                                   "(put_ratio, get_into_ratio)",
            "dram memcpy": "one np.copyto of the whole total between page-aligned arrays "
                           "(glibc uses non-temporal stores for it; *_vs_one_memcpy)",
            "dram memcpy_reused_dst": "np.copyto of each value into one reused buffer: the "
                                      "limit for `get`, whose dropped bytes object malloc "
                                      "recycles (cache-hot)",
            "dram memcpy_offset16": "np.copyto of each value into a destination 16 bytes "
                                    "past 64-byte alignment (a large np.empty array)",
            "nvme raw": "O_DIRECT pwrite of value-size chunks + fsync, O_DIRECT pread back",
            "nvme raw_read_segments": "O_DIRECT read of the store's own segment files in "
                                      "value-size chunks, just before and just after the "
                                      "store reads them (mean of the two)",
            "nvme dd": "dd bs=4M oflag=direct / iflag=direct (the device's sequential limit)",
            "batch floor": "a Python dict + np.copyto per op: the floor of any Python store",
            "prefix_hash raw": "one keyed BLAKE2b over all the token bytes"},
        "config": {"sizes": [size_label(s) for s in args.sizes], "repeats": args.repeats,
                   "quick": args.quick, "tiers": sorted(args.tiers), "skip": sorted(args.skip),
                   "dram_total_bytes": {size_label(s): t for s, t in dram_totals.items()},
                   "nvme_total_bytes": {size_label(s): t for s, t in nvme_totals.items()},
                   "nvme_dir": base_dir, "gc": "enabled (as in a server)",
                   "profile": args.profile},
        "machine": machine_info(base_dir),
    }
    nvme_fs = (doc["machine"]["nvme_dir_filesystem"] or {}).get("fstype")
    if nvme_fs in ("tmpfs", "ramfs"):
        doc["config"]["nvme_dir_warning"] = f"{base_dir} is on {nvme_fs}: not a disk"
    needed = max([*dram_totals.values(), *nvme_totals.values(), args.batch_chains * 64 * 4096])
    log(f"generating {size_label(needed) if needed % KiB == 0 else needed} of fp16 KV-like "
        "values")
    data = kv_like_bytes(needed)
    try:
        if "dram" in args.tiers:
            doc["dram"] = {}
            for value_bytes in args.sizes:
                log(f"dram {size_label(value_bytes)} x {args.repeats}")
                doc["dram"][size_label(value_bytes)] = bench_dram(
                    data, value_bytes, dram_totals[value_bytes], args.repeats, args.profile)
                gc.collect()
        if "nvme" in args.tiers:
            assert base_dir is not None
            doc["nvme"] = bench_nvme(data, args.sizes, nvme_totals, args.repeats, base_dir,
                                     "lz4" not in args.skip, "dd" not in args.skip,
                                     args.profile)
            gc.collect()
        if "dram" in args.tiers and "use" not in args.skip:
            doc["pool_use"] = bench_pool_use(data)
            gc.collect()
        if "batch" not in args.skip:
            doc["batch_ops"] = {}
            for value_bytes in (4096, 256):
                log(f"batch_ops {size_label(value_bytes)} x {args.repeats}")
                doc["batch_ops"][size_label(value_bytes)] = bench_batch(
                    data, value_bytes, args.batch_chains, 64, args.repeats, args.profile)
        if "prefix" not in args.skip:
            doc["prefix_hash"] = {}
            for block_tokens in (16, 256):
                log(f"prefix_hash block_tokens={block_tokens} x {args.repeats}")
                doc["prefix_hash"][f"block_tokens_{block_tokens}"] = bench_prefix_hash(
                    args.prefix_tokens, block_tokens, args.repeats, args.profile)
    finally:
        if base_dir is not None:
            shutil.rmtree(base_dir, ignore_errors=True)
    doc["targets"] = targets_summary(doc)
    emit(doc, started_s, args.json_out)
    return 0


def quit_worker(process: subprocess.Popen[str], wait_s: float) -> None:
    """End a worker process that reads commands on its stdin: ``quit``, then a kill if it
    has not exited within ``wait_s``."""
    if process.poll() is not None:
        return
    with contextlib.suppress(OSError):
        assert process.stdin is not None
        process.stdin.write("quit\n")
        process.stdin.close()
    try:
        process.wait(wait_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def emit(doc: dict[str, Any], started_s: float, json_out: str | None) -> None:
    """Finish a benchmark: load average and elapsed time into ``doc``, print it as JSON
    (and write it to ``json_out``)."""
    if hasattr(os, "getloadavg"):  # other work on the machine makes the figures noisy
        doc["machine"]["loadavg_at_end"] = list(os.getloadavg())
    doc["elapsed_s"] = time.perf_counter() - started_s
    text = json.dumps(rounded(doc), indent=1)
    print(text)
    if json_out:
        Path(json_out).write_text(text + "\n")
    log(f"done in {doc['elapsed_s']:.0f} s")


if __name__ == "__main__":
    sys.exit(main())

"""What the machine can give the DRAM pool, checked before the pool is allocated.

A pool larger than that fails late, and takes others with it: the kernel hands out memory
it does not have, so the daemon's memory climbs while the pool is faulted in until the
OOM killer picks a process (not always the daemon), or the machine swaps; a shared pool
that /dev/shm cannot hold stops with an error once it has filled /dev/shm (before
`kvstore.tiers.dram` allocated it up front, the first touch of a page with no room behind
it was a SIGBUS). Three limits apply, and the pool must fit under each that is set:

- MemAvailable (/proc/meminfo): what the kernel can give without swapping;
- the free space of /dev/shm, for a shared pool (it lives there);
- the memory cgroup's limit less what the cgroup uses, not counting inactive file cache
  (reclaimable), at each level up from this process's cgroup (v2 ``memory.max``, v1
  ``memory.limit_in_bytes``).

HBM pools are the GPU's business (the CUDA allocator refuses what does not fit).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from kvstore.errors import ConfigError
from kvstore.shm.mapping import SHM_DIR
from kvstore.units import format_bytes

log = logging.getLogger(__name__)

_UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as about 2**63


@dataclass(frozen=True, slots=True)
class MemoryLimit:
    """One bound on the pool: how many bytes it leaves, and where that was read."""

    available_bytes: int
    source: str

    def __str__(self) -> str:
        return f"{format_bytes(self.available_bytes)} {self.source}"


def check_pool_fits(pool_bytes: int, *, shared: bool, force: bool) -> None:
    """Refuse a ``--dram`` pool over any limit (`ConfigError`), or with ``force`` warn."""
    over = [limit for limit in memory_limits(shared=shared)
            if pool_bytes > limit.available_bytes]
    if not over:
        return
    message = (f"--dram {format_bytes(pool_bytes)} is more than this machine can give: "
               + "; ".join(map(str, over)))
    if not force:
        raise ConfigError(f"{message}. Give a smaller --dram, or --force to start anyway")
    log.warning("%s; starting anyway (--force)", message)


def memory_limits(*, shared: bool) -> list[MemoryLimit]:
    limits = [mem_available(), shm_free() if shared else None, cgroup_limit()]
    return [limit for limit in limits if limit is not None]


def mem_available(meminfo: str | Path = "/proc/meminfo") -> MemoryLimit | None:
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    kib = int(line.split()[1])
                    return MemoryLimit(kib * 1024, "available (MemAvailable in /proc/meminfo)")
    except OSError:
        pass
    return None


def shm_free(path: str = SHM_DIR) -> MemoryLimit | None:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return MemoryLimit(st.f_bavail * st.f_frsize,
                       f"free in {path}, where the shared pool lives (see df {path})")


def cgroup_limit(proc_cgroup: str | Path = "/proc/self/cgroup",
                 root: str | Path = "/sys/fs/cgroup") -> MemoryLimit | None:
    """The tightest memory cgroup limit over this process, as bytes it leaves; None if
    no limit is set (or cgroups cannot be read)."""
    root = Path(root)
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    tightest: MemoryLimit | None = None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: the unified hierarchy
            base, files = root, ("memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):  # v1: the memory controller's own
            base = root / "memory"
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        else:
            continue
        for limit in _levels(base, path, *files):
            if tightest is None or limit.available_bytes < tightest.available_bytes:
                tightest = limit
    return tightest


def _levels(base: Path, path: str, max_file: str, usage_file: str,
            inactive_key: str) -> list[MemoryLimit]:
    """The limit at each level from this process's cgroup up to ``base``."""
    here = base / path.lstrip("/")
    if not here.is_dir():  # a cgroup namespace: our own cgroup is the root we see
        here = base
    limits = []
    while True:
        limit_bytes = _read_bytes(here / max_file)
        if limit_bytes is not None and limit_bytes < _UNLIMITED:
            used = (_read_bytes(here / usage_file) or 0) - _inactive_file(here, inactive_key)
            limits.append(MemoryLimit(
                max(limit_bytes - max(used, 0), 0),
                f"left in the memory cgroup (limit {format_bytes(limit_bytes)} in "
                f"{here / max_file})"))
        if here == base or base not in here.parents:
            return limits
        here = here.parent


def _read_bytes(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return None if text == "max" or not text.isdigit() else int(text)


def _inactive_file(cgroup: Path, key: str) -> int:
    try:
        for line in (cgroup / "memory.stat").read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0

"""The limits a DRAM pool is checked against: read from the files the kernel writes.

The cgroup cases use a tree laid out as the kernel lays out /sys/fs/cgroup (this machine
sets no limit, and tests may not make one); the daemon tests in test_lifecycle.py check
the refusal end to end against this machine's MemAvailable and /dev/shm.
"""

from __future__ import annotations

import pytest

from daemon.host_memory import (
    cgroup_limit,
    check_pool_fits,
    mem_available,
    memory_limits,
    shm_free,
)
from kvstore.errors import ConfigError

GiB = 1 << 30


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_limit_is_the_tightest_level_less_its_use_not_counting_inactive_cache(
        tmp_path):
    root = tmp_path / "cgroup"
    write(tmp_path / "self-cgroup", "0::/kubepods/pod1/ctr\n")
    write(root / "kubepods/memory.max", f"{16 * GiB}\n")
    write(root / "kubepods/memory.current", f"{10 * GiB}\n")  # 6 GiB left here
    write(root / "kubepods/pod1/memory.max", "max\n")
    write(root / "kubepods/pod1/ctr/memory.max", f"{8 * GiB}\n")
    write(root / "kubepods/pod1/ctr/memory.current", f"{5 * GiB}\n")
    write(root / "kubepods/pod1/ctr/memory.stat", f"anon 1\ninactive_file {3 * GiB}\n")
    limit = cgroup_limit(tmp_path / "self-cgroup", root)  # ctr: 8 - (5 - 3) = 6 GiB left
    assert limit is not None and limit.available_bytes == 6 * GiB
    assert "ctr/memory.max" in limit.source
    write(root / "kubepods/pod1/ctr/memory.stat", "inactive_file 0\n")
    assert cgroup_limit(tmp_path / "self-cgroup", root).available_bytes == 3 * GiB


def test_cgroup_v1_limit_and_no_limit(tmp_path):
    root = tmp_path / "cgroup"
    write(tmp_path / "self-cgroup", "5:cpu,cpuacct:/a\n4:memory:/a\n0::/\n")
    write(root / "memory/memory.limit_in_bytes", "9223372036854771712\n")  # none
    write(root / "memory/a/memory.limit_in_bytes", f"{4 * GiB}\n")
    write(root / "memory/a/memory.usage_in_bytes", f"{GiB}\n")
    write(root / "memory/a/memory.stat", "total_inactive_file 0\n")
    assert cgroup_limit(tmp_path / "self-cgroup", root).available_bytes == 3 * GiB
    write(root / "memory/a/memory.limit_in_bytes", "9223372036854771712\n")
    assert cgroup_limit(tmp_path / "self-cgroup", root) is None


def test_this_machines_limits_are_read():
    assert mem_available().available_bytes > 0
    assert shm_free().available_bytes > 0
    assert any("/dev/shm" in limit.source for limit in memory_limits(shared=True))
    assert not any("/dev/shm" in limit.source for limit in memory_limits(shared=False))


def test_a_pool_over_a_limit_is_refused_naming_dram_and_force_only_warns(caplog):
    too_big = mem_available().available_bytes + 8 * GiB
    with pytest.raises(ConfigError, match=r"--dram .* is more than .*MemAvailable.*--force"):
        check_pool_fits(too_big, shared=False, force=False)
    check_pool_fits(too_big, shared=False, force=True)
    assert "starting anyway (--force)" in caplog.text
    check_pool_fits(GiB // 16, shared=True, force=False)  # fits: no word

"""Shared fixtures and the `gpu` marker: GPU tests skip where CUDA is absent."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--reliability-scale", default=None, type=float,
                     help="run the reliability suite N times longer than CI does "
                          "(rounds, frames); default $KVSTORE_RELIABILITY_SCALE or 1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def make_key(i: int | str) -> bytes:
    """A deterministic 16-byte test key."""
    return hashlib.blake2b(str(i).encode(), digest_size=16).digest()


def make_value(i: int | str, nbytes: int) -> bytes:
    """Deterministic bytes derived from ``i`` (so a reader can verify any value it gets)."""
    seed = hashlib.blake2b(str(i).encode(), digest_size=64).digest()
    return (seed * (nbytes // 64 + 1))[:nbytes]


@pytest.fixture
def tmpfs(tmp_path):
    """``tmpfs(size)`` -> a directory on a fresh tmpfs of that size (a disk that fills up
    for real), unmounted at teardown; skips where mounting is not allowed (not root)."""
    import subprocess

    mounted: list[str] = []

    def mount(size: str) -> Path:
        path = tmp_path / f"tmpfs-{len(mounted)}"
        path.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                               str(path)], capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
        mounted.append(str(path))
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", path], check=False)


def fill_disk(path: Path) -> None:
    """Write zeros into the new file ``path`` until its filesystem is full (ENOSPC)."""
    import errno

    block = bytes(64 * 1024)
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(block)
        except OSError as e:
            assert e.errno == errno.ENOSPC, e

"""Shared fixtures and the `gpu` marker: GPU tests skip where CUDA is absent."""

from __future__ import annotations

import hashlib

import pytest


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


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

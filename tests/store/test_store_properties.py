"""Property tests: random put/get/delete/flush/reopen sequences against a dict model.

Invariants checked after every step:
- every tier keeps ``used_bytes <= capacity_bytes``, and the NVMe segment files on disk
  never exceed ``nvme_bytes``;
- a read returns either a miss or exactly the last value acknowledged for that key
  (a cache may drop anything, but never serves a wrong or stale value);
- a deleted key stays deleted, also across reopen;
- right after a successful put, the value is readable.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import hypothesis.strategies as st
import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import kvstore
from kvstore import Store, StoreConfig

KiB = 1024
CHAIN = kvstore.prefix_hashes(np.arange(16 * 12), block_tokens=16, namespace="prop")
SIZES = st.sampled_from([0, 1, 100, 4 * KiB, 4 * KiB + 1, 9 * KiB, 16 * KiB])


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="kvstore-prop-"))
        self.config = StoreConfig(
            dram_bytes=4 * 16 * KiB, max_value_bytes=16 * KiB,
            nvme_path=str(self.dir / "nvme"), nvme_bytes=512 * KiB,
            nvme_segment_bytes=64 * KiB, eviction_policy=self.policy)
        self.store = Store(self.config)
        self.model: dict[bytes, bytes] = {}
        self.version = 0

    policy = "leaf-lru"

    def _value(self, nbytes: int) -> bytes:
        self.version += 1
        stamp = self.version.to_bytes(4, "little")
        return (stamp * (nbytes // 4 + 1))[:nbytes] if nbytes >= 4 else stamp[:nbytes]

    def _check_read(self, key: bytes, got: bytes | None) -> None:
        if got is not None:
            assert key in self.model, "a deleted or never-written key was served"
            assert got == self.model[key], "a wrong or stale value was served"

    @rule(i=st.integers(0, 11), nbytes=SIZES)
    def put(self, i: int, nbytes: int) -> None:
        key, value = CHAIN[i], self._value(nbytes)
        if self.store.put(key, value):
            self.model[key] = value
            assert self.store.get(key) == value
        elif nbytes in (1, 100) and key not in self.model:
            # Tiny values always fit somewhere unless everything is pinned (nothing is).
            raise AssertionError("a small put into a store with free tiers was refused")

    @rule(start=st.integers(0, 11), length=st.integers(1, 6), nbytes=SIZES)
    def put_chain(self, start: int, length: int, nbytes: int) -> None:
        keys = CHAIN[start:start + length]
        values = [self._value(nbytes) for _ in keys]
        stored = self.store.put_many(keys, values)
        assert 0 <= stored <= len(keys)
        for key, value in zip(keys, values, strict=True):
            got = self.store.get(key)
            if got is not None:
                assert got == value
                self.model[key] = value
            else:
                # Refused or already pushed out: either way no earlier value may be served.
                self.model.pop(key, None)

    @rule(i=st.integers(0, 11))
    def get(self, i: int) -> None:
        self._check_read(CHAIN[i], self.store.get(CHAIN[i]))

    @rule(i=st.integers(0, 11))
    def get_into(self, i: int) -> None:
        key = CHAIN[i]
        expected = self.model.get(key)
        if expected is None:
            assert not self.store.get_into(key, bytearray(3))
            return
        out = bytearray(len(expected))
        if self.store.get_into(key, out):
            assert bytes(out) == expected

    @rule()
    def match_prefix(self) -> None:
        n = self.store.match_prefix(CHAIN)
        assert all(self.store.contains(k) for k in CHAIN[:n])
        assert n == len(CHAIN) or not self.store.contains(CHAIN[n])

    @rule(i=st.integers(0, 11))
    def delete(self, i: int) -> None:
        key = CHAIN[i]
        self.store.delete(key)
        self.model.pop(key, None)
        assert self.store.get(key) is None

    @rule()
    def flush(self) -> None:
        self.store.flush()

    @rule()
    def reopen(self) -> None:
        self.store.close()
        self.store = Store(self.config)
        for key in CHAIN:
            self._check_read(key, self.store.get(key))

    @invariant()
    def capacity_is_a_hard_bound(self) -> None:
        for name, tier in self.store.stats()["tiers"].items():
            assert tier["used_bytes"] <= tier["capacity_bytes"], name
        on_disk = sum(p.stat().st_size for p in (self.dir / "nvme").glob("seg-*"))
        assert on_disk <= self.config.nvme_bytes

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class PlainLRUStoreMachine(StoreMachine):
    policy = "lru"


_settings = settings(max_examples=40, stateful_step_count=40, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])
TestStoreLeafLRU = StoreMachine.TestCase
TestStoreLeafLRU.settings = _settings
TestStorePlainLRU = PlainLRUStoreMachine.TestCase
TestStorePlainLRU.settings = _settings

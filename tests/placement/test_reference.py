"""The placement core against the reference model (`tests/placement/reference.py`).

Random sequences of put, put_many, get, delete, pin, unpin (live and expired leases),
flush and reopen run through both, and everything placement decides is compared after
every step:

- the core over `MemoryMedia` (three tiers with byte capacities, driven the way
  `kvstore.store` drives it: memory tiers reserve then commit, the last tier takes values
  whole), for every policy x last-tier admission x promote_on_hit, and with a policy
  and admission rule drawn for each tier and the write tier below the first;
- the real `kvstore.Store` (DRAM and NVMe in a temporary directory);
- the hit-rate simulator (`kvstore.hitrate.replay`, dense ids, tiers counted in blocks).

Lease expiry cannot be driven by a clock inside the compiled core, so an expired lease is
a pin taken with a negative lease (run out at once) and a live one has an hour.

A block being copied is busy while room is made for it (see reference.py): two defects
this suite found (a promotion evicting the copy it read from, a put of a ghost forgetting
it) were fixed that way, with their own regression tests in tests/placement/test_copies.py.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvstore import Store, StoreConfig
from kvstore.placement import Admission, EvictionPolicy, Placement
from kvstore.sim.replay import ReplayConfig, replay
from kvstore.sim.traces import Trace
from tests.conftest import make_key, make_value
from tests.placement.media import Copy, MemoryMedia, Value
from tests.placement.reference import Key, Reference, put_chain

LEAF = EvictionPolicy.LEAF_LRU
LRU = EvictionPolicy.LRU
ALWAYS = Admission.ALWAYS
SECOND_USE = Admission.SECOND_USE

NUM_KEYS = 10
KEYS = [make_key(f"ref-{i}") for i in range(NUM_KEYS)]
LIVE_LEASE_S = 3600.0
EXPIRED_LEASE_S = -1.0  # ran out before anything reads it


# -- the Store's calls into the core, over MemoryMedia ------------------------------------------


@dataclass
class Handle:
    key: Key
    block: int  # the core's id at pin time
    pin: int
    model_pin: int


class CoreStore:
    """The core driven as `kvstore.store.Store` drives it, over `MemoryMedia`."""

    def __init__(self, policies: list[EvictionPolicy], capacity_bytes: list[int],
                 admissions: list[Admission], promote_on_hit: bool, write_tier: int = 0,
                 media: MemoryMedia | None = None, recovered: list[Copy] = ()) -> None:
        self.config = (policies, capacity_bytes, admissions, promote_on_hit, write_tier)
        self.media = media if media is not None else MemoryMedia(capacity_bytes)
        self.core = Placement(policies, admissions=admissions, media=self.media,
                              promote_on_hit=promote_on_hit, write_tier=write_tier)
        self.last_tier = len(policies) - 1
        self.hits = self.misses = 0
        self.tier_hits = [0] * len(policies)
        for copy in recovered:  # oldest written first
            self.core.recover(copy.key, copy.parent, copy.nbytes, self.last_tier)

    def put(self, key: Key, nbytes: int, parent: Key | None = None,
            protect: set[Key] | None = None) -> bool:
        core = self.core
        for t in range(core.write_tier, core.num_tiers):
            if t == self.last_tier:  # a tier that takes values whole (NVMe)
                return core.put_into(t, key, parent, nbytes, 0, Value(key), protect)
            slot = core.reserve(t, nbytes, 0, protect)
            if slot is not None:  # a memory tier: room first, the old value dropped after
                core.forget(key, durable=True)
                self.media.commit(t, slot, key, parent, nbytes)
                core.insert(key, parent, nbytes, t)
                return True
        return False

    def put_many(self, keys: list[Key], sizes: list[int]) -> int:
        return put_chain(self.put, keys, sizes)

    def get(self, key: Key) -> int | None:
        core = self.core
        block = core.lookup(key)
        if block < 0:
            self.misses += 1
            return None
        t = core.fastest(block)
        gen = core.generation(block)
        core.touch(block)
        source = self.media.source(t, key)
        self.hits += 1
        self.tier_hits[t] += 1
        if t > core.write_tier:
            core.promote(block, gen, t, source)
        return t

    def delete(self, key: Key) -> bool:
        if self.core.lookup(key) < 0:
            return False
        self.core.forget(key, durable=True)
        return True

    def pin(self, key: Key, lease_s: float) -> tuple[int, int]:
        block = self.core.lookup(key)
        return block, self.core.pin(block, lease_s)

    def flush(self) -> None:
        core, last = self.core, self.last_tier
        for key in core.missing_from(last):
            block = core.lookup(key)
            if block < 0 or core.is_in(block, last):
                continue
            core.store_in(last, key, self.media.source(core.fastest(block), key))

    def reopen(self) -> CoreStore:
        media, kept = self.media.survivors()
        store = CoreStore(*self.config, media=media, recovered=kept)
        store.hits, store.misses, store.tier_hits = self.hits, self.misses, self.tier_hits
        return store


def assert_same(store: CoreStore, model: Reference, step: object) -> None:
    core = store.core
    for t in range(model.num_tiers):
        held = model.held(t)
        assert core.held_keys(t) == held, (step, t)  # least recently used first
        assert store.media.keys_in(t) == set(held), (step, t)
        assert core.victim(t) == model.victim(t), (step, t)
    for key in KEYS:
        block = model.blocks.get(key)
        i = core.id_of(key)
        assert (i >= 0) == (block is not None), (step, key)  # ghosts included
        if block is None:
            continue
        assert core.residency(i) == sum(1 << t for t in block.tiers), (step, key)
        assert core.parent_of(i) == block.parent, (step, key)
        assert core.uses(i) == block.uses, (step, key)
        assert core.last_access(i) == block.last, (step, key)
        assert [core.children_in(i, t) for t in range(model.num_tiers)] == [
            model.children_in(key, t) for t in range(model.num_tiers)], (step, key)
    assert (core.evictions, core.demotions, core.promotions) == (
        model.evictions, model.demotions, model.promotions), step
    assert (store.hits, store.misses, store.tier_hits) == (
        model.hits, model.misses, model.tier_hits), step
    assert len(core) == sum(1 for b in model.blocks.values() if b.tiers), step
    assert not store.media.torn, step
    store.media.check()


# -- workloads ----------------------------------------------------------------------------------


@st.composite
def forests(draw: st.DrawFn) -> list[int | None]:
    """A parent for each key (None: a root); a parent comes before its children."""
    return [None] + [draw(st.one_of(st.none(), st.integers(0, i - 1)))
                     for i in range(1, NUM_KEYS)]


def path_to(parents: list[int | None], node: int) -> list[int]:
    path = [node]
    while parents[path[-1]] is not None:
        path.append(parents[path[-1]])
    return path[::-1]


KEY = st.integers(0, NUM_KEYS - 1)
# An op: (name, key, blocks a put_many skips, size, whether a pin's lease is live); names
# repeated here are drawn more often.
OP_NAMES = ["put"] * 2 + ["put_many"] * 3 + ["get"] * 4 + [
    "delete", "pin", "unpin", "flush", "reopen"]
OPS = st.tuples(st.sampled_from(OP_NAMES), KEY, st.integers(0, 3),
                st.sampled_from([100, 200, 300]), st.booleans())


@dataclass
class Workload:
    parents: list[int | None]
    capacity_bytes: list[int]
    ops: list[tuple] = field(default_factory=list)


@st.composite
def workloads(draw: st.DrawFn) -> Workload:
    capacity = [100 * draw(st.integers(2, 6)) for _ in range(3)]
    return Workload(draw(forests()), capacity, draw(st.lists(OPS, min_size=10, max_size=80)))


def chain_of(parents: list[int | None], node: int, skip: int) -> list[int]:
    """The path from a root to ``node``, less up to ``skip`` leading blocks."""
    path = path_to(parents, node)
    return path[min(skip, len(path) - 1):]


def run(target: CoreStore | Reference, op: tuple, parents: list[int | None]) -> object:
    """A put, put_many, get, delete or flush on either side; what it returns."""
    name, j, skip, nbytes, _ = op
    key = KEYS[j]
    if name == "put":
        return target.put(key, nbytes)
    if name == "put_many":
        keys = [KEYS[i] for i in chain_of(parents, j, skip)]
        return target.put_many(keys, [nbytes] * len(keys))
    if name == "get":
        return target.get(key)
    if name == "delete":
        return target.delete(key)
    assert name == "flush", name
    return target.flush()


def apply(op: tuple, store: CoreStore, model: Reference, parents: list[int | None],
          handles: list[Handle]) -> tuple[CoreStore, Reference]:
    """Run ``op`` on the model, then on the core (results compared)."""
    name, j, _, _, live = op
    key = KEYS[j]
    if name == "pin":
        if model.fastest(key) is not None:  # a reader pins what it found
            block, pin = store.pin(key, LIVE_LEASE_S if live else EXPIRED_LEASE_S)
            handles.append(Handle(key, block, pin, model.pin(key, live=live)))
    elif name == "unpin":
        if handles:
            h = handles.pop(j % len(handles))
            assert store.core.unpin(h.block, h.pin) == model.unpin(h.key, h.model_pin)
    elif name == "reopen":
        handles.clear()  # a new process: nobody holds a pin
        return store.reopen(), model.reopen()
    else:
        expected = run(model, op, parents)
        assert run(store, op, parents) == expected
    return store, model


def run_workload(workload: Workload, policies: list[EvictionPolicy],
                 admissions: list[Admission], promote_on_hit: bool, write_tier: int = 0
                 ) -> None:
    store = CoreStore(policies, workload.capacity_bytes, admissions, promote_on_hit,
                      write_tier)
    model = Reference(policies, workload.capacity_bytes, admissions=admissions,
                      promote_on_hit=promote_on_hit, write_tier=write_tier, whole_tiers={2})
    handles: list[Handle] = []
    for step, op in enumerate(workload.ops):
        store, model = apply(op, store, model, workload.parents, handles)
        assert_same(store, model, (step, op))


COMBOS = [(policy, admission, promote) for policy in (LEAF, LRU)
          for admission in (ALWAYS, SECOND_USE) for promote in (True, False)]


@pytest.mark.parametrize(("policy", "admission", "promote_on_hit"), COMBOS)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workload=workloads())
def test_core_matches_the_reference(policy: EvictionPolicy, admission: Admission,
                                    promote_on_hit: bool, workload: Workload) -> None:
    run_workload(workload, [policy] * 3, [ALWAYS, ALWAYS, admission], promote_on_hit)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workload=workloads(), policies=st.lists(st.sampled_from([LEAF, LRU]), min_size=3,
                                               max_size=3),
       admissions=st.lists(st.sampled_from([ALWAYS, SECOND_USE]), min_size=3, max_size=3),
       promote_on_hit=st.booleans(), write_tier=st.sampled_from([0, 0, 1]))
def test_core_matches_the_reference_mixed(workload: Workload, policies: list[EvictionPolicy],
                                          admissions: list[Admission], promote_on_hit: bool,
                                          write_tier: int) -> None:
    """A policy and an admission rule of its own for each tier, and a write tier below
    the first."""
    run_workload(workload, policies, admissions, promote_on_hit, write_tier)


# -- the Store ----------------------------------------------------------------------------------

VALUE_BYTES = 4096
STORE_OPS = st.tuples(st.sampled_from(["put"] * 2 + ["put_many"] * 3 + ["get"] * 4 + [
    "delete", "flush", "reopen"]), KEY, st.integers(0, 3))


class StoreRun:
    """A real Store (DRAM, NVMe too large to evict) beside the model, with the values
    acknowledged so far."""

    def __init__(self, directory: Path, dram_slots: int, policy: EvictionPolicy,
                 admission: Admission, promote_on_hit: bool) -> None:
        self.config = StoreConfig(
            dram_bytes=dram_slots * VALUE_BYTES, max_value_bytes=VALUE_BYTES,
            nvme_path=str(directory / "nvme"), nvme_bytes=16 << 20, nvme_segment_bytes=1 << 20,
            eviction_policy=policy, nvme_admission=admission, promote_on_hit=promote_on_hit)
        self.store = Store(self.config)
        self.model = Reference([policy, policy], [dram_slots * VALUE_BYTES, float("inf")],
                               admissions=[ALWAYS, admission], promote_on_hit=promote_on_hit,
                               whole_tiers={1})
        self.values: dict[Key, bytes] = {}
        self.version = 0

    def value(self, key: Key) -> bytes:
        self.version += 1
        return make_value((key, self.version), VALUE_BYTES)

    def apply(self, op: tuple, parents: list[int | None]) -> None:
        """Run ``op`` on the model, then on the Store (results compared)."""
        name, j, skip = op
        key = KEYS[j]
        if name == "reopen":
            self.store.close()  # flushes
            self.model.flush()
            self.store, self.model = Store(self.config), self.model.reopen()
            self.model.hits = self.model.misses = 0  # the Store counts from its opening
            return
        keys = [KEYS[i] for i in chain_of(parents, j, skip)]
        if name == "put":
            expected = self.model.put(key, VALUE_BYTES)
        elif name == "put_many":
            expected = self.model.put_many(keys, [VALUE_BYTES] * len(keys))
        elif name == "get":
            expected = self.model.get(key) is not None
        elif name == "delete":
            expected = self.model.delete(key)
        else:
            assert name == "flush", name
            expected = self.model.flush()
        store = self.store
        if name == "put":
            value = self.value(key)
            assert store.put(key, value) == expected
            self.values[key] = value
        elif name == "put_many":
            values = [self.value(k) for k in keys]
            stored = store.put_many(keys, values)
            assert stored == expected
            self.values.update(zip(keys[:stored], values[:stored], strict=True))
        elif name == "get":
            got = store.get(key)
            assert (got is not None) == expected
            assert got is None or got == self.values[key], "a wrong value was read"
        elif name == "delete":
            assert store.delete(key) == expected
        else:
            store.flush()

    def check(self, step: object) -> None:
        store, model, core = self.store, self.model, self.store.placement
        for t in range(2):
            assert core.held_keys(t) == model.held(t), (step, t)
        names = ("dram", "nvme")
        for key in KEYS:
            t = model.fastest(key)
            assert store.tier_of(key) == (None if t is None else names[t]), (step, key)
        stats = store.stats()
        assert (stats["evictions"], stats["demotions"], stats["promotions"]) == (
            model.evictions, model.demotions, model.promotions), step
        assert (stats["queries"], stats["hits"]) == (model.hits + model.misses, model.hits), step


@pytest.mark.parametrize(("policy", "admission", "promote_on_hit"), COMBOS)
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(parents=forests(), dram_slots=st.integers(2, 5),
       ops=st.lists(STORE_OPS, min_size=10, max_size=50))
def test_store_matches_the_reference(policy: EvictionPolicy, admission: Admission,
                                     promote_on_hit: bool, parents: list[int | None],
                                     dram_slots: int, ops: list[tuple]) -> None:
    directory = Path(tempfile.mkdtemp(prefix="kvstore-ref-"))
    run = StoreRun(directory, dram_slots, policy, admission, promote_on_hit)
    try:
        for step, op in enumerate(ops):
            run.apply(op, parents)
            run.check((step, op))
    finally:
        run.store.close()
        shutil.rmtree(directory, ignore_errors=True)


# -- the simulator ------------------------------------------------------------------------------

BLOCK_TOKENS = 4


@st.composite
def traces(draw: st.DrawFn) -> tuple[list[int | None], list[tuple[int, int, int]]]:
    """A forest and requests (node, blocks skipped, input tokens short of the last block)."""
    requests = draw(st.lists(st.tuples(KEY, st.integers(0, 2),
                                       st.integers(0, BLOCK_TOKENS - 1)),
                             min_size=5, max_size=40))
    return draw(forests()), requests


@pytest.mark.parametrize("policy", [LEAF, LRU])
@pytest.mark.parametrize("promote_on_hit", [True, False])
@settings(max_examples=200, deadline=None)
@given(workload=traces(), capacity=st.tuples(st.integers(0, 4), st.integers(0, 4),
                                             st.integers(0, 4)).filter(any))
def test_replay_matches_the_reference(policy: EvictionPolicy, promote_on_hit: bool,
                                      workload: tuple[list[int | None],
                                                      list[tuple[int, int, int]]],
                                      capacity: tuple[int, int, int]) -> None:
    parents, requests = workload
    present = [c for c in capacity if c]
    model = Reference([policy] * len(present), present, promote_on_hit=promote_on_hit)
    trace = Trace(BLOCK_TOKENS)
    expected = []
    for node, skip, short in requests:
        keys = [KEYS[j] for j in chain_of(parents, node, skip)]
        input_tokens = len(keys) * BLOCK_TOKENS - short
        hit, tier_tokens = model.request(keys, input_tokens, BLOCK_TOKENS)
        trace.timestamps_s.append(float(len(trace.keys)))
        trace.input_tokens.append(input_tokens)
        trace.keys.append(keys)
        expected.append((hit, tier_tokens, model.evictions, model.demotions, model.promotions))
    if not trace.keys:
        return
    result = replay(trace, ReplayConfig(capacity_blocks=capacity, policy=policy,
                                        promote_on_hit=promote_on_hit, window_s=1.0))
    assert [row["hit_tokens"] for row in result.windows.rows()] == [e[0] for e in expected]
    names = [name for name, c in zip(("hbm", "dram", "nvme"), capacity, strict=True) if c]
    tier_tokens = [sum(e[1][t] for e in expected) for t in range(len(present))]
    assert result.hit_tokens_per_tier == dict(zip(names, tier_tokens, strict=True))
    assert (result.evictions, result.demotions, result.promotions) == expected[-1][2:]

"""Tests for `kvstore.keys.prefix_hashes`: chained, keyed, cross-process deterministic keys."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kvstore
from kvstore import KVStoreError, prefix_hashes

REPO = pathlib.Path(__file__).resolve().parents[1]
NS = "llama3-8b|L32|H8|D128|B16|float16||"


def reference_keys(tokens: list[int], block_tokens: int, namespace: str | bytes,
                   parent: bytes | None = None) -> list[bytes]:
    """An independent re-implementation of the definition in the `kvstore.keys` docstring."""
    ns = namespace.encode() if isinstance(namespace, str) else namespace
    ns_key = hashlib.blake2b(ns, digest_size=32, person=b"kvstore-ns-v1").digest()
    previous = parent if parent is not None else bytes(16)
    keys = []
    for start in range(0, len(tokens) - block_tokens + 1, block_tokens):
        block = tokens[start:start + block_tokens]
        payload = b"".join(int(t).to_bytes(4, "little") for t in block)
        previous = hashlib.blake2b(previous + payload, key=ns_key, digest_size=16,
                                   person=b"kvstore-blk-v1").digest()
        keys.append(previous)
    return keys


TOKENS_40 = [(i * 7919 + 13) % 128256 for i in range(40)]  # 2 full blocks of 16 + 8 extra


# -- shape of the result --------------------------------------------------------------------------


def test_one_16_byte_key_per_full_block_and_none_for_partial_tail() -> None:
    keys = prefix_hashes(TOKENS_40, block_tokens=16, namespace=NS)
    assert len(keys) == 2
    assert all(isinstance(k, bytes) and len(k) == 16 for k in keys)
    assert keys[0] != keys[1]
    assert kvstore.KEY_BYTES == 16


@pytest.mark.parametrize(("num_tokens", "expected"), [(0, 0), (15, 0), (16, 1), (31, 1),
                                                      (32, 2), (33, 2), (160, 10)])
def test_number_of_keys_is_number_of_full_blocks(num_tokens: int, expected: int) -> None:
    assert len(prefix_hashes(list(range(num_tokens)), block_tokens=16, namespace=NS)) == expected


def test_partial_tail_does_not_affect_keys_of_full_blocks() -> None:
    full = prefix_hashes(TOKENS_40[:32], block_tokens=16, namespace=NS)
    assert prefix_hashes(TOKENS_40, block_tokens=16, namespace=NS) == full
    assert prefix_hashes([*TOKENS_40[:32], 1, 2, 3], block_tokens=16, namespace=NS) == full


# -- independent reference ------------------------------------------------------------------------


def test_known_keys_match_reference_implementation() -> None:
    keys = prefix_hashes(TOKENS_40, block_tokens=16, namespace=NS)
    assert keys == reference_keys(TOKENS_40, 16, NS)


@settings(max_examples=60, deadline=None)
@given(tokens=st.lists(st.integers(0, 2**32 - 1), max_size=70),
       block_tokens=st.integers(1, 9),
       namespace=st.one_of(st.text(min_size=1, max_size=20), st.binary(min_size=1, max_size=20)))
def test_matches_reference_implementation(tokens: list[int], block_tokens: int,
                                          namespace: str | bytes) -> None:
    got = prefix_hashes(tokens, block_tokens=block_tokens, namespace=namespace)
    assert got == reference_keys(tokens, block_tokens, namespace)


def test_str_and_utf8_bytes_namespace_are_the_same() -> None:
    a = prefix_hashes(TOKENS_40, block_tokens=16, namespace="modèle")
    b = prefix_hashes(TOKENS_40, block_tokens=16, namespace="modèle".encode())
    assert a == b


# -- containers -----------------------------------------------------------------------------------


def _containers(tokens: list[int]) -> dict[str, object]:
    return {
        "list": list(tokens),
        "tuple": tuple(tokens),
        "np_int32": np.array(tokens, dtype=np.int32),
        "np_int64": np.array(tokens, dtype=np.int64),
        "np_uint32": np.array(tokens, dtype=np.uint32),
        "np_int64_big_endian": np.array(tokens, dtype=">i8"),
        "np_strided": np.array([t for t in tokens for _ in (0, 1)], dtype=np.int64)[::2],
        "torch_int64": torch.tensor(tokens, dtype=torch.int64),
        "torch_int32": torch.tensor(tokens, dtype=torch.int32),
    }


@pytest.mark.parametrize("container", list(_containers([0]).keys()))
def test_same_ids_same_keys_in_any_container(container: str) -> None:
    tokens = [(i * 31337) % 128256 for i in range(48)]
    expected = reference_keys(tokens, 16, NS)
    value = _containers(tokens)[container]
    assert prefix_hashes(value, block_tokens=16, namespace=NS) == expected


def test_large_uint32_ids_hash_as_unsigned() -> None:
    tokens = [2**32 - 1, 2**31, 0, 7] * 4
    expected = reference_keys(tokens, 16, NS)
    assert prefix_hashes(tokens, block_tokens=16, namespace=NS) == expected
    assert prefix_hashes(np.array(tokens, dtype=np.uint32), block_tokens=16,
                         namespace=NS) == expected
    assert prefix_hashes(np.array(tokens, dtype=np.uint64), block_tokens=16,
                         namespace=NS) == expected


_CHILD_SCRIPT = r"""
import json, sys
import numpy as np
from kvstore import prefix_hashes
tokens = json.loads(sys.argv[1])
ns = sys.argv[2]
out = {
    "list": prefix_hashes(tokens, block_tokens=16, namespace=ns),
    "np_int32": prefix_hashes(np.array(tokens, dtype=np.int32), block_tokens=16, namespace=ns),
    "np_int64": prefix_hashes(np.array(tokens, dtype=np.int64), block_tokens=16, namespace=ns),
    "np_uint32": prefix_hashes(np.array(tokens, dtype=np.uint32), block_tokens=16, namespace=ns),
    "bytes_ns": prefix_hashes(tokens, block_tokens=16, namespace=ns.encode()),
}
if sys.argv[3] == "torch":
    import torch
    out["torch_int64"] = prefix_hashes(torch.tensor(tokens, dtype=torch.int64),
                                       block_tokens=16, namespace=ns)
print(json.dumps({k: [key.hex() for key in v] for k, v in out.items()}))
"""


@pytest.mark.parametrize(("hashseed", "with_torch"), [("0", False), ("918273", True)])
def test_keys_identical_in_another_process_with_other_hash_seed(hashseed: str,
                                                               with_torch: bool) -> None:
    tokens = [(i * 104729 + 3) % 128256 for i in range(16 * 5 + 3)]
    env = dict(os.environ, PYTHONHASHSEED=hashseed)
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD_SCRIPT, json.dumps(tokens), NS,
         "torch" if with_torch else "no-torch"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    child = json.loads(proc.stdout)
    here = [k.hex() for k in prefix_hashes(tokens, block_tokens=16, namespace=NS)]
    assert len(here) == 5
    assert here == [k.hex() for k in reference_keys(tokens, 16, NS)]
    expected_names = {"list", "np_int32", "np_int64", "np_uint32", "bytes_ns"}
    if with_torch:
        expected_names.add("torch_int64")
    assert set(child) == expected_names
    for name, hexes in child.items():
        assert hexes == here, name


# -- chaining -------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(num_shared=st.integers(0, 5), num_a=st.integers(0, 3), num_b=st.integers(0, 3),
       seed=st.integers(0, 2**16))
def test_sequences_sharing_k_blocks_share_exactly_k_keys(num_shared: int, num_a: int,
                                                         num_b: int, seed: int) -> None:
    bt = 4
    rng = np.random.default_rng(seed)
    shared = rng.integers(0, 1000, size=num_shared * bt).tolist()
    tail_a = rng.integers(0, 1000, size=num_a * bt).tolist()
    tail_b = rng.integers(0, 1000, size=num_b * bt).tolist()
    if num_a and num_b:
        tail_b[0] = tail_a[0] + 1  # the first block after the shared prefix differs
    a = prefix_hashes(shared + tail_a, block_tokens=bt, namespace=NS)
    b = prefix_hashes(shared + tail_b, block_tokens=bt, namespace=NS)
    assert a[:num_shared] == b[:num_shared]
    assert len(a) == num_shared + num_a and len(b) == num_shared + num_b
    # After the divergence no key is shared at all (not even at another position).
    assert not set(a[num_shared:]) & set(b[num_shared:])


def test_equal_later_blocks_after_a_differing_block_still_differ() -> None:
    block = list(range(16))
    a = prefix_hashes([1] * 16 + block + block, block_tokens=16, namespace=NS)
    b = prefix_hashes([2] * 16 + block + block, block_tokens=16, namespace=NS)
    assert all(x != y for x, y in zip(a, b, strict=True))
    # The same block content at two positions gets two keys: a key names its whole prefix.
    assert a[1] != a[2]


@pytest.mark.parametrize("block", [0, 1, 2, 3])
@pytest.mark.parametrize("position", [0, 7, 15])
def test_changing_one_token_changes_its_key_and_all_later_keys(block: int,
                                                                position: int) -> None:
    tokens = [(i * 17 + 5) % 50000 for i in range(16 * 4 + 5)]
    changed = list(tokens)
    changed[block * 16 + position] += 1
    a = prefix_hashes(tokens, block_tokens=16, namespace=NS)
    b = prefix_hashes(changed, block_tokens=16, namespace=NS)
    assert a[:block] == b[:block]
    for i in range(block, 4):
        assert a[i] != b[i], i


def test_changing_a_token_in_the_partial_tail_changes_nothing() -> None:
    tokens = list(range(16 * 2 + 5))
    changed = list(tokens)
    changed[-1] += 1
    assert (prefix_hashes(tokens, block_tokens=16, namespace=NS)
            == prefix_hashes(changed, block_tokens=16, namespace=NS))


def test_block_size_matters() -> None:
    tokens = list(range(32))
    k16 = prefix_hashes(tokens, block_tokens=16, namespace=NS)
    k8 = prefix_hashes(tokens, block_tokens=8, namespace=NS)
    assert not set(k16) & set(k8)


# -- namespaces -----------------------------------------------------------------------------------


def test_different_namespaces_share_no_keys() -> None:
    tokens = list(range(16 * 8))
    spaces = ["llama3-8b", "llama3-8b|tenant-b", "llama3-70b", b"llama3-8b\x00", "a"]
    seen: dict[bytes, object] = {}
    for ns in spaces:
        for key in prefix_hashes(tokens, block_tokens=16, namespace=ns):
            assert key not in seen, (ns, seen.get(key))
            seen[key] = ns
    assert len(seen) == 8 * len(spaces)


@settings(max_examples=30, deadline=None)
@given(ns_a=st.text(min_size=1, max_size=12), ns_b=st.text(min_size=1, max_size=12))
def test_distinct_namespaces_give_distinct_keys(ns_a: str, ns_b: str) -> None:
    tokens = list(range(12))
    a = prefix_hashes(tokens, block_tokens=4, namespace=ns_a)
    b = prefix_hashes(tokens, block_tokens=4, namespace=ns_b)
    if ns_a == ns_b:
        assert a == b
    else:
        assert not set(a) & set(b)


# -- parent continuation --------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(num_head=st.integers(1, 5), num_tail=st.integers(0, 5), extra=st.integers(0, 3),
       seed=st.integers(0, 2**16))
def test_parent_continuation_equals_hashing_the_whole_sequence(num_head: int, num_tail: int,
                                                               extra: int, seed: int) -> None:
    bt = 4
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 2**31, size=(num_head + num_tail) * bt + extra).tolist()
    whole = prefix_hashes(tokens, block_tokens=bt, namespace=NS)
    head = prefix_hashes(tokens[:num_head * bt], block_tokens=bt, namespace=NS)
    tail = prefix_hashes(tokens[num_head * bt:], block_tokens=bt, namespace=NS, parent=head[-1])
    assert head + tail == whole
    assert len(whole) == num_head + num_tail


def test_parent_none_is_the_zero_key() -> None:
    tokens = list(range(32))
    assert (prefix_hashes(tokens, block_tokens=16, namespace=NS, parent=bytes(16))
            == prefix_hashes(tokens, block_tokens=16, namespace=NS))
    other = prefix_hashes(tokens, block_tokens=16, namespace=NS, parent=b"\x01" * 16)
    assert other == reference_keys(tokens, 16, NS, parent=b"\x01" * 16)
    assert not set(other) & set(prefix_hashes(tokens, block_tokens=16, namespace=NS))


# -- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("block_tokens", [0, -1, -16, 1.5, "16", None])
def test_bad_block_tokens_raise(block_tokens: object) -> None:
    with pytest.raises(KVStoreError):
        prefix_hashes(list(range(32)), block_tokens=block_tokens, namespace=NS)  # type: ignore[arg-type]


@pytest.mark.parametrize("tokens", [
    [[1, 2], [3, 4]],
    np.zeros((2, 16), dtype=np.int64),
    torch.zeros((2, 16), dtype=torch.int64),
    7,
])
def test_not_one_dimensional_tokens_raise(tokens: object) -> None:
    with pytest.raises(KVStoreError, match="one-dimensional"):
        prefix_hashes(tokens, block_tokens=4, namespace=NS)


@pytest.mark.parametrize("tokens", [
    [1.0] * 16,
    [1, 2.5] * 8,
    np.arange(16, dtype=np.float32),
    torch.arange(16, dtype=torch.float32),
    [True, False] * 8,
])
def test_non_integer_tokens_raise(tokens: object) -> None:
    with pytest.raises(KVStoreError, match="integer"):
        prefix_hashes(tokens, block_tokens=4, namespace=NS)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_float_torch_tensor_without_numpy_dtype_raises_kvstore_error(dtype: torch.dtype) -> None:
    with pytest.raises(KVStoreError, match="integer"):
        prefix_hashes(torch.ones(16, dtype=dtype), block_tokens=4, namespace=NS)


@pytest.mark.parametrize("tokens", [
    [5] * 15 + [-1],
    np.array([-3] + [0] * 15, dtype=np.int32),
    torch.tensor([0] * 15 + [-2], dtype=torch.int64),
    [2**32] + [0] * 15,
    np.array([2**32 + 1] * 16, dtype=np.int64),
])
def test_out_of_range_token_ids_raise(tokens: object) -> None:
    with pytest.raises(KVStoreError, match=r"\[0, 2\*\*32\)"):
        prefix_hashes(tokens, block_tokens=4, namespace=NS)


def test_negative_id_in_partial_tail_still_raises() -> None:
    # Every id is validated, not only those of full blocks: a bad id is a caller bug.
    with pytest.raises(KVStoreError):
        prefix_hashes([*range(16), -1], block_tokens=16, namespace=NS)


@pytest.mark.parametrize("namespace", ["", b"", None, 42])
def test_bad_namespace_raises(namespace: object) -> None:
    with pytest.raises(KVStoreError, match="namespace"):
        prefix_hashes(list(range(16)), block_tokens=16, namespace=namespace)  # type: ignore[arg-type]


@pytest.mark.parametrize("parent", [b"", b"\x00" * 15, b"\x00" * 17, b"\x00" * 32])
def test_parent_of_wrong_length_raises(parent: bytes) -> None:
    with pytest.raises(KVStoreError, match="parent"):
        prefix_hashes(list(range(16)), block_tokens=16, namespace=NS, parent=parent)



def test_block_tokens_must_be_a_real_int() -> None:
    with pytest.raises(KVStoreError, match="block_tokens"):
        prefix_hashes([1] * 16, block_tokens=True, namespace=NS)
    assert prefix_hashes([1] * 16, block_tokens=np.int64(4), namespace=NS) == prefix_hashes(
        [1] * 16, block_tokens=4, namespace=NS)


def test_parent_must_be_key_bytes() -> None:
    with pytest.raises(KVStoreError, match="parent"):
        prefix_hashes([1] * 16, block_tokens=4, namespace=NS, parent="x" * 16)


@given(st.binary(min_size=0, max_size=64), st.lists(st.binary(min_size=0, max_size=80),
                                                    max_size=8))
def test_scoped_keys_of_a_batch_equal_each_key_scoped(secret: bytes, keys: list[bytes]) -> None:
    from kvstore.keys import scoped_key, scoped_keys

    assert scoped_keys(secret, keys) == [scoped_key(secret, key) for key in keys]
    if len(set(keys)) == len(keys):  # distinct keys stay distinct
        assert len(set(scoped_keys(secret, keys))) == len(keys)

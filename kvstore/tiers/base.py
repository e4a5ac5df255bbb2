"""What every tier is: a place that stores, reads and forgets values under 16-byte keys.

Tiers hold data only. Which key lives where, and which key to evict, is decided by the
Store with the placement core (`kvstore.placement`); a tier never evicts on its own.
"""

from __future__ import annotations

import enum
from typing import Any, Protocol

from kvstore.errors import InvalidKeyError
from kvstore.keys import KEY_BYTES


class TierKind(enum.Enum):
    """Tiers from fastest to slowest."""

    HBM = "hbm"
    DRAM = "dram"
    NVME = "nvme"


# A tier's bit in a block's residency as the pool's index publishes it (docs/CLUSTER.md).
TIER_BIT = {TierKind.HBM: 1, TierKind.DRAM: 2, TierKind.NVME: 4}
# A block no tier of a pool's node holds and a peer does, as that node's ``tier_bits``
# answers it (docs/PROTOCOL.md); never in the index (a node publishes only its own tiers).
REMOTE_TIER_BIT = 8


class Tier(Protocol):
    """The contract every tier passes (`tests/tiers/test_contract.py`)."""

    capacity_bytes: int

    @property
    def used_bytes(self) -> int: ...

    def put(self, key: bytes, value: Any, parent: bytes | None = None) -> bool: ...
    def get(self, key: bytes) -> bytes | None: ...
    def read_bytes(self, key: bytes) -> bytes | None: ...  # get, ``key`` already checked
    def read_into(self, key: bytes, out: Any) -> bool: ...
    def read_exact(self, key: bytes, dst: Any) -> bool: ...
    def nbytes_of(self, key: bytes) -> int | None: ...
    def evict(self, key: bytes) -> bool: ...
    def delete(self, key: bytes) -> bool: ...
    def __contains__(self, key: object) -> bool: ...
    def __len__(self) -> int: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...
    def stats(self) -> dict[str, Any]: ...


def check_key(key: object) -> bytes:
    """The key as bytes, or `InvalidKeyError` if it is not a 16-byte bytes-like value."""
    if isinstance(key, bytes) and len(key) == KEY_BYTES:
        return key
    if isinstance(key, bytearray | memoryview) and len(key) == KEY_BYTES:
        return bytes(key)
    raise InvalidKeyError(
        f"a key must be {KEY_BYTES} bytes (use kvstore.prefix_hashes), got {type(key).__name__}"
        + (f" of length {len(key)}" if hasattr(key, "__len__") else ""))

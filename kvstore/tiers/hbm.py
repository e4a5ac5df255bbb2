"""The HBM tier: one preallocated GPU buffer, carved by the same slab allocator."""

from __future__ import annotations

from kvstore.buffers import ByteView
from kvstore.tiers.base import TierKind
from kvstore.tiers.memory import MemoryTier


class DevicePool:
    """One preallocated GPU buffer (torch), carved by the same slab allocator."""

    def __init__(self, nbytes: int, device: str) -> None:
        import torch

        self.nbytes = nbytes
        self.tensor = torch.empty(nbytes, dtype=torch.uint8, device=device)

    def view(self, offset: int, nbytes: int) -> ByteView:
        return self.tensor[offset:offset + nbytes]

    @property
    def base_address(self) -> int:
        """The device address of byte 0 of the pool."""
        return int(self.tensor.data_ptr())

    def close(self) -> None:
        self.tensor = None


def hbm_tier(nbytes: int, max_value_bytes: int, device: str) -> MemoryTier:
    return MemoryTier(TierKind.HBM, DevicePool(nbytes, device), max_value_bytes)

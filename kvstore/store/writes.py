"""The Store's write paths: a value into the write tier or, failing that, the tiers below
it; the small-value fast path of `Store.put_many`; the commit of a filled slot.

Each runs its placement decisions under the store lock (`StoreState`) and copies a large
value outside it, into a slot held for it meanwhile.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from kvstore.buffers import ByteView, copy_bytes, value_view
from kvstore.config import StoreConfig
from kvstore.errors import InvalidValueError, StoreClosedError
from kvstore.placement import Placement
from kvstore.store.media import TierMedia
from kvstore.store.reads import SMALL_VALUE_BYTES
from kvstore.store.state import StoreState
from kvstore.tiers.memory import MemoryTier


class Writes:
    """The write paths over one store's state, placement core, media and tiers."""

    def __init__(self, config: StoreConfig, state: StoreState, core: Placement,
                 media: TierMedia, tiers: list[Any]) -> None:
        self.config = config
        self.state = state
        self.core = core
        self.media = media
        self.tiers = tiers

    def source(self, value: Any) -> ByteView:
        src = value_view(value)
        if src.shape[0] > self.config.max_value_bytes:
            raise InvalidValueError(f"value of {src.shape[0]} bytes exceeds max_value_bytes "
                                    f"({self.config.max_value_bytes})")
        return src

    def put(self, key: bytes, src: ByteView, parent: bytes | None,
            protect: list[bytes] | None = None, owner: int = 0, replace: bool = True,
            tiers: Sequence[int] | None = None) -> bool:
        """Store into the write tier or, failing that, the tiers below it (``tiers``: into
        these only, in turn).

        ``protect`` holds the blocks this put_many call already stored (the new block's
        ancestors): evicting one of them to make room for its own descendant would push
        a chain's head below its tail, so such a block goes one tier down instead.
        """
        nbytes = int(src.shape[0])
        state = self.state
        if self.media.pins_old_record(key):
            return False
        for t in tiers if tiers is not None else range(self.core.write_tier, len(self.tiers)):
            tier = self.tiers[t]
            if isinstance(tier, MemoryTier):
                stored = self.put_memory(t, tier, key, src, parent, protect, owner, replace)
                if stored is not None:
                    return stored
                continue
            with state.lock:
                state.check_open()
                if not replace and self.core.lookup(key) >= 0:
                    return False
                if self.core.put_into(t, key, parent, nbytes, owner, src, protect):
                    return True
        return False

    def put_host(self, tier: MemoryTier, key: bytes, src: np.ndarray,
                 parent: bytes | None, owner: int) -> bool:
        """put_many's fast path (lock held): a small host value into a free slot of the
        host write tier. False, with nothing changed, when that needs an eviction (or its
        owner's quota would)."""
        nbytes = src.shape[0]
        t = self.core.write_tier
        if owner and not self.core.fits_quota(t, owner, nbytes):
            return False
        offset = tier.allocator.allocate(nbytes)
        if offset is None:
            return False
        self.core.forget(key, durable=True)
        np.copyto(tier.view(offset, nbytes), src)
        tier.commit(key, offset, nbytes, parent)
        self.core.insert(key, parent, nbytes, t, owner)
        return True

    def put_memory(self, t: int, tier: MemoryTier, key: bytes, src: ByteView,
                   parent: bytes | None, protect: list[bytes] | None, owner: int,
                   replace: bool = True) -> bool | None:
        """True: stored in tier ``t``; None: no room there; False: ``key`` is held and
        ``replace`` is False."""
        nbytes = int(src.shape[0])
        state = self.state
        core = self.core
        if nbytes <= SMALL_VALUE_BYTES:
            with state.lock:
                state.check_open()
                if not replace and core.lookup(key) >= 0:
                    return False
                offset = core.reserve(t, nbytes, owner, protect)
                if offset is None:
                    return None
                copy_bytes(tier.view(offset, nbytes), src)
                self.commit(t, key, parent, offset, nbytes, owner)
            return True
        with state.lock:
            state.check_open()
            offset = core.reserve(t, nbytes, owner, protect)
            if offset is not None:
                core.hold(t, offset, owner, nbytes)  # copied outside the lock
        if offset is None:
            return None
        try:
            copy_bytes(tier.view(offset, nbytes), src)
        except BaseException:
            with state.lock:
                core.unhold(t, offset)
                tier.release(offset)
            raise
        with state.lock:
            if state.closed:
                raise StoreClosedError("the store was closed during put")
            if not replace and core.lookup(key) >= 0:  # (held: decided at the commit)
                core.unhold(t, offset)
                tier.release(offset)
                return False
            self.commit(t, key, parent, offset, nbytes, owner)
        return True

    def commit(self, t: int, key: bytes, parent: bytes | None, offset: int,
               nbytes: int, owner: int = 0) -> None:
        """A filled slot becomes ``key``'s value (lock held). The value it replaces gets
        a tombstone on NVMe, so that a crash can bring back the new value or none, never
        the old one."""
        core = self.core
        core.forget(key, durable=True)
        self.tiers[t].commit(key, offset, nbytes, parent)
        core.insert(key, parent, nbytes, t, owner)
        if owner:
            core.unhold(t, offset)
            core.enforce_quota(t, owner, key)


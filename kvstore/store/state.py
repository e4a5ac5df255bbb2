"""What the Store's parts share: its lock, the placement core, the tiers, the counters.

`kvstore.store.Store` (the API and the write paths), `Reads` (the read paths) and
`HostPlane` (the shared-memory client's slots) are objects over one `StoreState`.

Concurrency: ``lock`` guards the core, the tiers' bookkeeping and the counters. Bulk
copies run outside it: a put reserves a slot (owned by no key, so never evicted), copies,
then commits; a get pins the block, copies, then unpins. A pin that was revoked meanwhile
(the block was deleted or overwritten) or whose lease ran out turns the read into a miss,
so a torn copy is never returned as a hit. NVMe I/O runs under the NVMe tier's own lock.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from kvstore.config import StoreConfig
from kvstore.errors import StoreClosedError
from kvstore.placement import Placement
from kvstore.store.media import TierMedia


class Counters:
    """The Store's request counters (the core counts evictions, demotions, promotions)."""

    def __init__(self, num_tiers: int) -> None:
        self.queries = 0
        self.hits = 0
        self.tier_hits = [0] * num_tiers
        self.torn_reads = 0

    def hit(self, t: int, n: int = 1) -> None:
        self.hits += n
        self.tier_hits[t] += n


class StoreState:
    """See the module docstring."""

    def __init__(self, config: StoreConfig, media: TierMedia, core: Placement) -> None:
        self.config = config
        self.lock = threading.RLock()
        self.media = media
        self.tiers = media.tiers
        self.core = core
        self.counters = Counters(len(media.tiers))
        self.closed = False

    def check_open(self) -> None:
        if self.closed:
            raise StoreClosedError("the store is closed; open a new kvstore.Store")

    def unpin(self, block: int, pin: int) -> bool:
        """Release a pin on ``block`` (an id, -1 if gone); True if the copy made under it is
        whole (a retired slot's readers keep it whole; `TierMedia`)."""
        if self.media.release_retired(pin):
            return True
        return block >= 0 and self.core.unpin(block, pin)

    def promote(self, block: int, gen: int, t: int, source: Any) -> None:
        """After a hit on ``block`` in tier ``t``, copy it up to the write tier if the
        rules say so (lock held)."""
        if not self.closed and t > self.core.write_tier:
            if isinstance(source, bytes):
                source = np.frombuffer(source, dtype=np.uint8)
            self.core.promote(block, gen, t, source)

"""The placement core: one implementation of where blocks go, for the Store and the
hit-rate simulator alike.

It owns the block index (keys, their prefix tree, which tiers hold each block, uses, pins
and owners), the eviction and admission policies (`rules`), per-owner quotas, and every
placement decision: which tier a new block goes to, which victims leave a tier to make
room, whether a victim is demoted to the next tier, and whether a hit is promoted. It
moves no bytes: a *media* object does that for the Store's tiers, and the simulator runs
it with tiers counted in blocks and nothing stored.

The media protocol (what `kvstore.store` gives the core; tier numbers fastest first):

    reserve(t, nbytes) -> slot | None   room for a value in tier t now, without evicting
    fits(t, nbytes) -> bool             whether a value of nbytes could ever go to tier t
    write(t, slot, key, parent, nbytes, src) -> bool
                                        copy ``src`` into the slot and commit it as key's
    source(t, key) -> view              the bytes of key's copy in tier t (to demote them)
    drop(t, key, how)                   give up key's copy in t (DROP_EVICTED, _DELETED,
                                        _FORGOTTEN)
    retire(t, key, pins) -> bool        keep key's slot for the readers holding ``pins``
                                        instead of freeing it (False: not a memory tier)
    reclaim(t, nbytes, can_free) -> [key] | None
                                        keys whose slots, freed, make room for nbytes
                                        (all passing can_free(key)), when no victim does

Invariants: a block is in the index exactly when some tier holds a committed copy of it
or a child names it (a *ghost*); ``children_in(i, t)`` counts i's children held in tier t
(a *leaf* of t has none); victims are never pinned nor protected.
"""

from kvstore.placement._core import DROP_DELETED, DROP_EVICTED, DROP_FORGOTTEN, Placement
from kvstore.placement.rules import MAX_OWNER, Admission, EvictionPolicy

__all__ = ["DROP_DELETED", "DROP_EVICTED", "DROP_FORGOTTEN", "MAX_OWNER", "Admission",
           "EvictionPolicy", "Placement"]

# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""The placement core's decisions (`Placement`, over its `BlockIndex`): which tier a block
goes to, which victims leave to make room, whether a victim is demoted and a hit promoted,
quotas, and the simulator's replay loop, for the Store and for the hit-rate simulator alike
(see ``kvstore/placement/__init__.py``).
"""

from libc.stdint cimport int32_t, int64_t

from kvstore.placement.index cimport BlockIndex
from kvstore.placement.keyed cimport KeyedIndex

from kvstore.errors import StorageError
from kvstore.placement.rules import Admission


# How a tier gives up a block's copy (``media.drop``'s ``how``).
DROP_EVICTED = 0  # an eviction: gone from this tier (durably where it is durable)
DROP_DELETED = 1  # a delete or an overwrite: durably
DROP_FORGOTTEN = 2  # no longer indexed; durable state left as it is


cdef class _CanFree:
    """``can_free(key)`` for a media's reclaim: the block is held, not held back (pinned or
    being copied), unprotected."""

    cdef BlockIndex core
    cdef int64_t protect

    def __call__(self, key):
        cdef BlockIndex core = self.core
        id = core.ids.get(key)
        if id is None:
            return False
        cdef int32_t i = id
        if not core.e[i].res or core._held_back(i):
            return False
        return not (self.protect and core.e[i].mark == self.protect)


cdef class Placement(KeyedIndex):
    """See the module docstring and ``kvstore/placement/__init__.py``."""

    def __init__(self, policies, *, admissions=None, partition_of=None, media=None,
                 capacity_blocks=None, write_tier=0, promote_on_hit=True, num_ids=0,
                 keyed=None):
        """``policies``: one `EvictionPolicy` per tier, fastest first. ``admissions``: one
        `Admission` per tier (default ALWAYS). ``partition_of``: per tier, a callable giving
        the partition of a value of n bytes (a memory tier's size class), or None.

        ``media`` does the byte work of the Store's tiers (see the package docstring);
        without it the tiers are counted in blocks of ``capacity_blocks`` each. Blocks are
        named by key (``keyed``, the default with media) or by dense ids, ``0 <= id <
        num_ids``, given by the caller (the simulator's default)."""
        cdef int t
        dense = media is None if keyed is None else not keyed
        if dense and media is not None:
            raise ValueError("a placement with media names its blocks by key")
        KeyedIndex.__init__(self, policies, partition_of, dense=dense, num_ids=num_ids)
        num_tiers = self.num_tiers
        admissions = list(admissions) if admissions is not None else [Admission.ALWAYS] * num_tiers
        if len(admissions) != num_tiers:
            raise ValueError("one admission rule per tier")
        for t in range(num_tiers):
            self.second_use[t] = Admission(admissions[t]) is Admission.SECOND_USE
            self.used[t] = 0
            self.cap[t] = 0
        self.media = media
        self.counted = media is None
        if media is None:
            if capacity_blocks is None or len(capacity_blocks) != num_tiers:
                raise ValueError("without media, give capacity_blocks: one per tier")
            for t in range(num_tiers):
                self.cap[t] = capacity_blocks[t]
        if not 0 <= write_tier < num_tiers:
            raise ValueError(f"write tier {write_tier} is not one of {num_tiers} tiers")
        self.write_tier = write_tier
        self.promote_on_hit = promote_on_hit
        self.quotas = {}
        self.held = {}
        self.held_bytes = {}

    # -- decisions ----------------------------------------------------------------------------

    cdef int64_t _reserve(self, int t, int64_t nbytes, int32_t owner, int64_t protect) except -2:
        """Room in tier ``t`` for a value of ``owner``, evicting (and demoting) victims
        until there is some: its own first while it is at its quota. The media's slot (0
        for a counted tier), or -1. A block marked with ``protect`` (nonzero) never goes."""
        if owner and not self._make_quota_room(t, owner, nbytes, protect):
            return -1
        while True:
            if self.counted:
                if self.used[t] < self.cap[t]:
                    self.used[t] += 1
                    return 0
            else:
                slot = self.media.reserve(t, nbytes)
                if slot is not None:
                    return slot
            if not self._evict_for(t, nbytes, protect):
                return -1

    cdef bint _evict_for(self, int t, int64_t nbytes, int64_t protect) except -1:
        """Evict one victim of tier ``t``'s partition for a value of ``nbytes`` (so that a
        slot of its class comes free); False if none can go. Without one, the media may
        free a window of its pool whose values are all unpinned and unprotected."""
        cdef int32_t victim = self._victim(t, self._partition(t, nbytes), -1)
        cdef _CanFree can_free
        if victim >= 0:
            if protect and self.e[victim].mark == protect:
                return False
            self._evict(victim, t)
            return True
        if self.counted:
            return False
        can_free = _CanFree()
        can_free.core, can_free.protect = self, protect
        keys = self.media.reclaim(t, nbytes, can_free)
        if not keys:
            return False
        for key in keys:
            self._evict(self.ids[key], t)
        return True

    cdef int _evict(self, int32_t i, int t) except -1:
        """Take ``i`` out of tier ``t``, demoting it to the next tier if no tier from there
        down holds it and that tier admits it."""
        cdef int lower = t + 1
        self.evictions += 1
        if lower < self.num_tiers and self.e[i].res >> lower == 0 and (
                not self.second_use[lower] or self.e[i].uses >= 2):
            if self.counted:
                if self._store_in(lower, i, None, 0):
                    self.demotions += 1
            else:
                try:
                    if self._store_in(lower, i, self.media.source(t, self.keys[i]), 0):
                        self.demotions += 1
                except StorageError as e:  # the disk's trouble: the victim goes all the same
                    import logging  # (rare: not loaded at start)

                    logging.getLogger("kvstore.placement").warning(
                        "eviction: could not demote a block to tier %d: %s", lower, e)
        if self.counted:
            self.used[t] -= 1
        else:
            if self.spills and self.e[i].res == (1 << t):  # its last copy leaves
                self.media.spill(t, self.keys[i])
            self.media.drop(t, self.keys[i], DROP_EVICTED)
        self._remove(i, t)
        return 0

    cdef bint _store_in(self, int t, int32_t i, object src, int64_t protect) except -1:
        """Write a copy of ``i`` into tier ``t`` (making room); False if it cannot fit.

        Meanwhile ``i`` is *busy*: making room may push blocks down through the tiers
        that hold ``i`` (a promotion's), and none of them may evict ``i``, whose copy there
        ``src`` may be (nor forget ``i``, a ghost whose last child goes: a put of it)."""
        cdef int64_t nbytes = self.e[i].nbytes
        cdef int64_t slot
        cdef bint stored = False
        if not self.counted and not self.media.fits(t, nbytes):
            return False
        self.e[i].busy += 1
        try:
            slot = self._reserve(t, nbytes, self.e[i].owner, protect)
            if slot >= 0:
                if self.counted:
                    stored = True
                else:
                    parent = self.keys[self.e[i].parent] if self.e[i].parent >= 0 else None
                    stored = self.media.write(t, slot, self.keys[i], parent, nbytes, src)
        finally:
            self.e[i].busy -= 1
        if stored:
            self._add(i, t)
        return stored

    # -- quotas -------------------------------------------------------------------------------

    cdef int64_t _charged(self, int32_t owner, int t) except? -1:
        usage = self.usage_of.get(owner)
        used = 0 if usage is None else usage[0][t]
        return used + self.held_bytes.get((owner, t), 0)

    cdef bint _make_quota_room(self, int t, int32_t owner, int64_t nbytes,
                               int64_t protect) except -1:
        """Evict ``owner``'s own blocks from tier ``t`` until ``nbytes`` more fit its quota
        (of the value's partition first); False if they cannot."""
        cdef int32_t victim
        quota = self.quotas.get((owner, t))
        if quota is None:
            return True
        if self.held_bytes.get((owner, t), 0) + nbytes > quota:
            return False  # its reservations alone take the quota: no block of its can help
        partition = self._partition(t, nbytes)
        while self._charged(owner, t) + nbytes > quota:
            victim = self._victim(t, partition, owner)
            if victim < 0:
                victim = self._victim(t, -1, owner)
            if victim < 0 or (protect and self.e[victim].mark == protect):
                return False
            self._evict(victim, t)
        return True

    # -- the keyed API (the Store's) ----------------------------------------------------------

    def reserve(self, int t, int64_t nbytes, int32_t owner=0, protect=None):
        """Room in tier ``t`` for ``nbytes`` of ``owner``'s, evicting and demoting as
        needed (see `_reserve`), never a block of ``protect`` (keys): the media's slot, or
        None."""
        slot = self._reserve(t, nbytes, owner, self._protect(protect))
        return None if slot < 0 else slot

    def put_into(self, int t, key, parent, int64_t nbytes, int32_t owner, src, protect=None):
        """A new value of ``key`` into tier ``t`` through the media's ``write`` (a tier that
        takes a value whole: NVMe), replacing any older value. False if it found no room."""
        cdef int32_t i
        self._keyed_only()
        self.forget(key, durable=True)
        i = self.ids.get(key, -1)
        if i < 0:
            i = self._new(key, nbytes, owner)
        self._ensure(i, self._parent_id(i, key, parent), nbytes, owner)
        self._touch(i)
        if self._store_in(t, i, src, self._protect(protect)):
            return True
        self._drop_if_unused(i)
        return False

    def store_in(self, int t, key, src):
        """A copy of held ``key`` into tier ``t`` (a flush, say), making room; False if it
        cannot fit or is not held."""
        cdef int32_t i = self._held_id(key)
        return i >= 0 and self._store_in(t, i, src, 0)

    def promote(self, int32_t i, int64_t gen, int t, src):
        """After a hit on block ``i`` (of generation ``gen``) in tier ``t``: copy it up to
        the write tier if the rules say so; True if it was."""
        cdef int w = self.write_tier
        self._check_id(i)
        # The same block (``gen``), still in tier t (the copy ``src`` was read from: its
        # slot may have gone to another block since), and not in the write tier yet.
        if (self.promote_on_hit and t > w and self.e[i].gen == gen and self.e[i].live
                and self.e[i].res >> t & 1 and not self.e[i].res >> w & 1):
            if self._store_in(w, i, src, 0):
                self.promotions += 1
                return True
        return False

    def forget(self, key, *, bint durable):
        """Drop every copy of ``key`` (a delete or an overwrite). Live pins are handed to
        the media's ``retire`` with every copy (a memory tier keeps the slot for them: a
        reader copies from the tier that was fastest when it pinned, which a promotion
        since may have changed); expired ones are revoked: those reads become misses."""
        cdef int32_t i = self._held_id(key)
        cdef int t
        if i < 0:
            return
        live = self.live_pins(i)
        if self.e[i].npins:
            self.pins.pop(i, None)
            self.e[i].npins = 0
        how = DROP_DELETED if durable else DROP_FORGOTTEN
        for t in range(self.num_tiers):
            if self.e[i].res >> t & 1:
                if self.counted:
                    self.used[t] -= 1
                elif not (live and self.media.retire(t, key, live)):
                    self.media.drop(t, key, how)
                self._remove(i, t)

    cdef int64_t _protect(self, object keys) except -1:
        """The epoch marking ``keys`` (0 if none). A put_many passes the same list each
        time, its chain so far, grown at the end: only the keys added since are marked."""
        cdef int32_t i
        cdef Py_ssize_t start = 0
        if not keys:
            return 0
        if keys is self.protect_list and len(keys) >= self.protect_marked:
            start = self.protect_marked
        else:
            self.epoch += 1
        self.protect_list = keys if type(keys) is list else None
        self.protect_marked = len(keys)
        for key in (keys[start:] if start else keys):
            found = self.ids.get(key)
            if found is not None:
                i = found
                self.e[i].mark = self.epoch
                self.protect_marks += 1
        return self.epoch

    def evict_one(self, int t, int64_t nbytes=0):
        """Evict one victim of tier ``t`` for a value of ``nbytes``; False if none can go."""
        return self._evict_for(t, nbytes, 0)

    def set_quota(self, int32_t owner, int t, nbytes):
        if nbytes is None:
            self.quotas.pop((owner, t), None)
        else:
            self.quotas[(owner, t)] = nbytes

    def quota(self, int32_t owner, int t):
        return self.quotas.get((owner, t))

    def fits_quota(self, int t, int32_t owner, int64_t nbytes):
        """Whether ``nbytes`` more of ``owner`` fit its quota in tier ``t`` as it is now."""
        quota = self.quotas.get((owner, t)) if owner else None
        return quota is None or self._charged(owner, t) + nbytes <= quota

    def hold(self, int t, slot, int32_t owner, int64_t nbytes):
        """A slot of tier ``t`` reserved for ``owner`` stays uncommitted: charge it until
        `unhold`."""
        if owner:
            self.held[(t, slot)] = (owner, nbytes)
            self.held_bytes[(owner, t)] = self.held_bytes.get((owner, t), 0) + nbytes

    def unhold(self, int t, slot):
        """The reserved slot was committed or given back."""
        held = self.held.pop((t, slot), None)
        if held is not None:
            owner, nbytes = held
            self.held_bytes[(owner, t)] -= nbytes

    def enforce_quota(self, int t, int32_t owner, keep):
        """After a commit: evict ``owner``'s least recently used blocks of tier ``t`` other
        than ``keep`` while it is over its quota there."""
        cdef int32_t victim
        quota = self.quotas.get((owner, t)) if owner else None
        if quota is None:
            return
        while self._charged(owner, t) > quota:
            victim = self._victim(t, -1, owner)
            if victim < 0 or self.keys[victim] == keep:
                return
            self._evict(victim, t)

    # -- the dense API (the simulator's) ------------------------------------------------------

    def used_blocks(self, int t):
        return self.used[t]

    def replay(self, const int32_t[::1] flat, const int64_t[::1] starts,
               const int64_t[::1] input_tokens, int64_t block_tokens,
               int64_t[::1] hit_out, int64_t[::1] tier_hits, Py_ssize_t first=0,
               Py_ssize_t last=-1):
        """Replay requests ``first``..``last`` (exclusive; -1: to the end) of a trace as
        ids (dense mode): request r's blocks are ``flat[starts[r]:starts[r + 1]]``, each
        the child of the one before. Writes each request's hit tokens into ``hit_out[r]``
        and adds hit tokens per fastest tier into ``tier_hits``.

            hit = leading blocks held in some tier     (counted before any change)
            then each block, first first:  held -> a use (+ promotion to the write tier)
                                           new  -> into the first tier with room from the
                                                   write tier, evicting and demoting; a
                                                   request's own new blocks never go to
                                                   make room for their descendants
        """
        cdef Py_ssize_t r, j, a, h
        cdef int64_t n, pos
        cdef const int32_t* ids
        if not self.dense:
            raise ValueError("replay runs on a placement made without media (dense ids)")
        if last < 0:
            last = starts.shape[0] - 1
        for r in range(first, last):
            a = starts[r]
            ids = &flat[0] + a
            n = input_tokens[r]
            h = self._leading(ids, starts[r + 1] - a)
            hit_out[r] = h * block_tokens if h * block_tokens < n else n
            for j in range(h):
                pos = j * block_tokens
                if pos < n:
                    tier_hits[self._fastest_tier(ids[j])] += (
                        block_tokens if n - pos > block_tokens else n - pos)
            self._put_chain(ids, starts[r + 1] - a, block_tokens)

    cdef Py_ssize_t _leading(self, const int32_t* ids, Py_ssize_t n) noexcept:
        """How many of a chain's ``n`` blocks some tier holds, from the first on."""
        cdef Py_ssize_t h = 0
        while h < n and self.e[ids[h]].live and self.e[ids[h]].res:
            h += 1
        return h

    cdef int _fastest_tier(self, int32_t i) noexcept:
        """The fastest tier holding ``i``, or -1."""
        cdef int t = 0
        if not (self.e[i].live and self.e[i].res):
            return -1
        while not self.e[i].res >> t & 1:
            t += 1
        return t

    cdef int _use(self, int32_t i, int t) except -1:
        """A hit on ``i``, held in tier ``t`` at the fastest: a use, and a promotion to the
        write tier if the rules say so."""
        self._touch(i)
        if self.promote_on_hit and t > self.write_tier and self._store_in(
                self.write_tier, i, None, 0):
            self.promotions += 1
        return 0

    cdef int _put_chain(self, const int32_t* ids, Py_ssize_t n, int64_t block_tokens,
                        const int32_t* remote=NULL) except -1:
        """A request's ``n`` blocks after its hit is counted, first first: a held block is
        used (`_use`), a new one goes into the first tier with room from the write tier,
        each a child of the one before; the chain stops at the first that finds no room
        (a put_many's rule: its own new blocks are never evicted for their descendants).
        ``remote[j] >= 0``: block j was read from another node of a pool, which keeps it
        (this node keeps no copy, as a pool's node does not)."""
        cdef Py_ssize_t j
        cdef int32_t i, parent = -1
        cdef int64_t epoch
        cdef int t
        cdef bint placed
        self.epoch += 1
        epoch = self.epoch
        for j in range(n):
            i = ids[j]
            t = self._fastest_tier(i)
            if t >= 0:
                self._use(i, t)
            elif remote != NULL and remote[j] >= 0:
                pass
            else:
                placed = False
                for t in range(self.write_tier, self.num_tiers):
                    if self._reserve(t, block_tokens, 0, epoch) >= 0:
                        if not self.e[i].live:
                            self._create(i, block_tokens, 0)
                        if parent == i or self.e[i].parent >= 0:
                            parent = -1  # nothing to link
                        elif parent >= 0 and not self.e[parent].live:
                            self._create(parent, 0, 0)
                        self._insert(i, parent, block_tokens, t, 0)
                        self.e[i].mark = epoch
                        placed = True
                        break
                if not placed:
                    break
            parent = i
        return 0

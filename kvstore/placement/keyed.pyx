# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""The block index as Python code reads it (`KeyedIndex`): blocks by key or by id, their
tiers, uses and parents, pins, owners' usage; and the index operations the Store makes
itself (a recovered block, a committed copy, a dropped one). `BlockIndex` is the structure
underneath; `kvstore.placement._core.Placement` adds the decisions."""

from libc.stdint cimport int32_t, int64_t, uint8_t

from kvstore.placement.index cimport BlockIndex

import time


cdef class KeyedIndex(BlockIndex):
    """See the module docstring."""

    def _keyed_only(self):
        if self.dense:
            raise ValueError("this placement names its blocks by dense ids, not keys")

    def id_of(self, key):
        """The id of ``key``'s entry, held or a ghost, or -1."""
        return self.ids.get(key, -1)

    def lookup(self, key):
        """The id of a block some tier holds, or -1 (ghosts are not found)."""
        return self._held_id(key)

    def fastest(self, int32_t i):
        """The fastest tier holding block ``i``, or None if none holds it."""
        self._check_id(i)
        cdef uint8_t res = self.e[i].res
        cdef int t = 0
        if not res or not self.e[i].live:
            return None
        while not res >> t & 1:
            t += 1
        return t

    def residency(self, int32_t i):
        self._check_id(i)
        return self.e[i].res

    def is_in(self, int32_t i, int t):
        self._check_id(i)
        return bool(self.e[i].res >> t & 1)

    def nbytes(self, int32_t i):
        self._check_id(i)
        return self.e[i].nbytes

    def owner(self, int32_t i):
        self._check_id(i)
        return self.e[i].owner

    def uses(self, int32_t i):
        self._check_id(i)
        return self.e[i].uses

    def last_access(self, int32_t i):
        self._check_id(i)
        return self.e[i].last

    def generation(self, int32_t i):
        """A serial of the block that holds id ``i`` now (0: none): an id and its
        generation name one block across releases of the store lock."""
        self._check_id(i)
        return self.e[i].gen

    def key_of(self, int32_t i):
        self._check_id(i)
        return self.keys[i]

    def parent_of(self, int32_t i):
        """The key of block ``i``'s parent, or None."""
        self._check_id(i)
        parent = self.e[i].parent
        return None if parent < 0 else self.keys[parent]

    def children_in(self, int32_t i, int t):
        """How many child blocks of ``i`` tier ``t`` holds."""
        self._check_id(i)
        return self.children[i * self.num_tiers + t]

    def touch(self, int32_t i):
        """Record a use of block ``i``: the most recently used in every tier holding it."""
        self._check_id(i)
        self._touch(i)

    def touch_key(self, key):
        cdef int32_t i = self._held_id(key)
        if i >= 0:
            self._touch(i)

    def match_prefix(self, keys):
        """How many leading ``keys`` are held in some tier."""
        cdef int count = 0
        for key in keys:
            if self._held_id(key) < 0:
                break
            count += 1
        return count

    def __len__(self):
        cdef Py_ssize_t i, n = 0
        for i in range(self.num_ids):
            if self.e[i].live and self.e[i].res:
                n += 1
        return n

    def held_keys(self, int t=-1):
        """Keys of the blocks held in tier ``t`` (-1: in any), least recently used first."""
        cdef Py_ssize_t i
        found = []
        for i in range(self.num_ids):
            if self.e[i].live and self.e[i].res and (t < 0 or self.e[i].res >> t & 1):
                found.append((self.e[i].last, i))
        found.sort()
        return [self.keys[i] for _, i in found]

    def residencies(self):
        """``[(key, residency bits)]`` of every held block (bit t: tier t holds a copy)."""
        cdef Py_ssize_t i
        return [(self.keys[i], self.e[i].res) for i in range(self.num_ids)
                if self.e[i].live and self.e[i].res]

    # -- the change feed (a cluster node publishes what it holds from it) --------------------

    def track_changes(self, bint on):
        """Start (or stop) recording the keys whose residency changes; starting drops
        what was recorded."""
        self._keyed_only()
        self.changed = [] if on else None

    def take_changes(self):
        """``[(key, residency bits now; 0: no longer held)]`` of every key whose
        residency changed since tracking started or the last call, each once."""
        cdef int32_t i
        if self.changed is None:
            raise RuntimeError("take_changes() needs track_changes(True) first")
        changed, self.changed = self.changed, []
        now = {}
        for key in changed:
            if key not in now:
                i = self.ids.get(key, -1)
                now[key] = self.e[i].res if i >= 0 and self.e[i].live else 0
        return list(now.items())

    def missing_from(self, int t):
        """Keys of the blocks held in some tier but not in ``t``, least recently used first
        (what a flush to ``t`` writes)."""
        cdef Py_ssize_t i
        found = []
        for i in range(self.num_ids):
            if self.e[i].live and self.e[i].res and not self.e[i].res >> t & 1:
                found.append((self.e[i].last, i))
        found.sort()
        return [self.keys[i] for _, i in found]

    def recover(self, key, parent, int64_t nbytes, int t):
        """Index a block found in tier ``t`` at start (call oldest first, so that LRU order
        survives): held there, not counted as a use."""
        self._keyed_only()
        cdef int32_t i = self.ids.get(key, -1)
        if i < 0:
            i = self._new(key, nbytes, 0)
        self._ensure(i, self._parent_id(i, key, parent), nbytes, 0)
        self._add(i, t)
        self._touch(i)
        self.e[i].uses = 0

    def insert(self, key, parent, int64_t nbytes, int t, int32_t owner=0):
        """A committed copy of ``key`` (written by ``owner``) now lies in tier ``t`` and
        counts as a use. Returns its id."""
        self._keyed_only()
        cdef int32_t i = self.ids.get(key, -1)
        if i < 0:
            i = self._new(key, nbytes, owner)
        self._insert(i, self._parent_id(i, key, parent), nbytes, t, owner)
        return i

    def remove(self, int32_t i, int t):
        """Block ``i`` no longer has a copy in tier ``t`` (the media dropped it)."""
        self._check_id(i)
        self._remove(i, t)

    def victim(self, int t, partition=0, owner=None):
        """The key the policy would evict next from tier ``t`` (None: none), changing
        nothing: from ``partition`` (None: any), of ``owner`` (None: any)."""
        cdef int32_t i = self._victim(t, -1 if partition is None else partition,
                                      -1 if owner is None else owner)
        return None if i < 0 else (i if self.dense else self.keys[i])

    # pins

    def pin(self, int32_t i, double lease_s):
        """Pin block ``i`` for ``lease_s`` seconds: it is not evicted meanwhile. Returns
        the pin's id."""
        self._check_id(i)
        pin = self.next_pin
        self.next_pin += 1
        pins = self.pins.get(i)
        if pins is None:
            pins = self.pins[i] = {}
        pins[pin] = time.monotonic() + lease_s
        self.e[i].npins = len(pins)
        return pin

    def unpin(self, int32_t i, pin):
        """Release a pin; False if it had been revoked or had expired (the copy is
        suspect)."""
        self._check_id(i)
        pins = self.pins.get(i)
        if not pins or pin not in pins:
            return False
        deadline = pins.pop(pin)
        self.e[i].npins = len(pins)
        if not pins:
            del self.pins[i]
        return deadline >= time.monotonic()

    def is_pinned(self, int32_t i):
        self._check_id(i)
        return bool(self.e[i].npins) and self._is_pinned(i)

    def live_pins(self, int32_t i):
        """Ids of the pins on ``i`` whose lease has not run out."""
        self._check_id(i)
        if not self.e[i].npins or not self._is_pinned(i):
            return []
        return list(self.pins[i])

    # quotas

    def usage(self, int32_t owner):
        """``(bytes per tier, blocks per tier)`` of ``owner``'s held blocks (copies)."""
        usage = self.usage_of.get(owner)
        if usage is None:
            return [0] * self.num_tiers, [0] * self.num_tiers
        return list(usage[0]), list(usage[1])

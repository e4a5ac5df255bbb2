# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""The placement core: the block index, the eviction policies and every placement decision,
for the Store and for the hit-rate simulator alike (see ``kvstore/placement/__init__.py``).

Blocks are dense integer ids into arrays of C structs (`Entry`), reused when a block is
forgotten. The Store names blocks by key (``bytes``; ``ids`` maps them); the simulator
interns a trace's keys to ids once and calls the ``*_id`` methods and `replay` directly.

Each tier keeps its eviction candidates (every block it holds under LRU; the blocks with no
child in it under leaf-first LRU) in doubly linked lists through the ``prv``/``nxt``
arrays, one per *list key* (partition << 16 | owner), ordered by last use, least recent at
the head: a use moves a block to the tails of its lists, a block that becomes a candidate
is linked where its last use puts it (searched from both ends), and the victim is the
first unpinned block from a head. Invariant: a block is linked in tier t's list exactly
when it is a candidate of t.
"""

from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from libc.stdint cimport int32_t, int64_t, uint8_t
from libc.string cimport memset

import logging
import time

from kvstore.errors import StorageError
from kvstore.placement.rules import MAX_OWNER, OWNER_BITS, Admission, EvictionPolicy

log = logging.getLogger("kvstore.placement")

cdef enum:
    MAX_TIERS = 8
    SORTED_SEARCH_STEPS = 16  # a candidate out of order further from both ends is heaped
    KIND_LRU = 0
    KIND_LEAF = 1

# How a tier gives up a block's copy (``media.drop``'s ``how``).
DROP_EVICTED = 0  # an eviction: gone from this tier (durably where it is durable)
DROP_DELETED = 1  # a delete or an overwrite: durably
DROP_FORGOTTEN = 2  # no longer indexed; durable state left as it is


cdef struct Entry:
    int64_t last  # the tick of its last use
    int64_t nbytes
    int64_t gen  # serial of the block that holds this id (a reused id gets a new one)
    int64_t mark  # the protect epoch that marked it (see `_reserve`)
    int32_t parent  # -1: none
    int32_t nchild  # child entries that name it as parent (any tier, ghosts included)
    int32_t uses
    int32_t owner
    int32_t npins  # pins held (their deadlines are in ``pins``)
    int32_t busy  # copies of it being made (`_store_in`): never a victim nor forgotten
    uint8_t res  # residency: bit t set when tier t holds a committed copy
    uint8_t linked  # bit t set when it is in tier t's list of candidates
    uint8_t heaped  # bit t set when it is a candidate of tier t filed in its list's heap
    int64_t stamp  # scratch for `_purge`
    uint8_t live


cdef struct Item:
    int64_t tick
    int32_t id


cdef struct CHeap:
    Item* items
    Py_ssize_t n
    Py_ssize_t cap
    int64_t resident  # blocks resident under this heap's key
    int64_t key


cdef int heap_init(CHeap* h, int64_t key) except -1:
    h.cap = 64
    h.items = <Item*> PyMem_Malloc(h.cap * sizeof(Item))
    if h.items == NULL:
        raise MemoryError()
    h.n = 0
    h.resident = 0
    h.key = key
    return 0


cdef int heap_push(CHeap* h, int64_t tick, int32_t id) except -1:
    cdef Py_ssize_t i, parent
    cdef Item* grown
    if h.n == h.cap:
        grown = <Item*> PyMem_Realloc(h.items, 2 * h.cap * sizeof(Item))
        if grown == NULL:
            raise MemoryError()
        h.items = grown
        h.cap *= 2
    i = h.n
    h.n += 1
    while i > 0:
        parent = (i - 1) >> 1
        if h.items[parent].tick <= tick:
            break
        h.items[i] = h.items[parent]
        i = parent
    h.items[i].tick = tick
    h.items[i].id = id
    return 0


cdef inline void heap_sift_down(CHeap* h, Py_ssize_t i, int64_t tick, int32_t id) noexcept:
    cdef Py_ssize_t child
    cdef Py_ssize_t n = h.n
    while True:
        child = 2 * i + 1
        if child >= n:
            break
        if child + 1 < n and h.items[child + 1].tick < h.items[child].tick:
            child += 1
        if h.items[child].tick >= tick:
            break
        h.items[i] = h.items[child]
        i = child
    h.items[i].tick = tick
    h.items[i].id = id


cdef inline void heap_pop(CHeap* h) noexcept:
    """Drop the top item (n > 0)."""
    h.n -= 1
    if h.n > 0:
        heap_sift_down(h, 0, h.items[h.n].tick, h.items[h.n].id)


cdef void heapify(CHeap* h) noexcept:
    cdef Py_ssize_t i = h.n // 2
    while i > 0:
        i -= 1
        heap_sift_down(h, i, h.items[i].tick, h.items[i].id)


cdef class Heap:
    """A binary min-heap of (tick, id) items (`CHeap`), owned by a Python object."""

    cdef CHeap h

    def __cinit__(self, int64_t key):
        heap_init(&self.h, key)

    def __dealloc__(self):
        PyMem_Free(self.h.items)

    def __len__(self):
        return self.h.n


cdef struct CList:
    int32_t head  # the least recently used linked candidate, or -1
    int32_t tail
    int64_t size  # candidates linked
    int64_t key
    CHeap heap  # (last use, id) of candidates that came out of order (lazy: stale items)
    int64_t heaped  # candidates filed in the heap


cdef class Lru:
    """A doubly linked list of candidates through the core's ``prv``/``nxt`` arrays,
    owned by a Python object."""

    cdef CList l

    def __cinit__(self, int64_t key):
        self.l.head = self.l.tail = -1
        self.l.size = 0
        self.l.key = key
        self.l.heaped = 0
        heap_init(&self.l.heap, key)

    def __dealloc__(self):
        PyMem_Free(self.l.heap.items)

    def __len__(self):
        return self.l.size + self.l.heaped


cdef class _CanFree:
    """``can_free(key)`` for a media's reclaim: the block is held, not held back (pinned or
    being copied), unprotected."""

    cdef Placement core
    cdef int64_t protect

    def __call__(self, key):
        cdef Placement core = self.core
        id = core.ids.get(key)
        if id is None:
            return False
        cdef int32_t i = id
        if not core.e[i].res or core._held_back(i):
            return False
        return not (self.protect and core.e[i].mark == self.protect)


cdef class Placement:
    """See the module docstring and ``kvstore/placement/__init__.py``."""

    cdef Entry* e
    cdef int32_t* children  # id * num_tiers + t: child entries resident in tier t
    cdef int32_t* prv  # id * num_tiers + t: the candidate before it in tier t's list
    cdef int32_t* nxt
    cdef int32_t* free_ids
    cdef Py_ssize_t num_free
    cdef Py_ssize_t cap_ids
    cdef readonly Py_ssize_t num_ids  # ids handed out so far (high-water mark)
    cdef readonly bint dense  # ids given by the caller (the simulator), no keys
    cdef public dict ids  # key -> id (keyed mode)
    cdef list keys  # id -> key (keyed mode)
    cdef readonly int num_tiers
    cdef int kind[MAX_TIERS]
    cdef bint second_use[MAX_TIERS]
    cdef list partition_of  # per tier: callable(nbytes) -> partition, or None
    cdef list lists  # per tier: {list key (partition << 16 | owner): Lru}
    cdef list part_keys  # per tier: {partition: [list keys]}
    cdef list lru0  # per tier: the Lru of key 0, made at start (the simulator's only one)
    cdef CList* l0[MAX_TIERS]  # their lists
    cdef bint partitioned[MAX_TIERS]  # partition_of[t] is not None
    cdef bint counted  # no media: tiers counted in blocks (the simulator)
    cdef readonly object media  # None: the simulator's counted tiers
    cdef int64_t used[MAX_TIERS]  # counted mode: blocks held per tier
    cdef int64_t cap[MAX_TIERS]  # counted mode: capacity in blocks
    cdef readonly int write_tier
    cdef readonly bint promote_on_hit
    cdef public int64_t tick
    cdef int64_t gen_counter
    cdef int64_t epoch
    cdef int64_t purge_stamp
    cdef public int64_t evictions
    cdef public int64_t demotions
    cdef public int64_t promotions
    cdef dict pins  # id -> {pin id: deadline (time.monotonic)}
    cdef int64_t next_pin
    cdef dict usage_of  # owner -> [bytes per tier, blocks per tier]
    cdef dict quotas  # (owner, tier) -> bytes
    cdef dict held  # (tier, slot) -> (owner, bytes): reserved for an owner, not committed
    cdef dict held_bytes  # (owner, tier) -> bytes

    def __cinit__(self):
        self.e = NULL
        self.children = NULL
        self.prv = NULL
        self.nxt = NULL
        self.free_ids = NULL

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
        cdef int num_tiers = len(policies)
        if not 0 < num_tiers <= MAX_TIERS:
            raise ValueError(f"a placement has 1 to {MAX_TIERS} tiers, got {num_tiers}")
        self.num_tiers = num_tiers
        admissions = list(admissions) if admissions is not None else [Admission.ALWAYS] * num_tiers
        self.partition_of = list(partition_of) if partition_of is not None else [None] * num_tiers
        if len(admissions) != num_tiers or len(self.partition_of) != num_tiers:
            raise ValueError("one admission and one partition rule per tier")
        for t in range(num_tiers):
            self.kind[t] = KIND_LEAF if EvictionPolicy(policies[t]) is EvictionPolicy.LEAF_LRU else KIND_LRU
            self.second_use[t] = Admission(admissions[t]) is Admission.SECOND_USE
            self.used[t] = 0
            self.cap[t] = 0
        self.media = media
        self.counted = media is None
        self.dense = media is None if keyed is None else not keyed
        if self.dense and not self.counted:
            raise ValueError("a placement with media names its blocks by key")
        if media is None:
            if capacity_blocks is None or len(capacity_blocks) != num_tiers:
                raise ValueError("without media, give capacity_blocks: one per tier")
            for t in range(num_tiers):
                self.cap[t] = capacity_blocks[t]
        if not 0 <= write_tier < num_tiers:
            raise ValueError(f"write tier {write_tier} is not one of {num_tiers} tiers")
        self.write_tier = write_tier
        self.promote_on_hit = promote_on_hit
        self.lists = [{} for _ in range(num_tiers)]
        self.part_keys = [{} for _ in range(num_tiers)]
        self.lru0 = []
        for t in range(num_tiers):
            self.lru0.append(self._lru_obj(t, 0))
            self.l0[t] = &(<Lru> self.lru0[t]).l
            self.partitioned[t] = self.partition_of[t] is not None
        self.ids = {}
        self.keys = []
        self.pins = {}
        self.usage_of = {}
        self.quotas = {}
        self.held = {}
        self.held_bytes = {}
        self.next_pin = 1
        self._grow(max(num_ids, 1024))
        if self.dense:
            self.num_ids = num_ids

    def __dealloc__(self):
        PyMem_Free(self.e)
        PyMem_Free(self.children)
        PyMem_Free(self.prv)
        PyMem_Free(self.nxt)
        PyMem_Free(self.free_ids)

    cdef int _grow(self, Py_ssize_t want) except -1:
        cdef Py_ssize_t cap = self.cap_ids if self.cap_ids else 1024
        while cap < want:
            cap *= 2
        if cap == self.cap_ids:
            return 0
        cdef Entry* e = <Entry*> PyMem_Realloc(self.e, cap * sizeof(Entry))
        if e == NULL:
            raise MemoryError()
        self.e = e
        cdef int32_t* children = <int32_t*> PyMem_Realloc(
            self.children, cap * self.num_tiers * sizeof(int32_t))
        if children == NULL:
            raise MemoryError()
        self.children = children
        cdef int32_t* prv = <int32_t*> PyMem_Realloc(self.prv, cap * self.num_tiers * sizeof(int32_t))
        if prv == NULL:
            raise MemoryError()
        self.prv = prv
        cdef int32_t* nxt = <int32_t*> PyMem_Realloc(self.nxt, cap * self.num_tiers * sizeof(int32_t))
        if nxt == NULL:
            raise MemoryError()
        self.nxt = nxt
        cdef int32_t* free_ids = <int32_t*> PyMem_Realloc(self.free_ids, cap * sizeof(int32_t))
        if free_ids == NULL:
            raise MemoryError()
        self.free_ids = free_ids
        memset(&self.e[self.cap_ids], 0, (cap - self.cap_ids) * sizeof(Entry))
        self.cap_ids = cap
        return 0

    # -- entries ----------------------------------------------------------------------------

    cdef inline void _create(self, int32_t i, int64_t nbytes, int32_t owner) noexcept:
        cdef Entry* x = &self.e[i]
        x.last = 0
        x.nbytes = nbytes
        self.gen_counter += 1
        x.gen = self.gen_counter
        x.mark = 0
        x.parent = -1
        x.nchild = 0
        x.uses = 0
        x.owner = owner
        x.npins = 0
        x.busy = 0
        x.res = 0
        x.linked = 0
        x.heaped = 0
        x.live = 1
        memset(&self.children[i * self.num_tiers], 0, self.num_tiers * sizeof(int32_t))

    cdef int32_t _new(self, object key, int64_t nbytes, int32_t owner) except -1:
        """A new ghost entry for ``key`` (keyed mode)."""
        cdef int32_t i
        if self.num_free:
            self.num_free -= 1
            i = self.free_ids[self.num_free]
            self.keys[i] = key
        else:
            if self.num_ids == self.cap_ids:
                self._grow(self.num_ids + 1)
            i = <int32_t> self.num_ids
            self.num_ids += 1
            self.keys.append(key)
        self.ids[key] = i
        self._create(i, nbytes, owner)
        return i

    cdef int32_t _ghost(self, object key, int32_t i) except -2:
        """The entry of a parent, created (as a ghost of no size) if absent."""
        if not self.dense:
            found = self.ids.get(key)
            if found is not None:
                return found
            return self._new(key, 0, 0)
        if not self.e[i].live:
            self._create(i, 0, 0)
        return i

    cdef int32_t _parent_id(self, int32_t i, object key, object parent) except -2:
        """The id to link as ``i``'s parent (a ghost made for it if new), or -1 when ``i``
        has one already or ``parent`` names none."""
        if parent is None or parent == key or self.e[i].parent >= 0:
            return -1
        return self._ghost(parent, -1)

    cdef int _free(self, int32_t i) except -1:
        self.e[i].live = 0
        self.e[i].gen = 0
        if self.e[i].npins:
            self.pins.pop(i, None)
            self.e[i].npins = 0
        if not self.dense:
            del self.ids[self.keys[i]]
            self.keys[i] = None
            self.free_ids[self.num_free] = i
            self.num_free += 1
        return 0

    cdef int _drop_if_unused(self, int32_t i) except -1:
        """Forget ``i`` (and ghost ancestors) if no tier holds it and no child names it."""
        cdef int32_t parent
        while (i >= 0 and self.e[i].live and not self.e[i].res and not self.e[i].nchild
               and not self.e[i].busy):
            parent = self.e[i].parent
            self._free(i)
            if parent < 0:
                return 0
            self.e[parent].nchild -= 1
            i = parent
        return 0

    cdef int _link(self, int32_t i, int32_t parent) except -1:
        cdef int t
        cdef uint8_t res = self.e[i].res
        self.e[i].parent = parent
        self.e[parent].nchild += 1
        for t in range(self.num_tiers):
            if res >> t & 1:
                self._child_added(parent, t)
        return 0

    cdef inline int _touch(self, int32_t i) except -1:
        """A use of ``i``: the most recently used of every tier holding it."""
        cdef int t
        cdef uint8_t member = self.e[i].linked | self.e[i].heaped
        cdef CList* lru
        self.tick += 1
        self.e[i].last = self.tick
        self.e[i].uses += 1
        if member:
            for t in range(self.num_tiers):
                if member >> t & 1:
                    lru = self._lru_of(i, t)
                    if lru.tail != i:
                        self._drop_candidate(i, t, lru)
                        self._append(i, t, lru)
        return 0

    cdef int _ensure(self, int32_t i, int32_t parent, int64_t nbytes, int32_t owner) except -1:
        """(``i`` live.) A ghost takes the new size and owner; links ``parent`` (>= 0,
        live) if ``i`` has none."""
        if not self.e[i].res:
            self.e[i].nbytes = nbytes
            self.e[i].owner = owner
        if parent >= 0 and self.e[i].parent < 0 and parent != i:
            self._link(i, parent)
        return 0

    cdef int _add(self, int32_t i, int t) except -1:
        """``i`` now has a committed copy in tier ``t``."""
        cdef int32_t parent
        if self.e[i].res >> t & 1:
            return 0
        self.e[i].res |= 1 << t
        if self.e[i].owner:
            self._charge(i, t, 1)
        parent = self.e[i].parent
        if parent >= 0:
            self._child_added(parent, t)
        if self.kind[t] == KIND_LRU or self.children[i * self.num_tiers + t] == 0:
            self._link_sorted(i, t, self._lru_of(i, t))
        return 0

    cdef inline int _child_added(self, int32_t parent, int t) except -1:
        cdef int32_t* count = &self.children[parent * self.num_tiers + t]
        count[0] += 1
        if count[0] == 1 and (self.e[parent].linked | self.e[parent].heaped) >> t & 1 \
                and self.kind[t] == KIND_LEAF:
            self._drop_candidate(parent, t, self._lru_of(parent, t))  # no longer a leaf of t
        return 0

    cdef int _remove(self, int32_t i, int t) except -1:
        """``i`` no longer has a copy in tier ``t``; forget it if nothing refers to it."""
        cdef int32_t parent
        cdef int32_t* count
        if not self.e[i].res >> t & 1:
            return 0
        self.e[i].res &= ~(1 << t)
        if self.e[i].owner:
            self._charge(i, t, -1)
        if (self.e[i].linked | self.e[i].heaped) >> t & 1:
            self._drop_candidate(i, t, self._lru_of(i, t))
        parent = self.e[i].parent
        if parent >= 0:
            count = &self.children[parent * self.num_tiers + t]
            count[0] -= 1
            if count[0] < 0:
                raise AssertionError(f"child count below zero for block {parent}")
            if count[0] == 0 and self.e[parent].res >> t & 1 and self.kind[t] == KIND_LEAF:
                self._link_sorted(parent, t, self._lru_of(parent, t))  # a new leaf of t
        if not self.e[i].res:
            if self.e[i].npins:
                self.pins.pop(i, None)
                self.e[i].npins = 0
            self._drop_if_unused(i)
        return 0

    cdef int _insert(self, int32_t i, int32_t parent, int64_t nbytes, int t,
                     int32_t owner) except -1:
        """A committed copy of live entry ``i`` now lies in tier ``t`` and counts as a use:
        `_ensure`, `_touch`, `_add` in that order."""
        self._ensure(i, parent, nbytes, owner)
        self._touch(i)
        self._add(i, t)
        return 0

    cdef int _charge(self, int32_t i, int t, int sign) except -1:
        owner = self.e[i].owner
        usage = self.usage_of.get(owner)
        if usage is None:
            usage = self.usage_of[owner] = [[0] * self.num_tiers, [0] * self.num_tiers]
        usage[0][t] += sign * self.e[i].nbytes
        usage[1][t] += sign
        if usage[0][t] < 0:
            raise AssertionError(f"owner {owner} uses less than nothing")
        return 0

    # -- policies: one list per tier and key, of its candidates, least recently used first ----

    cdef inline int64_t _lru_key(self, int32_t i, int t) except? -1:
        if not self.partitioned[t]:
            return self.e[i].owner
        return (<int64_t> self.partition_of[t](self.e[i].nbytes)) << OWNER_BITS | self.e[i].owner

    cdef Lru _lru_obj(self, int t, int64_t key):
        lists = <dict> self.lists[t]
        lru = lists.get(key)
        if lru is None:
            lru = lists[key] = Lru(key)
            (<dict> self.part_keys[t]).setdefault(key >> OWNER_BITS, []).append(key)
        return <Lru> lru

    cdef inline CList* _lru_of(self, int32_t i, int t) except NULL:
        """The list ``i`` belongs in for tier ``t`` (by its partition and owner)."""
        if not self.partitioned[t] and self.e[i].owner == 0:
            return self.l0[t]
        return &self._lru_obj(t, self._lru_key(i, t)).l

    cdef inline void _unlink(self, int32_t i, int t, CList* lru) noexcept:
        cdef int T = self.num_tiers
        cdef int32_t before = self.prv[i * T + t], after = self.nxt[i * T + t]
        if before >= 0:
            self.nxt[before * T + t] = after
        else:
            lru.head = after
        if after >= 0:
            self.prv[after * T + t] = before
        else:
            lru.tail = before
        self.e[i].linked &= ~(1 << t)
        lru.size -= 1

    cdef inline void _drop_candidate(self, int32_t i, int t, CList* lru) noexcept:
        """``i`` is no longer a candidate of tier ``t`` (linked or heaped)."""
        if self.e[i].linked >> t & 1:
            self._unlink(i, t, lru)
        else:  # its heap item goes stale
            self.e[i].heaped &= ~(1 << t)
            lru.heaped -= 1

    cdef inline void _append(self, int32_t i, int t, CList* lru) noexcept:
        self._insert_after(i, t, lru, lru.tail)

    cdef inline void _insert_after(self, int32_t i, int t, CList* lru, int32_t before) noexcept:
        """Link ``i`` after ``before`` (-1: at the head)."""
        cdef int T = self.num_tiers
        cdef int32_t after = lru.head if before < 0 else self.nxt[before * T + t]
        self.prv[i * T + t] = before
        self.nxt[i * T + t] = after
        if before >= 0:
            self.nxt[before * T + t] = i
        else:
            lru.head = i
        if after >= 0:
            self.prv[after * T + t] = i
        else:
            lru.tail = i
        self.e[i].linked |= 1 << t
        lru.size += 1

    cdef int _link_sorted(self, int32_t i, int t, CList* lru) except -1:
        """Make ``i`` a candidate where its last use puts it: linked if a short search from
        both ends finds its place (a new block goes at the tail, a parent left a leaf by its
        evicted child at the head), else filed in the list's heap."""
        cdef int T = self.num_tiers
        cdef int64_t last = self.e[i].last
        cdef int32_t back = lru.tail, front = lru.head
        cdef int steps
        for steps in range(SORTED_SEARCH_STEPS):
            if back < 0:
                self._insert_after(i, t, lru, -1)
                return 0
            if self.e[back].last <= last:
                self._insert_after(i, t, lru, back)
                return 0
            if front < 0:
                self._insert_after(i, t, lru, lru.tail)
                return 0
            if self.e[front].last > last:
                self._insert_after(i, t, lru, self.prv[front * T + t])
                return 0
            back = self.prv[back * T + t]
            front = self.nxt[front * T + t]
        heap_push(&lru.heap, last, i)
        self.e[i].heaped |= 1 << t
        lru.heaped += 1
        if lru.heap.n > 2 * lru.heaped + 64:
            self._purge(lru, t)
        return 0

    cdef inline bint _filed(self, int32_t i, int64_t tick, int t, CList* lru) except -1:
        """Whether heap item (tick, i) of ``lru`` is current."""
        return (self.e[i].heaped >> t & 1 and self.e[i].last == tick
                and (self.e[i].owner if not self.partitioned[t]
                     else self._lru_key(i, t)) == lru.key)

    cdef int _purge(self, CList* lru, int t) except -1:
        """Rebuild ``lru``'s heap with one item per heaped candidate."""
        cdef CHeap* heap = &lru.heap
        cdef Py_ssize_t k, kept = 0
        cdef int32_t i
        self.purge_stamp += 1
        for k in range(heap.n):
            i = heap.items[k].id
            if self._filed(i, heap.items[k].tick, t, lru) and self.e[i].stamp != self.purge_stamp:
                self.e[i].stamp = self.purge_stamp
                heap.items[kept] = heap.items[k]
                kept += 1
        heap.n = kept
        heapify(heap)
        return 0

    cdef int32_t _top(self, CList* lru, int t) except -2:
        """The least recently used candidate of ``lru`` that is neither pinned nor being
        copied (`_held_back`), or -1: the first of the linked ones or the top of the heap,
        whichever was used less lately."""
        cdef int32_t i = lru.head, filed = -1
        cdef CHeap* heap = &lru.heap
        cdef list pinned = None
        while i >= 0:
            if not self._held_back(i):
                break
            i = self.nxt[i * self.num_tiers + t]
        while heap.n:
            filed = heap.items[0].id
            if not self._filed(filed, heap.items[0].tick, t, lru):
                heap_pop(heap)  # stale
                filed = -1
                continue
            if self._held_back(filed):
                if pinned is None:
                    pinned = []
                pinned.append(filed)
                heap_pop(heap)
                filed = -1
                continue
            break
        if pinned is not None:
            for k in pinned:
                heap_push(heap, self.e[<int32_t> k].last, <int32_t> k)
        if filed >= 0 and (i < 0 or self.e[filed].last < self.e[i].last):
            return filed
        return i

    cdef inline bint _held_back(self, int32_t i) except -1:
        """Whether ``i`` may not be evicted now: pinned, or a copy of it is being made."""
        return self.e[i].busy or (self.e[i].npins and self._is_pinned(i))

    cdef int32_t _victim(self, int t, int64_t partition, int64_t owner) except -2:
        """The block to evict next from tier ``t``, or -1: from ``partition`` (-1: any),
        of ``owner`` (-1: any; then the least recently used of all)."""
        cdef int32_t best = -1, found
        if partition == 0 and owner < 0 and not self.partitioned[t] and len(
                <dict> self.lists[t]) == 1:
            return self._top(self.l0[t], t)  # the simulator's case: one list
        if partition >= 0:
            keys = (<dict> self.part_keys[t]).get(partition, ())
            if owner < 0 and len(keys) == 1:  # one owner: the common case
                return self._top(&(<Lru> (<dict> self.lists[t])[keys[0]]).l, t)
        else:
            keys = [k for ks in (<dict> self.part_keys[t]).values() for k in ks]
        for key in keys:
            if owner >= 0 and key & MAX_OWNER != owner:
                continue
            found = self._top(&(<Lru> (<dict> self.lists[t])[key]).l, t)
            if found >= 0 and (best < 0 or self.e[found].last < self.e[best].last):
                best = found
        return best

    cdef inline int64_t _partition(self, int t, int64_t nbytes) except? -1:
        return self.partition_of[t](nbytes) if self.partitioned[t] else 0

    # -- pins ---------------------------------------------------------------------------------

    cdef bint _is_pinned(self, int32_t i) except -1:
        pins = self.pins.get(i)
        if not pins:
            self.e[i].npins = 0
            return False
        now = time.monotonic()
        for pin in [p for p, deadline in pins.items() if deadline < now]:
            del pins[pin]
        self.e[i].npins = len(pins)
        if not pins:
            del self.pins[i]
            return False
        return True

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
                    log.warning("eviction: could not demote a block to tier %d: %s", lower, e)
        if self.counted:
            self.used[t] -= 1
        else:
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

    cdef inline int32_t _held_id(self, object key):
        """The id of ``key`` if some tier holds it, else -1."""
        found = self.ids.get(key)
        if found is None:
            return -1
        cdef int32_t i = found
        return i if self.e[i].res else -1

    def id_of(self, key):
        """The id of ``key``'s entry, held or a ghost, or -1."""
        return self.ids.get(key, -1)

    def lookup(self, key):
        """The id of a block some tier holds, or -1 (ghosts are not found)."""
        return self._held_id(key)

    def fastest(self, int32_t i):
        """The fastest tier holding block ``i`` (which must be held)."""
        cdef uint8_t res = self.e[i].res
        cdef int t = 0
        while not res >> t & 1:
            t += 1
        return t

    def residency(self, int32_t i):
        return self.e[i].res

    def is_in(self, int32_t i, int t):
        return bool(self.e[i].res >> t & 1)

    def nbytes(self, int32_t i):
        return self.e[i].nbytes

    def owner(self, int32_t i):
        return self.e[i].owner

    def uses(self, int32_t i):
        return self.e[i].uses

    def last_access(self, int32_t i):
        return self.e[i].last

    def generation(self, int32_t i):
        """A serial of the block that holds id ``i`` now (0: none): an id and its
        generation name one block across releases of the store lock."""
        return self.e[i].gen

    def key_of(self, int32_t i):
        return self.keys[i]

    def parent_of(self, int32_t i):
        """The key of block ``i``'s parent, or None."""
        parent = self.e[i].parent
        return None if parent < 0 else self.keys[parent]

    def children_in(self, int32_t i, int t):
        """How many child blocks of ``i`` tier ``t`` holds."""
        return self.children[i * self.num_tiers + t]

    def touch(self, int32_t i):
        """Record a use of block ``i``: the most recently used in every tier holding it."""
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
        cdef int32_t i = self.ids.get(key, -1)
        if i < 0:
            i = self._new(key, nbytes, owner)
        self._insert(i, self._parent_id(i, key, parent), nbytes, t, owner)
        return i

    def remove(self, int32_t i, int t):
        """Block ``i`` no longer has a copy in tier ``t`` (the media dropped it)."""
        self._remove(i, t)

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
        if (self.promote_on_hit and t > w and self.e[i].gen == gen and self.e[i].live
                and self.e[i].res and not self.e[i].res >> w & 1):
            if self._store_in(w, i, src, 0):
                self.promotions += 1
                return True
        return False

    def forget(self, key, *, bint durable):
        """Drop every copy of ``key`` (a delete or an overwrite). Live pins are handed to
        the media's ``retire`` with the first copy (it may keep that slot for them); the
        others are revoked: those reads become misses."""
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
                if not (live and self.media.retire(t, key, live)):
                    self.media.drop(t, key, how)
                else:
                    live = None  # readers copy the fastest copy: only that one is in use
                self._remove(i, t)

    cdef int64_t _protect(self, object keys) except -1:
        """Mark ``keys`` with a new epoch (0 if none)."""
        cdef int32_t i
        if not keys:
            return 0
        self.epoch += 1
        for key in keys:
            found = self.ids.get(key)
            if found is not None:
                i = found
                self.e[i].mark = self.epoch
        return self.epoch

    def evict_one(self, int t, int64_t nbytes=0):
        """Evict one victim of tier ``t`` for a value of ``nbytes``; False if none can go."""
        return self._evict_for(t, nbytes, 0)

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
        pins = self.pins.get(i)
        if not pins or pin not in pins:
            return False
        deadline = pins.pop(pin)
        self.e[i].npins = len(pins)
        if not pins:
            del self.pins[i]
        return deadline >= time.monotonic()

    def is_pinned(self, int32_t i):
        return bool(self.e[i].npins) and self._is_pinned(i)

    def live_pins(self, int32_t i):
        """Ids of the pins on ``i`` whose lease has not run out."""
        if not self.e[i].npins or not self._is_pinned(i):
            return []
        return list(self.pins[i])

    # quotas

    def set_quota(self, int32_t owner, int t, nbytes):
        if nbytes is None:
            self.quotas.pop((owner, t), None)
        else:
            self.quotas[(owner, t)] = nbytes

    def quota(self, int32_t owner, int t):
        return self.quotas.get((owner, t))

    def usage(self, int32_t owner):
        """``(bytes per tier, blocks per tier)`` of ``owner``'s held blocks (copies)."""
        usage = self.usage_of.get(owner)
        if usage is None:
            return [0] * self.num_tiers, [0] * self.num_tiers
        return list(usage[0]), list(usage[1])

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
        cdef Py_ssize_t r, j, a, b, h
        cdef int32_t i, parent
        cdef int64_t n, hit, pos, epoch
        cdef int t, w = self.write_tier
        cdef bint placed
        if not self.dense:
            raise ValueError("replay runs on a placement made without media (dense ids)")
        if last < 0:
            last = starts.shape[0] - 1
        for r in range(first, last):
            a = starts[r]
            b = starts[r + 1]
            n = input_tokens[r]
            h = 0
            while a + h < b and self.e[flat[a + h]].live and self.e[flat[a + h]].res:
                h += 1
            hit = h * block_tokens
            hit_out[r] = hit if hit < n else n
            for j in range(h):
                pos = j * block_tokens
                if pos < n:
                    i = flat[a + j]
                    t = 0
                    while not self.e[i].res >> t & 1:
                        t += 1
                    tier_hits[t] += block_tokens if n - pos > block_tokens else n - pos
            parent = -1
            self.epoch += 1
            epoch = self.epoch
            for j in range(a, b):
                i = flat[j]
                if self.e[i].live and self.e[i].res:
                    t = 0
                    while not self.e[i].res >> t & 1:
                        t += 1
                    self._touch(i)
                    if self.promote_on_hit and t > w and self._store_in(w, i, None, 0):
                        self.promotions += 1
                else:
                    placed = False
                    for t in range(w, self.num_tiers):
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
                        break  # put_many stops at the first block that finds no room
                parent = i


def infinite_bound(const int32_t[::1] flat, const int64_t[::1] starts,
                   const int64_t[::1] input_tokens, int64_t block_tokens, Py_ssize_t num_ids,
                   int64_t[::1] hit_out):
    """Each request's hit tokens in a cache that never evicts (into ``hit_out``)."""
    cdef Py_ssize_t r, j, a, b, h
    cdef int64_t hit
    cdef uint8_t* seen = <uint8_t*> PyMem_Malloc(max(num_ids, 1))
    if seen == NULL:
        raise MemoryError()
    memset(seen, 0, max(num_ids, 1))
    try:
        for r in range(starts.shape[0] - 1):
            a, b = starts[r], starts[r + 1]
            h = 0
            while a + h < b and seen[flat[a + h]]:
                h += 1
            hit = h * block_tokens
            hit_out[r] = hit if hit < input_tokens[r] else input_tokens[r]
            for j in range(a, b):
                seen[flat[j]] = 1
    finally:
        PyMem_Free(seen)


def belady(const int32_t[::1] flat, const int64_t[::1] starts,
           const int64_t[::1] input_tokens, int64_t block_tokens, Py_ssize_t num_ids,
           int64_t capacity_blocks, int64_t[::1] hit_out):
    """Belady's farthest-next-use cache of ``capacity_blocks``, with bypass (a block used
    later than everything held is not admitted); each request's hit tokens into
    ``hit_out``. Returns the number of evictions.

    A parent is always used before its child, so its next use comes first: the cache
    evicts chains from their tails and stays prefix-closed."""
    cdef Py_ssize_t num = flat.shape[0]
    cdef Py_ssize_t r, j, a, b, h, pos, k
    cdef int64_t hit, nxt, evictions = 0, num_held = 0
    cdef int32_t key, victim
    cdef int64_t* next_use = <int64_t*> PyMem_Malloc(max(num, 1) * sizeof(int64_t))
    cdef int64_t* last = <int64_t*> PyMem_Malloc(max(num_ids, 1) * sizeof(int64_t))
    cdef int64_t* held = <int64_t*> PyMem_Malloc(max(num_ids, 1) * sizeof(int64_t))
    cdef Heap heap_obj = Heap(0)  # (-next use, id); stale when held[id] differs
    cdef CHeap* heap = &heap_obj.h
    if next_use == NULL or last == NULL or held == NULL:
        PyMem_Free(next_use)
        PyMem_Free(last)
        PyMem_Free(held)
        raise MemoryError()
    try:
        for k in range(num_ids):
            last[k] = -1
            held[k] = -1
        for pos in range(num - 1, -1, -1):  # next use of each access; num + pos if none
            key = flat[pos]
            next_use[pos] = last[key] if last[key] >= 0 else num + pos
            last[key] = pos
        pos = 0
        for r in range(starts.shape[0] - 1):
            a, b = starts[r], starts[r + 1]
            h = 0
            while a + h < b and held[flat[a + h]] >= 0:
                h += 1
            hit = h * block_tokens
            hit_out[r] = hit if hit < input_tokens[r] else input_tokens[r]
            for j in range(a, b):
                key = flat[j]
                nxt = next_use[pos]
                pos += 1
                if held[key] >= 0:
                    held[key] = nxt
                    heap_push(heap, -nxt, key)
                    continue
                if num_held >= capacity_blocks:
                    while True:  # the farthest valid item
                        victim = heap.items[0].id
                        if held[victim] == -heap.items[0].tick:
                            break
                        heap_pop(heap)
                    if -heap.items[0].tick < nxt:
                        continue  # used later than anything held: not admitted
                    heap_pop(heap)
                    held[victim] = -1
                    num_held -= 1
                    evictions += 1
                held[key] = nxt
                num_held += 1
                heap_push(heap, -nxt, key)
            if heap.n > 4 * capacity_blocks + 64:  # keep the valid items only
                h = 0
                for k in range(heap.n):
                    victim = heap.items[k].id
                    if held[victim] == -heap.items[k].tick:
                        heap.items[h] = heap.items[k]
                        h += 1
                heap.n = h
                heapify(heap)
        return evictions
    finally:
        PyMem_Free(next_use)
        PyMem_Free(last)
        PyMem_Free(held)

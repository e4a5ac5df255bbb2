# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""The placement core's block index (`BlockIndex`): which blocks exist, their prefix tree,
which tiers hold them, their uses, pins and owners, and each tier's eviction candidates.
The decisions built on it are `kvstore.placement._core.Placement`'s.

Blocks are dense integer ids into arrays of C structs (`Entry`), reused when a block is
forgotten. The Store names blocks by key (``bytes``; ``ids`` maps them); the simulator
gives dense ids of its own (an interned trace).

A block with no copy left lives on as a *ghost* while a child names it, so that a parent
that comes back finds its children counted; a ghost with no children is forgotten, and so
on up the chain.

Each tier keeps its eviction candidates (every block it holds under LRU; the blocks with no
child in it under leaf-first LRU) in doubly linked lists through the ``prv``/``nxt``
arrays, one per *list key* (partition << 16 | owner), ordered by last use, least recent at
the head: a use moves a block to the tails of its lists; a block that becomes a candidate
out of order (demoted with its old last use, a parent left a leaf) is linked where its last
use puts it when a short search from both ends finds the place, else filed in the list's
lazy heap. The victim is the least recently used of a head and a heap top that is not held
back (pinned, or being copied). Invariant: a block is a candidate of tier t (linked or
heaped in its list) exactly when it is one.
"""

from cpython.mem cimport PyMem_Free, PyMem_Realloc
from libc.stdint cimport int32_t, int64_t, uint8_t
from libc.string cimport memset

from kvstore.placement.heap cimport heap_init, heap_pop, heap_push, heapify

import time

from kvstore.placement.rules import MAX_OWNER, OWNER_BITS, EvictionPolicy


cdef class Lru:
    """A doubly linked list of candidates through the index's ``prv``/``nxt`` arrays, and
    its heap, owned by a Python object."""

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


cdef class BlockIndex:
    """See the module docstring."""

    def __cinit__(self):
        self.e = NULL
        self.children = NULL
        self.prv = NULL
        self.nxt = NULL
        self.free_ids = NULL

    def __init__(self, policies, partition_of=None, *, bint dense=False,
                 Py_ssize_t num_ids=0):
        """``policies``: one `EvictionPolicy` per tier, fastest first; ``partition_of``:
        per tier, a callable giving the partition of a value of n bytes (a memory tier's
        size class), or None. ``dense``: blocks are ids ``0 <= id < num_ids`` the caller
        gives, not keys."""
        cdef int t
        cdef int num_tiers = len(policies)
        if not 0 < num_tiers <= MAX_TIERS:
            raise ValueError(f"a placement has 1 to {MAX_TIERS} tiers, got {num_tiers}")
        self.num_tiers = num_tiers
        self.partition_of = list(partition_of) if partition_of is not None else [None] * num_tiers
        if len(self.partition_of) != num_tiers:
            raise ValueError("one partition rule per tier")
        for t in range(num_tiers):
            self.kind[t] = KIND_LEAF if EvictionPolicy(policies[t]) is EvictionPolicy.LEAF_LRU else KIND_LRU
        self.dense = dense
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
        self.next_pin = 1
        self._grow(max(num_ids, 1024))
        if dense:
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

    cdef void _create(self, int32_t i, int64_t nbytes, int32_t owner) noexcept:
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

    cdef int _touch(self, int32_t i) except -1:
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
        if not self.e[i].res:  # a new block, or a ghost given a value again: a new serial
            self.gen_counter += 1
            self.e[i].gen = self.gen_counter
        self.e[i].res |= 1 << t
        if self.changed is not None:
            self.changed.append(self.keys[i])
        if self.e[i].owner:
            self._charge(i, t, 1)
        parent = self.e[i].parent
        if parent >= 0:
            self._child_added(parent, t)
        if self.kind[t] == KIND_LRU or self.children[i * self.num_tiers + t] == 0:
            self._link_sorted(i, t, self._lru_of(i, t))
        return 0

    cdef int _check_id(self, int32_t i) except -1:
        """`IndexError` unless ``i`` is an id this index handed out (or was given)."""
        if not 0 <= i < self.num_ids:
            raise IndexError(f"block id {i} is not one of this placement's "
                             f"{self.num_ids} ids")
        return 0

    cdef int _child_added(self, int32_t parent, int t) except -1:
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
        if self.changed is not None:
            self.changed.append(self.keys[i])
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

    cdef int64_t _lru_key(self, int32_t i, int t) except? -1:
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

    cdef CList* _lru_of(self, int32_t i, int t) except NULL:
        """The list ``i`` belongs in for tier ``t`` (by its partition and owner)."""
        if not self.partitioned[t] and self.e[i].owner == 0:
            return self.l0[t]
        return &self._lru_obj(t, self._lru_key(i, t)).l

    cdef void _unlink(self, int32_t i, int t, CList* lru) noexcept:
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

    cdef void _drop_candidate(self, int32_t i, int t, CList* lru) noexcept:
        """``i`` is no longer a candidate of tier ``t`` (linked or heaped)."""
        if self.e[i].linked >> t & 1:
            self._unlink(i, t, lru)
        else:  # its heap item goes stale
            self.e[i].heaped &= ~(1 << t)
            lru.heaped -= 1

    cdef void _append(self, int32_t i, int t, CList* lru) noexcept:
        self._insert_after(i, t, lru, lru.tail)

    cdef void _insert_after(self, int32_t i, int t, CList* lru, int32_t before) noexcept:
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

    cdef bint _filed(self, int32_t i, int64_t tick, int t, CList* lru) except -1:
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

    cdef bint _held_back(self, int32_t i) except -1:
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

    cdef int64_t _partition(self, int t, int64_t nbytes) except? -1:
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

    # -- the keyed API (the Store's) ----------------------------------------------------------

    cdef int32_t _held_id(self, object key):
        """The id of ``key`` if some tier holds it, else -1."""
        found = self.ids.get(key)
        if found is None:
            return -1
        cdef int32_t i = found
        return i if self.e[i].res else -1

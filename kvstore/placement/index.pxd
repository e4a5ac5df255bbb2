"""The block index of the placement core (`kvstore/placement/index.pyx`): declarations
that the core (`_core.pyx`) builds on."""

from libc.stdint cimport int32_t, int64_t, uint8_t

from kvstore.placement.heap cimport CHeap


cdef enum:
    MAX_TIERS = 8
    SORTED_SEARCH_STEPS = 16  # a candidate out of order further from both ends is heaped
    KIND_LRU = 0
    KIND_LEAF = 1


cdef struct Entry:
    int64_t last  # the tick of its last use
    int64_t nbytes
    int64_t gen  # serial of the block that holds this id (a reused id gets a new one)
    int64_t mark  # the protect epoch that marked it (see `_reserve`)
    int32_t parent  # -1: none
    int32_t nchild  # child entries that name it as parent (any tier, ghosts included)
    int64_t uses
    int32_t owner
    int32_t npins  # pins held (their deadlines are in ``pins``)
    int32_t busy  # copies of it being made (`_store_in`): never a victim nor forgotten
    uint8_t res  # residency: bit t set when tier t holds a committed copy
    uint8_t linked  # bit t set when it is in tier t's list of candidates
    uint8_t heaped  # bit t set when it is a candidate of tier t filed in its list's heap
    int64_t stamp  # scratch for `_purge`
    uint8_t live


cdef struct CList:
    int32_t head  # the least recently used linked candidate, or -1
    int32_t tail
    int64_t size  # candidates linked
    int64_t key
    CHeap heap  # (last use, id) of candidates that came out of order (lazy: stale items)
    int64_t heaped  # candidates filed in the heap


cdef class Lru:
    cdef CList l


cdef class BlockIndex:
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
    cdef list partition_of  # per tier: callable(nbytes) -> partition, or None
    cdef list lists  # per tier: {list key (partition << 16 | owner): Lru}
    cdef list part_keys  # per tier: {partition: [list keys]}
    cdef list lru0  # per tier: the Lru of key 0, made at start (the simulator's only one)
    cdef CList* l0[MAX_TIERS]  # their lists
    cdef bint partitioned[MAX_TIERS]  # partition_of[t] is not None
    cdef public int64_t tick
    cdef int64_t gen_counter
    cdef int64_t purge_stamp
    cdef dict pins  # id -> {pin id: deadline (time.monotonic)}
    cdef int64_t next_pin
    cdef dict usage_of  # owner -> [bytes per tier, blocks per tier]
    # Keyed mode: None, or a list every key whose residency changes is appended to (the
    # feed a cluster node publishes from; see `KeyedIndex.track_changes`).
    cdef public object changed

    cdef int _grow(self, Py_ssize_t want) except -1
    cdef void _create(self, int32_t i, int64_t nbytes, int32_t owner) noexcept
    cdef int32_t _new(self, object key, int64_t nbytes, int32_t owner) except -1
    cdef int32_t _ghost(self, object key, int32_t i) except -2
    cdef int32_t _parent_id(self, int32_t i, object key, object parent) except -2
    cdef int _free(self, int32_t i) except -1
    cdef int _drop_if_unused(self, int32_t i) except -1
    cdef int _link(self, int32_t i, int32_t parent) except -1
    cdef int _touch(self, int32_t i) except -1
    cdef int _ensure(self, int32_t i, int32_t parent, int64_t nbytes, int32_t owner) except -1
    cdef int _add(self, int32_t i, int t) except -1
    cdef int _check_id(self, int32_t i) except -1
    cdef int _child_added(self, int32_t parent, int t) except -1
    cdef int _remove(self, int32_t i, int t) except -1
    cdef int _insert(self, int32_t i, int32_t parent, int64_t nbytes, int t, int32_t owner) except -1
    cdef int _charge(self, int32_t i, int t, int sign) except -1
    cdef int64_t _lru_key(self, int32_t i, int t) except? -1
    cdef Lru _lru_obj(self, int t, int64_t key)
    cdef CList* _lru_of(self, int32_t i, int t) except NULL
    cdef void _unlink(self, int32_t i, int t, CList* lru) noexcept
    cdef void _drop_candidate(self, int32_t i, int t, CList* lru) noexcept
    cdef void _append(self, int32_t i, int t, CList* lru) noexcept
    cdef void _insert_after(self, int32_t i, int t, CList* lru, int32_t before) noexcept
    cdef int _link_sorted(self, int32_t i, int t, CList* lru) except -1
    cdef bint _filed(self, int32_t i, int64_t tick, int t, CList* lru) except -1
    cdef int _purge(self, CList* lru, int t) except -1
    cdef int32_t _top(self, CList* lru, int t) except -2
    cdef bint _held_back(self, int32_t i) except -1
    cdef int32_t _victim(self, int t, int64_t partition, int64_t owner) except -2
    cdef int64_t _partition(self, int t, int64_t nbytes) except? -1
    cdef bint _is_pinned(self, int32_t i) except -1
    cdef int32_t _held_id(self, object key)

"""The placement core's decisions (`kvstore/placement/_core.pyx`): declarations that the
simulator's compiled loops (`kvstore/sim/_pool.pyx`) build on."""

from libc.stdint cimport int32_t, int64_t

from kvstore.placement.index cimport MAX_TIERS
from kvstore.placement.keyed cimport KeyedIndex


cdef class Placement(KeyedIndex):
    cdef bint second_use[MAX_TIERS]
    cdef bint counted  # no media: tiers counted in blocks (the simulator)
    cdef readonly object media  # None: the simulator's counted tiers
    cdef int64_t used[MAX_TIERS]  # counted mode: blocks held per tier
    cdef int64_t cap[MAX_TIERS]  # counted mode: capacity in blocks
    cdef readonly int write_tier
    cdef readonly bint promote_on_hit
    cdef int64_t epoch
    cdef object protect_list  # the list `_protect` marked last (a put_many's chain)
    cdef Py_ssize_t protect_marked  # how many of its keys
    cdef readonly int64_t protect_marks  # keys marked so far (the work `_protect` did)
    cdef public int64_t evictions
    cdef public int64_t demotions
    cdef public int64_t promotions
    cdef dict quotas  # (owner, tier) -> bytes
    cdef dict held  # (tier, slot) -> (owner, bytes): reserved for an owner, not committed
    cdef dict held_bytes  # (owner, tier) -> bytes
    # media.spill(t, key) gets each block whose last copy an eviction is about to drop
    # (a cluster node hands it to a peer with room: `daemon.spill`).
    cdef public bint spills

    cdef int64_t _reserve(self, int t, int64_t nbytes, int32_t owner, int64_t protect) except -2
    cdef bint _evict_for(self, int t, int64_t nbytes, int64_t protect) except -1
    cdef int _evict(self, int32_t i, int t) except -1
    cdef bint _store_in(self, int t, int32_t i, object src, int64_t protect) except -1
    cdef int64_t _charged(self, int32_t owner, int t) except? -1
    cdef bint _make_quota_room(self, int t, int32_t owner, int64_t nbytes,
                               int64_t protect) except -1
    cdef int64_t _protect(self, object keys) except -1

    # The dense API's steps (the simulator's): see `Placement.replay`.
    cdef Py_ssize_t _leading(self, const int32_t* ids, Py_ssize_t n) noexcept
    cdef int _fastest_tier(self, int32_t i) noexcept
    cdef int _use(self, int32_t i, int t) except -1
    cdef int _put_chain(self, const int32_t* ids, Py_ssize_t n, int64_t block_tokens,
                        const int32_t* remote=*) except -1

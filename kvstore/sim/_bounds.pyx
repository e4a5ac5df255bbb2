# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The simulator's two references beside the placement core's replay: the hit rate of a
cache that never evicts, and Belady's farthest-next-use cache (`kvstore.sim.replay`)."""

from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.stdint cimport int32_t, int64_t, uint8_t
from libc.string cimport memset

from kvstore.placement.heap cimport CHeap, heap_init, heap_pop, heap_push, heapify


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
    cdef CHeap heap_store  # (-next use, id); stale when held[id] differs
    cdef CHeap* heap = &heap_store
    if next_use == NULL or last == NULL or held == NULL:
        PyMem_Free(next_use)
        PyMem_Free(last)
        PyMem_Free(held)
        raise MemoryError()
    heap_store.items = NULL
    try:
        heap_init(heap, 0)
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
        PyMem_Free(heap_store.items)

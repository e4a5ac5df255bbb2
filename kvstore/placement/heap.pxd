"""A binary min-heap of (tick, id) items in C, shared by the candidate lists of the
placement core and by Belady's reference (`kvstore.sim._bounds`)."""

from cpython.mem cimport PyMem_Malloc, PyMem_Realloc
from libc.stdint cimport int32_t, int64_t


cdef struct Item:
    int64_t tick
    int32_t id


cdef struct CHeap:
    Item* items
    Py_ssize_t n
    Py_ssize_t cap
    int64_t resident  # blocks resident under this heap's key
    int64_t key


cdef inline int heap_init(CHeap* h, int64_t key) except -1:
    h.cap = 64
    h.items = <Item*> PyMem_Malloc(h.cap * sizeof(Item))
    if h.items == NULL:
        raise MemoryError()
    h.n = 0
    h.resident = 0
    h.key = key
    return 0


cdef inline int heap_push(CHeap* h, int64_t tick, int32_t id) except -1:
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


cdef inline void heapify(CHeap* h) noexcept:
    cdef Py_ssize_t i = h.n // 2
    while i > 0:
        i -= 1
        heap_sift_down(h, i, h.items[i].tick, h.items[i].id)

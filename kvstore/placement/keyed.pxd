from kvstore.placement.index cimport BlockIndex


cdef class KeyedIndex(BlockIndex):
    pass

# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled parts of `kvstore.sim.traces`: dense ids for a trace's keys (`Interner`), and
a fast reader of Mooncake trace lines (``{"timestamp": ms, "input_length": n,
"hash_ids": [int, ...]}``).

It understands a strict subset of JSON, line by line: an object whose members are
strings without escapes, numbers, ``null``/``true``/``false`` or arrays of integers, with
spaces or tabs between tokens. A line outside that subset, or one whose ``hash_ids`` or
``input_length`` is not what Mooncake's format says, is handed back as text, for the
`json` module and the format's own checks to parse (and to report, with the same
messages): the result is the same either way, only slower.

Lines end at ``\\n``, ``\\r`` or ``\\r\\n`` (Python's universal newlines, as the text-mode
reader it replaces numbers them).
"""

import array

from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_CheckExact
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from libc.stdint cimport int32_t, int64_t, uint64_t
from libc.string cimport memset

cdef enum:
    MAX_DIGITS = 18  # a longer integer is left to json (it may not fit in 64 bits)


cdef class Interner:
    """Dense ids for trace keys, in order of first appearance: non-negative ints below
    2**62 (a Mooncake trace's hash ids) through an open-addressing C table, other keys
    (bytes) through a dict. An int and a bytes key are never equal, so the two never mix."""

    cdef int64_t* table_keys  # key + 1 per slot, 0: free
    cdef int32_t* table_ids
    cdef Py_ssize_t mask
    cdef Py_ssize_t num_ints
    cdef dict others  # key -> id
    cdef readonly Py_ssize_t num_ids
    cdef object raw  # array 'q': id -> its int key (-1: a key in ``others``)

    def __cinit__(self):
        self.mask = 1023
        self.table_keys = <int64_t*> PyMem_Malloc((self.mask + 1) * sizeof(int64_t))
        self.table_ids = <int32_t*> PyMem_Malloc((self.mask + 1) * sizeof(int32_t))
        if self.table_keys == NULL or self.table_ids == NULL:
            raise MemoryError()
        memset(self.table_keys, 0, (self.mask + 1) * sizeof(int64_t))
        self.others = {}
        self.raw = array.array("q")

    def __dealloc__(self):
        PyMem_Free(self.table_keys)
        PyMem_Free(self.table_ids)

    cdef int _grow(self) except -1:
        cdef Py_ssize_t old = self.mask + 1, k, slot
        cdef int64_t* keys = self.table_keys
        cdef int32_t* ids = self.table_ids
        cdef int64_t* new_keys = <int64_t*> PyMem_Malloc(2 * old * sizeof(int64_t))
        cdef int32_t* new_ids = <int32_t*> PyMem_Malloc(2 * old * sizeof(int32_t))
        if new_keys == NULL or new_ids == NULL:
            PyMem_Free(new_keys)
            PyMem_Free(new_ids)
            raise MemoryError()
        memset(new_keys, 0, 2 * old * sizeof(int64_t))
        self.table_keys, self.table_ids, self.mask = new_keys, new_ids, 2 * old - 1
        for k in range(old):
            if keys[k]:
                slot = self._slot(keys[k] - 1)
                new_keys[slot] = keys[k]
                new_ids[slot] = ids[k]
        PyMem_Free(keys)
        PyMem_Free(ids)
        return 0

    cdef inline Py_ssize_t _slot(self, int64_t key) noexcept:
        """The slot of ``key``, or the free slot where it would go."""
        cdef Py_ssize_t slot = ((<uint64_t> key * 0x9E3779B97F4A7C15ULL) >> 20) & self.mask
        while self.table_keys[slot] and self.table_keys[slot] != key + 1:
            slot = (slot + 1) & self.mask
        return slot

    cdef int32_t int_id(self, int64_t key) except -1:
        """The id of non-negative int ``key`` (< 2**62), made if new."""
        cdef Py_ssize_t slot = self._slot(key)
        if self.table_keys[slot]:
            return self.table_ids[slot]
        if 2 * (self.num_ints + 1) > self.mask + 1:
            self._grow()
            slot = self._slot(key)
        self.table_keys[slot] = key + 1
        self.table_ids[slot] = <int32_t> self.num_ids
        self.num_ints += 1
        self.raw.append(key)
        self.num_ids += 1
        return self.num_ids - 1

    cdef int32_t key_id(self, object key) except -1:
        """The id of any key, made if new."""
        cdef int overflow = 0
        cdef int64_t value = -1
        if PyLong_CheckExact(key):
            value = PyLong_AsLongLongAndOverflow(key, &overflow)
            if overflow or value >= (1LL << 62):
                value = -1
        if value >= 0:
            return self.int_id(value)
        found = self.others.get(key)
        if found is not None:
            return found
        self.others[key] = self.num_ids
        self.raw.append(-1)
        self.num_ids += 1
        return self.num_ids - 1

    def extend(self, flat, list keys):
        """Append the ids of ``keys`` to ``flat`` (an array 'i')."""
        for key in keys:
            flat.append(self.key_id(key))

    def keys_of(self, const int32_t[::1] flat, Py_ssize_t a, Py_ssize_t b):
        """The keys whose ids are flat[a:b]."""
        cdef const int64_t[::1] raw = self.raw
        cdef Py_ssize_t k
        cdef dict by_id = None
        out = []
        for k in range(a, b):
            if raw[flat[k]] >= 0:
                out.append(raw[flat[k]])
            else:
                if by_id is None:
                    by_id = {i: key for key, i in self.others.items()}
                out.append(by_id[flat[k]])
        return out


def intern(list requests, Interner interner=None):
    """Dense ids for the keys of ``requests`` (lists of keys): ``(flat ids (array 'i'),
    starts (array 'q', one more than the requests), the number of distinct keys)``;
    request r's ids are ``flat[starts[r]:starts[r + 1]]``."""
    cdef Py_ssize_t r, n = 0
    if interner is None:
        interner = Interner()
    flat = array.array("i")
    starts = array.array("q", [0])
    for r in range(len(requests)):
        interner.extend(flat, <list> requests[r])
        n += len(<list> requests[r])
        starts.append(n)
    return flat, starts, interner.num_ids


cdef inline Py_ssize_t _skip_ws(const unsigned char[::1] s, Py_ssize_t i, Py_ssize_t end) noexcept:
    while i < end and (s[i] == 32 or s[i] == 9):
        i += 1
    return i


cdef inline Py_ssize_t _string_end(const unsigned char[::1] s, Py_ssize_t i,
                                   Py_ssize_t end) noexcept:
    """(s[i] is '"'.) The index past the closing quote, or -1 for an escape, a control
    character or no closing quote."""
    i += 1
    while i < end:
        if s[i] == 34:  # "
            return i + 1
        if s[i] == 92 or s[i] < 32:  # \\ or a control character
            return -1
        i += 1
    return -1


cdef inline Py_ssize_t _number_end(const unsigned char[::1] s, Py_ssize_t i,
                                   Py_ssize_t end, bint* is_int) noexcept:
    """The index past a JSON number starting at i (-1 if it is not one); ``is_int`` says
    whether it has no fraction or exponent."""
    cdef Py_ssize_t start = i
    is_int[0] = True
    if i < end and s[i] == 45:  # -
        i += 1
    if i >= end or not 48 <= s[i] <= 57:
        return -1
    if s[i] == 48:
        i += 1
    else:
        while i < end and 48 <= s[i] <= 57:
            i += 1
    if i < end and s[i] == 46:  # .
        is_int[0] = False
        i += 1
        if i >= end or not 48 <= s[i] <= 57:
            return -1
        while i < end and 48 <= s[i] <= 57:
            i += 1
    if i < end and (s[i] == 101 or s[i] == 69):  # e E
        is_int[0] = False
        i += 1
        if i < end and (s[i] == 43 or s[i] == 45):
            i += 1
        if i >= end or not 48 <= s[i] <= 57:
            return -1
        while i < end and 48 <= s[i] <= 57:
            i += 1
    return i if i > start else -1


cdef inline bint _is(const unsigned char[::1] s, Py_ssize_t a, Py_ssize_t b,
                     const char* word) noexcept:
    """Whether s[a:b] spells ``word``."""
    cdef Py_ssize_t k = 0
    while a + k < b:
        if word[k] == 0 or s[a + k] != <unsigned char> word[k]:
            return False
        k += 1
    return word[k] == 0


cdef inline int64_t _digits(const unsigned char[::1] s, Py_ssize_t a, Py_ssize_t b) noexcept:
    """The value of the decimal digits s[a:b] (at most MAX_DIGITS of them)."""
    cdef int64_t value = 0
    while a < b:
        value = value * 10 + (s[a] - 48)
        a += 1
    return value


cdef struct IdBuffer:
    int32_t* ids
    Py_ssize_t n
    Py_ssize_t cap


cdef int buffer_push(IdBuffer* buf, int32_t value) except -1:
    cdef int32_t* grown
    if buf.n == buf.cap:
        grown = <int32_t*> PyMem_Realloc(buf.ids, 2 * buf.cap * sizeof(int32_t))
        if grown == NULL:
            raise MemoryError()
        buf.ids = grown
        buf.cap *= 2
    buf.ids[buf.n] = value
    buf.n += 1
    return 0


cdef object _line(const unsigned char[::1] s, Py_ssize_t i, Py_ssize_t end, bytes data,
                  Interner interner, IdBuffer* buf):
    """One line s[i:end]: ``(timestamp or None, input_length)`` (the timestamp as json
    would give it: an int or a float), its hash ids' dense ids pushed on ``buf``; or None
    to leave it to json (then ``buf`` may hold some of its ids: the caller drops them)."""
    cdef Py_ssize_t key_start, key_end, j, k, ids_start = -1
    cdef bint is_int
    cdef int64_t value
    cdef object length = None, timestamp = None
    cdef bint has_length = False
    i = _skip_ws(s, i, end)
    if i >= end or s[i] != 123:  # {
        return None
    i = _skip_ws(s, i + 1, end)
    if i < end and s[i] == 125:  # {}
        return None
    while True:
        if i >= end or s[i] != 34:
            return None
        key_start = i + 1
        i = _string_end(s, i, end)
        if i < 0:
            return None
        key_end = i - 1
        i = _skip_ws(s, i, end)
        if i >= end or s[i] != 58:  # :
            return None
        i = _skip_ws(s, i + 1, end)
        if i >= end:
            return None
        if s[i] == 91:  # [ : only arrays of integers
            if not _is(s, key_start, key_end, b"hash_ids") or ids_start >= 0:
                return None  # (a second hash_ids: json keeps the last; left to it)
            ids_start = buf.n
            i = _skip_ws(s, i + 1, end)
            if i < end and s[i] == 93:  # ]
                i += 1
            else:
                while True:
                    j = i
                    value = 0
                    while i < end and 48 <= s[i] <= 57:
                        value = value * 10 + (s[i] - 48)
                        i += 1
                    if i == j or i - j > MAX_DIGITS or (s[j] == 48 and i - j > 1):
                        return None  # not a plain non-negative integer: json decides
                    buffer_push(buf, interner.int_id(value))
                    i = _skip_ws(s, i, end)
                    if i < end and s[i] == 44:  # ,
                        i = _skip_ws(s, i + 1, end)
                        continue
                    if i < end and s[i] == 93:
                        i += 1
                        break
                    return None
        elif s[i] == 34:
            i = _string_end(s, i, end)
            if i < 0 or _is(s, key_start, key_end, b"hash_ids") or _is(
                    s, key_start, key_end, b"input_length") or _is(
                    s, key_start, key_end, b"timestamp"):
                return None
        elif s[i] == 110 or s[i] == 116 or s[i] == 102:  # null true false
            j = i
            while i < end and 97 <= s[i] <= 122:
                i += 1
            if not (_is(s, j, i, b"null") or _is(s, j, i, b"true") or _is(s, j, i, b"false")):
                return None
            if _is(s, key_start, key_end, b"timestamp") and _is(s, j, i, b"null"):
                timestamp = None
            elif _is(s, key_start, key_end, b"hash_ids") or _is(
                    s, key_start, key_end, b"input_length") or _is(
                    s, key_start, key_end, b"timestamp"):
                return None
        else:
            j = i
            i = _number_end(s, i, end, &is_int)
            if i < 0:
                return None
            if _is(s, key_start, key_end, b"input_length"):
                if not is_int or s[j] == 45 or i - j > MAX_DIGITS:
                    return None
                length = _digits(s, j, i)
                has_length = True
            elif _is(s, key_start, key_end, b"timestamp"):
                if is_int and i - j <= MAX_DIGITS:
                    timestamp = (-_digits(s, j + 1, i) if s[j] == 45 else _digits(s, j, i))
                else:
                    timestamp = int(data[j:i]) if is_int else float(data[j:i])
            elif _is(s, key_start, key_end, b"hash_ids"):
                return None
        i = _skip_ws(s, i, end)
        if i < end and s[i] == 44:  # ,
            i = _skip_ws(s, i + 1, end)
            continue
        if i < end and s[i] == 125:  # }
            i = _skip_ws(s, i + 1, end)
            break
        return None
    if i != end or ids_start < 0 or not has_length:
        return None
    return timestamp, length


def scan_mooncake(bytes data, int64_t block_tokens, Interner interner):
    """Read a Mooncake JSONL file. Returns ``(timestamps, lengths, counts, flat,
    left)`` with one entry per line that is not empty or spaces and tabs only:
    ``timestamps[k]`` (seconds, None where the line has none), ``lengths[k]`` and
    ``counts[k]`` (its blocks, whose dense ids follow one another in ``flat``, an array
    'i') for a valid request (``0 < input_length <= len(hash_ids) * block_tokens``); and
    ``left``: ``(k, line number, text)`` for each line left to json and the format's
    checks (its text ending in a newline where the line did), whose entries are None, 0, 0.
    """
    cdef const unsigned char[::1] s = data
    cdef Py_ssize_t n = len(data), i = 0, end, k, mark
    cdef Py_ssize_t number = 0
    cdef bint blank
    cdef IdBuffer buf
    buf.cap = 1 << 16
    buf.n = 0
    buf.ids = <int32_t*> PyMem_Malloc(buf.cap * sizeof(int32_t))
    if buf.ids == NULL:
        raise MemoryError()
    timestamps, lengths, counts, left = [], [], [], []
    try:
        while i < n:
            end = i
            while end < n and s[end] != 10 and s[end] != 13:
                end += 1
            number += 1
            blank = True
            for k in range(i, end):
                if s[k] != 32 and s[k] != 9:
                    blank = False
                    break
            if not blank:
                mark = buf.n
                row = _line(s, i, end, data, interner, &buf)
                if row is not None and not 0 < row[1] <= (buf.n - mark) * block_tokens:
                    row = None  # json's path words the error
                if row is None:
                    buf.n = mark
                    # The text as a text-mode reader gives it, newline and all.
                    left.append((len(lengths), number,
                                 data[i:end].decode("utf-8") + ("\n" if end < n else "")))
                    timestamps.append(None)
                    lengths.append(0)
                    counts.append(0)
                else:
                    timestamp, length = row
                    timestamps.append(None if timestamp is None
                                      else float(timestamp) / 1000.0)
                    lengths.append(length)
                    counts.append(buf.n - mark)
            if end < n and s[end] == 13 and end + 1 < n and s[end + 1] == 10:
                end += 1
            i = end + 1
        flat = array.array("i")
        flat.frombytes((<char*> buf.ids)[:buf.n * sizeof(int32_t)])
        return timestamps, lengths, counts, flat, left
    finally:
        PyMem_Free(buf.ids)

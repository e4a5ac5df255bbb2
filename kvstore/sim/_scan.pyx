# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""A fast reader of Mooncake trace lines (``{"timestamp": ms, "input_length": n,
"hash_ids": [int, ...]}``), for `kvstore.sim.traces`.

It understands a strict subset of JSON, line by line: an object whose members are
strings without escapes, numbers, ``null``/``true``/``false`` or arrays of integers, with
spaces or tabs between tokens. A line outside that subset, or one whose ``hash_ids`` or
``input_length`` is not what Mooncake's format says, is handed back as text, for the
`json` module and the format's own checks to parse (and to report, with the same
messages): the result is the same either way, only slower.

Lines end at ``\\n``, ``\\r`` or ``\\r\\n`` (Python's universal newlines, as the text-mode
reader it replaces numbers them).
"""

from libc.stdint cimport int64_t

cdef enum:
    MAX_DIGITS = 18  # a longer integer is left to json (it may not fit in 64 bits)


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


cdef object _line(const unsigned char[::1] s, Py_ssize_t i, Py_ssize_t end, bytes data):
    """One line s[i:end]: ``(timestamp or None, input_length, hash_ids)`` (the timestamp
    as json would give it: an int or a float), or None to leave it to json."""
    cdef Py_ssize_t key_start, key_end, j, k
    cdef bint is_int
    cdef int64_t value
    cdef list ids = None
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
            if not _is(s, key_start, key_end, b"hash_ids"):
                return None
            ids = []
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
                    ids.append(value)
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
                length = int(data[j:i])
                has_length = True
            elif _is(s, key_start, key_end, b"timestamp"):
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
    if i != end or ids is None or not has_length:
        return None
    return timestamp, length, ids


def scan_mooncake(bytes data, int64_t block_tokens):
    """The lines of a Mooncake JSONL file: ``[(line number, row)]`` for every line that
    is not empty or spaces and tabs only, where row is ``(timestamp in seconds or None,
    input_length, hash_ids)`` of a valid request (``0 < input_length <= len(hash_ids) *
    block_tokens``), or the line's text (ending in ``\\n`` where the line ended in a
    newline) when it is left to json and the format's checks."""
    cdef const unsigned char[::1] s = data
    cdef Py_ssize_t n = len(data), i = 0, end, k
    cdef Py_ssize_t number = 0
    cdef bint blank
    rows = []
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
            row = _line(s, i, end, data)
            if row is not None:
                timestamp, length, ids = row
                if not 0 < length <= len(ids) * block_tokens:
                    row = None  # json's path words the error
                elif timestamp is not None:
                    row = (float(timestamp) / 1000.0, length, ids)
            if row is None:  # the text as a text-mode reader gives it, newline and all
                row = data[i:end].decode("utf-8") + ("\n" if end < n else "")
            rows.append((number, row))
        if end < n and s[end] == 13 and end + 1 < n and s[end + 1] == 10:
            end += 1
        i = end + 1
    return rows

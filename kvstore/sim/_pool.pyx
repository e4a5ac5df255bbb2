# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
"""The pool's replay loop (`kvstore.sim.pool`): a trace over N nodes, each a placement
core (`Placement`, dense ids) with its own tiers, driven through the same steps as a
single node's `Placement.replay`.

    request r -> its node (given, or the longest leading run held locally: prefix routing)
    hit = leading blocks held on its node or, pooled, by any node   (before any change)
    then the serving nodes: a use of each remote-hit block (+ promotion), as a peer's get
         the request's node: `_put_chain` as a single node's replay, but a remote hit
                             is not kept as a copy (as a pool's node keeps none: the
                             holder keeps it); a miss is stored there
"""

from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.stdint cimport int32_t, int64_t

from kvstore.placement._core cimport Placement


def replay_pool(list nodes, const int32_t[::1] flat, const int64_t[::1] starts,
                const int64_t[::1] input_tokens, const double[::1] timestamps_s,
                int64_t block_tokens, int32_t[::1] route, bint by_prefix, bint pooled,
                double load_window_s, double min_match, int64_t[::1] hit_out,
                int64_t[::1] remote_out, int64_t[::1] tier_hits):
    """Replay every request of a trace as ids (as `Placement.replay` takes them) over
    ``nodes`` (dense placements of the trace's ids, one tier numbering for all).

    ``route[r]``: request r's node; with ``by_prefix`` it is chosen here and written: the
    node whose tiers hold the longest leading run of r's blocks, a run that covers less
    than ``min_match`` of r's input tokens counting as none; ties (no node holding such a
    run among them) go to the node with the fewest requests routed to it in the last
    ``load_window_s`` seconds of trace time (those with a timestamp above r's minus the
    window), then to the lowest number.

    Writes r's hit tokens into ``hit_out[r]`` and the part of them served by other nodes
    into ``remote_out[r]``; adds the local hit tokens per fastest tier into ``tier_hits``.
    Without ``pooled`` a block its node does not hold is a miss. With it, such a block is
    served by the node holding it in the fastest tier (ties: the lowest number; as a
    node's fetch picks), which counts a use of it (a peer's get); r's node keeps no copy
    (`daemon.cluster`: a copy would push out a block with no other home).
    """
    cdef Py_ssize_t num_nodes = len(nodes)
    cdef Py_ssize_t num_requests = starts.shape[0] - 1
    cdef Py_ssize_t r, j, k, a, m, h, best_h, tail = 0, longest = 1
    cdef int t, holder_t
    cdef int32_t i, node, holder
    cdef int64_t n, pos, tokens, remote
    cdef const int32_t* ids
    cdef Placement local
    cdef int64_t* load = NULL
    cdef int32_t* holder_of = NULL  # per hit block of the request: its remote node, or -1
    cdef int* tier_of = NULL  # the tier it is read from there
    if num_nodes < 1:
        raise ValueError("a pool has at least one node")
    if not 0.0 <= min_match <= 1.0:
        raise ValueError(f"min_match is a fraction of 0 to 1, got {min_match}")
    cdef int32_t top = _max_id(flat)
    for k in range(num_nodes):
        local = nodes[k]  # (a type check, once per node)
        if not local.dense or top >= local.num_ids:
            raise ValueError("each node is a placement of the trace's dense ids")
    if (route.shape[0] != num_requests or hit_out.shape[0] != num_requests
            or remote_out.shape[0] != num_requests or timestamps_s.shape[0] != num_requests):
        raise ValueError("route, timestamps_s, hit_out and remote_out hold one entry per "
                         "request")
    if not by_prefix:
        for r in range(num_requests):
            if not 0 <= route[r] < num_nodes:
                raise ValueError(f"request {r} is routed to node {route[r]}, not one of "
                                 f"{num_nodes}")
    for r in range(num_requests):
        if starts[r + 1] - starts[r] > longest:
            longest = starts[r + 1] - starts[r]
    load = <int64_t*> PyMem_Malloc(num_nodes * sizeof(int64_t))
    holder_of = <int32_t*> PyMem_Malloc(longest * sizeof(int32_t))
    tier_of = <int*> PyMem_Malloc(longest * sizeof(int))
    try:
        if load == NULL or holder_of == NULL or tier_of == NULL:
            raise MemoryError()
        for k in range(num_nodes):
            load[k] = 0
        for r in range(num_requests):
            a = starts[r]
            m = starts[r + 1] - a
            ids = &flat[0] + a
            n = input_tokens[r]
            if by_prefix:
                while tail < r and timestamps_s[tail] <= timestamps_s[r] - load_window_s:
                    load[route[tail]] -= 1
                    tail += 1
                node = 0
                best_h = -1
                for k in range(num_nodes):
                    h = (<Placement> nodes[k])._leading(ids, m)
                    if (h * block_tokens if h * block_tokens < n else n) < min_match * n:
                        h = 0
                    if h > best_h or (h == best_h and load[k] < load[node]):
                        node, best_h = k, h
                route[r] = node
                load[node] += 1
            else:
                node = route[r]
            local = nodes[node]
            remote = 0
            h = 0
            while h < m:
                i = ids[h]
                t = local._fastest_tier(i)
                holder = -1
                if t < 0:
                    if not pooled:
                        break
                    for k in range(num_nodes):
                        if k != node:
                            holder_t = (<Placement> nodes[k])._fastest_tier(i)
                            if holder_t >= 0 and (holder < 0 or holder_t < t):
                                holder, t = k, holder_t
                    if holder < 0:
                        break
                holder_of[h] = holder
                tier_of[h] = t
                pos = h * block_tokens
                if pos < n:
                    tokens = block_tokens if n - pos > block_tokens else n - pos
                    if holder < 0:
                        tier_hits[t] += tokens
                    else:
                        remote += tokens
                h += 1
            hit_out[r] = h * block_tokens if h * block_tokens < n else n
            remote_out[r] = remote
            for j in range(h):
                if holder_of[j] >= 0:
                    (<Placement> nodes[holder_of[j]])._use(ids[j], tier_of[j])
            for j in range(h, m):
                holder_of[j] = -1
            local._put_chain(ids, m, block_tokens, holder_of)
    finally:
        PyMem_Free(load)
        PyMem_Free(holder_of)
        PyMem_Free(tier_of)


cdef int32_t _max_id(const int32_t[::1] flat) noexcept:
    cdef Py_ssize_t j
    cdef int32_t top = -1
    for j in range(flat.shape[0]):
        if flat[j] > top:
            top = flat[j]
    return top

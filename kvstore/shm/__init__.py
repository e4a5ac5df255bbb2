"""Same-host shared memory: what the DRAM tier, the client and the daemon map.

    mapping.py     POSIX shared-memory objects: names in /dev/shm, create (owner-only,
                   allocated up front) or attach, map; the host's boot id
    fault_in.py    a new pool's pages allocated and faulted in by chunks, stoppable,
                   with progress for a large one (shared or private)
    page_lock.py   page-locking host memory with CUDA, so that GPUs DMA to it
    directory.py   where each block of a shared DRAM pool lies: a seqlocked table that
                   clients read with no round trip to the daemon

Nothing here knows tiers, placement or the wire: the DRAM tier (`kvstore.tiers.dram`)
allocates its pool through these, the client maps the daemon's pool and directory, and
the daemon names and reclaims its entries (`daemon.segments`).
"""

"""The tiers: the media that hold blocks' bytes, and their allocators. They decide nothing
about placement (that is the store's, with its index and policies) and never import it.

    base.py      what every tier is: the Tier contract, TierKind, key checks
    slab.py      the slab allocator of a memory pool, and its size classes
    memory.py    MemoryTier: values in a slab-allocated pool, the HBM and DRAM tiers' body
    hbm.py       the HBM tier: one preallocated GPU buffer
    dram.py      the DRAM tier: a host pool, pinned, shared with same-host clients
                 (through `kvstore.shm`)
    nvme/        the NVMe tier: checksummed records appended to segment files
"""

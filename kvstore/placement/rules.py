"""The placement rules' names: eviction policies, admission rules, owner numbers.

Pure Python, imported by the configuration; the placement core (`kvstore.placement.core`)
implements what they name.

- ``LEAF_LRU`` (default): only *leaves* of a tier (blocks with no child in the same tier)
  are eviction candidates, least recently used first. A child is useless without its
  parent, so a chain is eaten from its tail and a shared system prompt, the root of many
  chains, stays while any conversation under it does.
- ``LRU``: every block of the tier is a candidate, least recently used first.
- Admission ``SECOND_USE``: a tier (NVMe) takes a demoted block only if it was used at
  least twice (saves SSD wear on one-hit blocks); ``ALWAYS`` takes every one.
"""

from __future__ import annotations

import enum


class EvictionPolicy(enum.Enum):
    LEAF_LRU = "leaf-lru"
    LRU = "lru"


class Admission(enum.Enum):
    """Which demoted blocks a tier (NVMe) accepts."""

    ALWAYS = "always"
    SECOND_USE = "second-use"  # only blocks used at least twice: saves SSD wear on one-hit blocks


OWNER_BITS = 16  # owners are 1..MAX_OWNER (0: nobody)
MAX_OWNER = (1 << OWNER_BITS) - 1

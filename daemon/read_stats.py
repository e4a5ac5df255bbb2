"""Block reads and prefix lookups since start, for the whole daemon and for each tenant
(``stats()["prefix"]``, and a tenant's own `stats`).

Changed on the event loop only, so no lock. Reads (get, get_many, pin, reads through the
directory) are counted per tenant; prefix lookups (`match_prefix`, asked once per engine
request, routing probes left out) for the daemon and for the tenant. Tokens are blocks
times ``block_tokens``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Lookups:
    """Prefix lookups and block reads of the daemon or of one tenant."""

    num_lookups: int = 0
    num_blocks_queried: int = 0
    num_blocks_hit: int = 0
    num_gets: int = 0      # blocks asked for: get, get_many, pin, read through the directory
    num_get_hits: int = 0


class ReadStats:
    def __init__(self, block_tokens: int) -> None:
        self.block_tokens = block_tokens
        self.total = Lookups()
        self._by_owner: dict[int, Lookups] = {}  # a tenant's number -> its own

    def of(self, owner: int) -> Lookups:
        """A tenant's counts (zeros if it read nothing yet)."""
        return self._by_owner.get(owner) or Lookups()

    def record_reads(self, owner: int, num_asked: int, num_hit: int) -> None:
        """Blocks ``owner``'s tenant asked for and found (its own stats)."""
        counts = self._by_owner.get(owner)
        if counts is None:
            counts = self._by_owner[owner] = Lookups()
        counts.num_gets += num_asked
        counts.num_get_hits += num_hit

    def record_lookup(self, owner: int, num_blocks: int, num_hit: int) -> None:
        """A prefix lookup of ``num_blocks`` keys, ``num_hit`` of them found."""
        for lookups in (self.total, self._by_owner.setdefault(owner, Lookups())):
            lookups.num_lookups += 1
            lookups.num_blocks_queried += num_blocks
            lookups.num_blocks_hit += num_hit

    def prefix_figures(self, lookups: Lookups) -> dict[str, int]:
        block_tokens = self.block_tokens
        return {"lookups": lookups.num_lookups,
                "blocks_queried": lookups.num_blocks_queried,
                "blocks_hit": lookups.num_blocks_hit,
                "block_tokens": block_tokens,
                "tokens_queried": lookups.num_blocks_queried * block_tokens,
                "tokens_hit": lookups.num_blocks_hit * block_tokens}

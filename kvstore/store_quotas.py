"""Per-owner quotas of the Store (a mixin of `kvstore.store.Store`, kept apart from store.py).

An owner is a small int naming who wrote a block (the daemon's tenants; 0 is nobody, and
has no quota). The index keeps each owner's value bytes per tier (`BlockIndex.usage`); a
quota bounds them:

- before a block of owner X lands in tier t (a put, a reservation of shared memory, a
  demotion, a promotion), X's own least recently used blocks leave t until the new one fits
  X's quota there, so a tenant at its quota makes room from its own blocks instead of
  evicting others' (its victims are demoted as any victim is: they count against its quota
  in the next tier);
- after a commit, the same again: reservations taken before others were committed may
  have left X over its quota.

A slot reserved for X and not committed yet (a shared-memory reservation, a large put
copying outside the lock) counts against X's quota as well (`_hold`, until `_unhold` at
its commit or release): a batch of reservations cannot take more than X's quota, and the
room it takes comes from X's own blocks.

A value larger than its owner's quota in a tier does not go there. Invariant: outside a
call, every owner's bytes in a tier are within its quota there (unless a quota was lowered
below what it held: then the owner's next write brings it back within).
"""

from __future__ import annotations

from kvstore.errors import ConfigError
from kvstore.tiers.memory import MemoryTier
from kvstore.tiers.slab import size_class


class StoreQuotas:
    """`set_quota`, `usage`, and the checks the write paths make."""

    _quotas: dict[tuple[int, int], int]  # (owner, tier) -> bytes
    _held: dict[tuple[int, int], tuple[int, int]]  # (tier, offset) -> (owner, bytes) reserved
    _held_bytes: dict[tuple[int, int], int]  # (owner, tier) -> bytes reserved, not committed

    def set_quota(self, owner: int, tier: str, nbytes: int | None) -> None:
        """Bound ``owner``'s value bytes in ``tier`` ("hbm", "dram", "nvme") to ``nbytes``
        (None: no bound). Blocks already over it go at the owner's next write there."""
        if isinstance(owner, bool) or not isinstance(owner, int) or owner <= 0:
            raise ConfigError(f"a quota's owner is a positive int, got {owner!r}")
        t = self._tier_index(tier)
        if nbytes is not None and (isinstance(nbytes, bool) or not isinstance(nbytes, int)
                                   or nbytes < 0):
            raise ConfigError(f"a quota is a byte count >= 0, got {nbytes!r}")
        with self._lock:
            if nbytes is None:
                self._quotas.pop((owner, t), None)
            else:
                self._quotas[(owner, t)] = nbytes

    def usage(self, owner: int) -> dict[str, dict[str, int | None]]:
        """``owner``'s blocks per present tier: used bytes (of values), blocks, quota."""
        with self._lock:
            usage = self.index.usage(owner)
            return {kind.value: {"used_bytes": usage.nbytes[t],
                                 "blocks": usage.num_blocks[t],
                                 "quota_bytes": self._quotas.get((owner, t))}
                    for t, kind in enumerate(self._kinds)}

    def capacities(self) -> dict[str, int]:
        """Each present tier's capacity in bytes, fastest first."""
        return {kind.value: tier.capacity_bytes
                for kind, tier in zip(self._kinds, self._tiers, strict=True)}

    def _tier_index(self, tier: str) -> int:
        names = [kind.value for kind in self._kinds]
        if tier not in names:
            raise ConfigError(f"a quota names tier {tier!r}, which this store does not have "
                              f"(tiers: {', '.join(names)})")
        return names.index(tier)

    # -- the write paths' checks (lock held) --------------------------------------------------

    def _charged(self, owner: int, t: int) -> int:
        """``owner``'s bytes in tier ``t``: its blocks' and its reserved slots'."""
        return self.index.used_by(owner, t) + self._held_bytes.get((owner, t), 0)

    def _hold(self, t: int, offset: int, owner: int, nbytes: int) -> None:
        """A slot of tier ``t`` reserved for ``owner`` stays uncommitted past this lock hold:
        charge it until `_unhold`."""
        if owner:
            self._held[(t, offset)] = (owner, nbytes)
            self._held_bytes[(owner, t)] = self._held_bytes.get((owner, t), 0) + nbytes

    def _unhold(self, t: int, offset: int) -> None:
        """The reserved slot at ``offset`` was committed or given back."""
        held = self._held.pop((t, offset), None)
        if held is not None:
            owner, nbytes = held
            self._held_bytes[(owner, t)] -= nbytes

    def _fits_quota(self, t: int, owner: int, nbytes: int) -> bool:
        """Whether ``nbytes`` more of ``owner`` fit its quota in tier ``t`` as it is now."""
        quota = self._quotas.get((owner, t)) if owner else None
        return quota is None or self._charged(owner, t) + nbytes <= quota

    def _make_quota_room(self, t: int, owner: int, nbytes: int,
                         protect: set[bytes] | None) -> bool:
        """Evict ``owner``'s own blocks from tier ``t`` until ``nbytes`` more fit its quota
        (of the value's size class first, in a memory tier); False if they cannot."""
        quota = self._quotas.get((owner, t)) if owner else None
        if quota is None:
            return True
        if self._held_bytes.get((owner, t), 0) + nbytes > quota:
            return False  # its reservations alone take the quota: no block of its can help
        policy = self.index.policies[t]
        partition = size_class(nbytes) if isinstance(self._tiers[t], MemoryTier) else 0
        while self._charged(owner, t) + nbytes > quota:
            victim = policy.victim(partition, owner) or policy.victim(None, owner)
            if victim is None or (protect and victim.key in protect):
                return False
            self._evict(victim, t)
        return True

    def _enforce_quota(self, t: int, owner: int, keep: bytes) -> None:
        """After a commit: evict ``owner``'s least recently used blocks of tier ``t`` other
        than ``keep`` while it is over its quota there."""
        quota = self._quotas.get((owner, t)) if owner else None
        if quota is None:
            return
        policy = self.index.policies[t]
        while self._charged(owner, t) > quota:
            victim = policy.victim(None, owner)
            if victim is None or victim.key == keep:
                return
            self._evict(victim, t)

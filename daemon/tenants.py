"""Tenants: which token may use which namespaces, and how keys are kept apart.

The token file (``--token-file``, TOML) lists tenants:

    [[tenant]]
    name = "team-a"                     # shown in logs, never the token
    token = "a-long-random-secret"
    namespaces = ["llama3-8b", "shared"]
    shared_memory = false               # may this tenant map the DRAM pool? (default false)
    quota = { dram = "2GiB", nvme = "20GiB" }   # bytes of its values per tier (default none)
    admin = false                       # may it see the whole store's stats? (default false)

Quotas: every block a tenant writes is charged to it (its value's bytes, in each tier that
holds a copy), and a tenant at its quota in a tier makes room there from its own blocks, so
a tenant that floods the store evicts its own blocks, not others'. Give every tenant a quota
and keep their sum within the tier, and each keeps its share whatever the others do.

Isolation: a client names one namespace at hello, which its token must grant (a token of
several that names none may only ask for stats); every key it sends is then stored under
``kvstore.keys.scoped_key``, a keyed BLAKE2b of the key with the namespace's secret, itself
keyed with the daemon's scope key (`daemon.scope`). Tenants granted the same namespace share
blocks; a tenant that knows another's key bytes still reaches only its own namespaces'
scoped keys, so it can neither read, overwrite, delete nor probe (contains, match_prefix)
the other's blocks, nor compute their stored keys.

Shared memory: a client that maps the DRAM pool can read every byte in it, so only
tenants with ``shared_memory = true`` (trusted processes of the same host) get it; the
others move data over the socket. Without a token file there is one trusted tenant.
"""

from __future__ import annotations

import hmac
import tomllib
from dataclasses import dataclass
from pathlib import Path

from kvstore.errors import ConfigError
from kvstore.placement.rules import MAX_OWNER
from kvstore.tiers.base import TierKind
from kvstore.units import parse_size

DEFAULT_NAMESPACE = "default"


TIER_NAMES = tuple(kind.value for kind in TierKind)


@dataclass(frozen=True)
class Tenant:
    name: str
    namespaces: frozenset[str]
    can_share_memory: bool
    owner: int = 0  # the store's owner id of its blocks (1, 2, ...; 0: nobody's)
    quota_bytes: tuple[tuple[str, int], ...] = ()  # (tier, bytes) for each tier with one
    is_admin: bool = False  # sees the whole store's stats

    def default_namespace(self) -> str | None:
        """The namespace a client gets when it names none: the only one granted."""
        return next(iter(self.namespaces)) if len(self.namespaces) == 1 else None


OPEN_TENANT = Tenant("anonymous", frozenset(), can_share_memory=True,
                     is_admin=True)  # no token file: one trusted tenant
# Another node of the cluster (daemon.cluster): no namespace, peer operations only.
PEER_TENANT = Tenant("peer", frozenset(), can_share_memory=False)


class Tenants:
    """Token -> tenant; `None` tokens are accepted only when no token file is set."""

    def __init__(self, by_token: dict[str, Tenant] | None) -> None:
        self._by_token = by_token

    @property
    def is_open(self) -> bool:
        return self._by_token is None

    def all(self) -> list[Tenant]:
        """Every tenant of the token file, in its order (none without one)."""
        return [] if self._by_token is None else list(self._by_token.values())

    @classmethod
    def load(cls, path: str | Path | None) -> Tenants:
        if path is None:
            return cls(None)
        try:
            document = tomllib.loads(Path(path).read_text())
        except OSError as e:
            raise ConfigError(f"cannot read the token file {path}: {e.strerror}") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"token file {path} is not valid TOML: {e}") from e
        entries = document.get("tenant")
        if not isinstance(entries, list) or not entries:
            raise ConfigError(f"token file {path} lists no [[tenant]] tables")
        if len(entries) > MAX_OWNER:
            raise ConfigError(f"token file {path} lists {len(entries)} tenants; at most "
                              f"{MAX_OWNER}")
        by_token: dict[str, Tenant] = {}
        for i, entry in enumerate(entries):
            where = f"{path}: tenant #{i + 1}"
            name, token = entry.get("name"), entry.get("token")
            namespaces = entry.get("namespaces")
            share = entry.get("shared_memory", False)
            admin = entry.get("admin", False)
            if not isinstance(name, str) or not name:
                raise ConfigError(f"{where} needs a name")
            if not isinstance(token, str) or len(token) < 16:
                raise ConfigError(f"{where} ({name}) needs a token of at least 16 characters")
            if (not isinstance(namespaces, list) or not namespaces
                    or not all(isinstance(n, str) and n for n in namespaces)):
                raise ConfigError(f"{where} ({name}) needs a non-empty list of namespaces")
            if not isinstance(share, bool):
                raise ConfigError(f"{where} ({name}): shared_memory must be true or false")
            if not isinstance(admin, bool):
                raise ConfigError(f"{where} ({name}): admin must be true or false")
            if token in by_token:
                raise ConfigError(f"{where} ({name}) reuses another tenant's token")
            unknown = set(entry) - {"name", "token", "namespaces", "shared_memory", "quota",
                                    "admin"}
            if unknown:
                raise ConfigError(f"{where} ({name}) has unknown keys: {sorted(unknown)}")
            by_token[token] = Tenant(name, frozenset(namespaces), share, owner=i + 1,
                                     quota_bytes=_quota(entry.get("quota", {}),
                                                        f"{where} ({name})"),
                                     is_admin=admin)
        return cls(by_token)

    def authenticate(self, token: str | None) -> Tenant | None:
        """The tenant of ``token``, or None if it is not valid."""
        if self._by_token is None:
            return OPEN_TENANT
        if token is None:
            return None
        # Compare against every token in constant time, so timing reveals no prefix.
        found = None
        for known, tenant in self._by_token.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                found = tenant
        return found


def _quota(table: object, where: str) -> tuple[tuple[str, int], ...]:
    """``quota = { dram = "2GiB", ... }`` as (tier, bytes) pairs."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: quota must be a table of tier = size, e.g. "
                          '{ dram = "2GiB", nvme = "20GiB" }')
    quota = []
    for tier, size in table.items():
        if tier not in TIER_NAMES:
            raise ConfigError(f"{where}: quota names the unknown tier {tier!r} (tiers: "
                              f"{', '.join(TIER_NAMES)})")
        quota.append((tier, parse_size(size, what=f"{where}: quota.{tier}")))
    return tuple(quota)


def grants(tenant: Tenant, namespace: str) -> bool:
    return tenant is OPEN_TENANT or namespace in tenant.namespaces



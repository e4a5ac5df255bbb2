"""The embedded Store: its API and write paths (`store`), read paths (`reads`), the
shared-memory clients' slots (`host`), the tiers as the placement core's media (`media`)
and what they share (`state`)."""

from kvstore.store.store import Store

__all__ = ["Store"]

"""Hit rate of a pool of cache nodes: a trace replayed over N nodes of equal capacity.

    request -> its node (routing)
            -> hit = its leading blocks held on that node (local) or, pooled, by any node
               (remote: the pool's remote tier; a node's fetch reads the fastest copy)
            -> the node keeps what it missed: a computed block, or a copy of a remote one

Each node is the store's own placement core (`kvstore.placement.Placement`, as the
single-node `replay` runs it), with its own tiers of ``1/N`` of the given total capacity:
tier t's ``c`` blocks are split ``c // N`` a node, the first ``c % N`` nodes one more, so
that the nodes together hold exactly the total. Hits, tokens and the trim of a partial last
block are counted as in `kvstore.sim.replay`; a remote hit also counts a use of the block
on the node serving it (a peer's get, with its promotion), as a pooled kvstored does.

Routing (`Routing`):
- ``random``: each request to a node drawn uniformly with ``random.Random(seed)``. The
  trace formats name no session or user (Mooncake's lines hold a timestamp, lengths and
  hash ids), so there is nothing to keep a conversation on one node.
- ``prefix`` (cache-aware): each request to the node whose own tiers hold the longest
  leading run of its blocks, a run covering less than `MIN_MATCH` of the request's input
  tokens counting as none; ties, and so a request no node holds enough of, go to the least
  loaded node, load being the requests routed to a node in the last `LOAD_WINDOW_S`
  seconds of trace time, then to the lowest numbered. Without the threshold
  (``min_match`` 0) a trace whose requests all share a first block (a system prompt, as in
  Mooncake's conversation trace) goes whole to the node that served its first request,
  which holds a run of every later one.

Invariants: with one node every configuration is the single-node `replay` of the total
capacity; local + remote hit tokens = hit tokens; without pooling no token is remote;
under the same routing a request's pooled hit is at least its node's local hit.
"""

from __future__ import annotations

import enum
import random
from array import array
from dataclasses import dataclass, field

from kvstore.errors import ConfigError
from kvstore.placement import Placement
from kvstore.sim import _pool
from kvstore.sim.replay import ReplayConfig, ReplayResult, result_from_hits, zero_counts
from kvstore.sim.traces import Trace

MIN_MATCH = 0.5  # prefix routing: a leading run counts from this fraction of the input on
LOAD_WINDOW_S = 60.0  # prefix routing's load: requests routed in this much trace time


class Routing(enum.Enum):
    RANDOM = "random"
    PREFIX = "prefix"


@dataclass(frozen=True)
class PoolConfig:
    """``replay``: the pool's TOTAL capacity per tier and every node's policy;
    ``is_pooled``: whether a node reads blocks the others hold (else each only its own);
    ``min_match``: the fraction of a request's input a node's leading run must cover to
    count for prefix routing."""

    replay: ReplayConfig
    num_nodes: int
    routing: Routing = Routing.RANDOM
    is_pooled: bool = True
    seed: int = 0
    min_match: float = MIN_MATCH

    def __post_init__(self) -> None:
        if self.num_nodes < 1:
            raise ConfigError(f"--nodes must be 1 or more, got {self.num_nodes}")
        if not 0.0 <= self.min_match <= 1.0:
            raise ConfigError(f"min_match is a fraction of 0 to 1, got {self.min_match}")
        if not any(self.node_capacity_blocks()[-1]):
            raise ConfigError(
                f"{self.replay.total_blocks} blocks of capacity split over {self.num_nodes} "
                f"nodes leave node {self.num_nodes} none: give at least "
                f"{self.num_nodes} blocks in some tier, or fewer nodes")

    def node_capacity_blocks(self) -> list[tuple[int, ...]]:
        """Each node's capacity per tier, in blocks (see the module docstring)."""
        n = self.num_nodes
        return [tuple(c // n + (k < c % n) for c in self.replay.capacity_blocks)
                for k in range(n)]

    @property
    def name(self) -> str:
        return f"{'pooled' if self.is_pooled else 'per-node'}, {self.routing.value}"


@dataclass
class PoolResult(ReplayResult):
    """A `ReplayResult` over the whole pool (per-tier hits and evictions summed over the
    nodes; ``hit_tokens_per_tier`` local only) and what the pool adds."""

    routing: Routing = Routing.RANDOM
    is_pooled: bool = False
    remote_hit_tokens: int = 0
    requests_per_node: list[int] = field(default_factory=list)

    @property
    def local_hit_tokens(self) -> int:
        return self.hit_tokens - self.remote_hit_tokens

    def to_dict(self) -> dict[str, object]:
        return {**super().to_dict(), "routing": self.routing.value, "pooled": self.is_pooled,
                "local_hit_tokens": self.local_hit_tokens,
                "remote_hit_tokens": self.remote_hit_tokens,
                "requests_per_node": self.requests_per_node}


def replay_pool(trace: Trace, config: PoolConfig) -> PoolResult:
    """Replay ``trace`` over ``config``'s nodes (see the module docstring)."""
    interned = trace.interned()
    replay = config.replay
    present = [t for t, c in enumerate(replay.capacity_blocks) if c > 0]
    nodes = [Placement([replay.policy] * len(present),
                       capacity_blocks=[caps[t] for t in present],
                       promote_on_hit=replay.promote_on_hit, num_ids=interned.num_ids)
             for caps in config.node_capacity_blocks()]
    if config.routing is Routing.RANDOM:
        draw = random.Random(config.seed).randrange
        route = array("i", [draw(config.num_nodes) for _ in range(len(trace))])
    else:
        route = array("i", bytes(4 * len(trace)))
    hits, remote = zero_counts(len(trace)), zero_counts(len(trace))
    tier_hits = zero_counts(len(present))
    _pool.replay_pool(nodes, interned.flat, interned.starts, interned.input_tokens,
                      array("d", trace.timestamps_s), trace.block_tokens, route,
                      config.routing is Routing.PREFIX, config.is_pooled, LOAD_WINDOW_S,
                      config.min_match, hits, remote, tier_hits)
    base = result_from_hits(replay.policy.value, trace, interned, hits, replay.window_s)
    requests_per_node = [0] * config.num_nodes
    for node in route:
        requests_per_node[node] += 1
    result = PoolResult(**vars(base), routing=config.routing, is_pooled=config.is_pooled,
                        remote_hit_tokens=sum(remote), requests_per_node=requests_per_node)
    result.hit_tokens_per_tier = dict(zip([replay.tier_names[t] for t in present], tier_hits,
                                          strict=True))
    result.evictions = sum(node.evictions for node in nodes)
    result.demotions = sum(node.demotions for node in nodes)
    result.promotions = sum(node.promotions for node in nodes)
    return result

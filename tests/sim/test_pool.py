"""`kvstore.sim.pool`: a trace over N cache nodes, per node or pooled, hand-worked and on
the real conversation trace."""

from __future__ import annotations

import random

import pytest

from kvstore.errors import ConfigError
from kvstore.placement.rules import EvictionPolicy
from kvstore.sim.pool import PoolConfig, Routing, replay_pool
from kvstore.sim.replay import ReplayConfig, infinite_bound, replay
from kvstore.sim.traces import Trace, read_traces
from tests.sim.test_replay import CONVERSATION, make_trace, needs_trace

TOKENS_3M = 3_000_000 // 512  # blocks


@pytest.fixture(scope="module")
def conversation() -> Trace:
    if not CONVERSATION.exists():
        pytest.skip("conversation trace absent")
    return read_traces([CONVERSATION])


def pool(trace: Trace, replay_config: ReplayConfig, num_nodes: int, routing: Routing,
         pooled: bool, seed: int = 0):
    return replay_pool(trace, PoolConfig(replay_config, num_nodes, routing, pooled, seed))


# -- hand-made traces -----------------------------------------------------------------------


def test_a_remote_hit_is_counted_and_not_kept_as_a_copy():
    # Two nodes of 4 blocks, prefix routing (a run counts from half the input on).
    # [S a] -> node 0 (no node holds anything: the least loaded, then the lowest number).
    # [S a b c d e] (60 tokens): node 0's run of 20 is under half, so it counts as none:
    #   the least loaded, node 1. Pooled, S and a are read from node 0 (20 remote tokens),
    #   which keeps them; node 1 stores what it computed, b c d e (4 blocks: all fit).
    # [S a b c] (40): node 0's run of 20 is half: it counts; node 1 holds no leading run.
    #   Node 0: S and a local (20), b and c read from node 1 (20 remote).
    # Per node, node 1 computes S a b c itself (d finds no room: the chain's own blocks
    # stay), and the last request goes there: 40 local tokens.
    trace = make_trace(("S a", 20), ("S a b c d e", 60), ("S a b c", 40))
    config = ReplayConfig((8, 0, 0))  # the total
    pooled = pool(trace, config, 2, Routing.PREFIX, True)
    assert (pooled.hit_tokens, pooled.remote_hit_tokens, pooled.local_hit_tokens) == (60, 40, 20)
    assert pooled.requests_per_node == [2, 1]
    assert pooled.hit_tokens_per_tier == {"hbm": 20}
    alone = pool(trace, config, 2, Routing.PREFIX, False)
    assert (alone.hit_tokens, alone.remote_hit_tokens) == (40, 0)
    assert alone.requests_per_node == [1, 2]


def test_a_remote_read_is_a_use_on_the_node_serving_it():
    # Two nodes of 2 blocks, plain LRU, prefix routing. [A] -> node 0, [B] -> node 1 (the
    # less loaded), [C] -> node 0 (a tie of loads: the lower number): node 0 holds A, C.
    # [A X Y]: node 0's run of 10 tokens is under half of 30: node 1, the less loaded.
    # Pooled, A is read from node 0, which makes A its most recently used block, so that
    # [D] (node 0: loads tied) evicts C there, and the last [C] misses (routed to node 1,
    # the less loaded, where nobody holds C). Per node, nothing touched A on node 0: D
    # evicts A and [C] hits C on node 0.
    trace = make_trace(("A", 10), ("B", 10), ("C", 10), ("A X Y", 30), ("D", 10), ("C", 10))
    config = ReplayConfig((4, 0, 0), policy=EvictionPolicy.LRU)  # the total
    pooled = pool(trace, config, 2, Routing.PREFIX, True)
    assert (pooled.hit_tokens, pooled.remote_hit_tokens) == (10, 10)
    assert pooled.requests_per_node == [3, 3]
    alone = pool(trace, config, 2, Routing.PREFIX, False)
    assert (alone.hit_tokens, alone.remote_hit_tokens) == (10, 0)
    assert alone.requests_per_node == [4, 2]


def test_capacity_is_split_so_that_the_nodes_hold_exactly_the_total():
    config = PoolConfig(ReplayConfig((10, 3, 0)), 4)
    assert config.node_capacity_blocks() == [(3, 1, 0), (3, 1, 0), (2, 1, 0), (2, 0, 0)]
    with pytest.raises(ConfigError, match="leave node 4 none"):
        PoolConfig(ReplayConfig((3, 0, 0)), 4)
    with pytest.raises(ConfigError, match="--nodes must be 1 or more"):
        PoolConfig(ReplayConfig((3, 0, 0)), 0)


# -- the conversation trace -------------------------------------------------------------------


LAYOUTS = [((TOKENS_3M, 0, 0), True), ((1000, 2000, 4000), True), ((500, 0, 3000), False)]


@needs_trace
@pytest.mark.parametrize(("capacity", "promote"), LAYOUTS)
@pytest.mark.parametrize("policy", list(EvictionPolicy))
def test_one_node_is_the_single_node_replay(conversation, capacity, promote, policy):
    # Windows of a tenth of a second: the hit tokens of (nearly) every request compared.
    config = ReplayConfig(capacity, policy=policy, promote_on_hit=promote, window_s=0.1)
    single = replay(conversation, config)
    for routing in Routing:
        for pooled in (False, True):
            result = pool(conversation, config, 1, routing, pooled)
            assert result.windows is not None and single.windows is not None
            assert result.windows.hit_tokens == single.windows.hit_tokens
            assert (result.hit_tokens, result.remote_hit_tokens) == (single.hit_tokens, 0)
            assert result.hit_tokens_per_tier == single.hit_tokens_per_tier
            assert (result.evictions, result.demotions, result.promotions) == (
                single.evictions, single.demotions, single.promotions)


@needs_trace
@pytest.mark.parametrize("num_nodes", [2, 4])
def test_per_node_random_routing_is_each_nodes_share_replayed_alone(conversation, num_nodes):
    # Each node sees only its own requests, so the pool without pooling is N single-node
    # replays of the requests `random.Random(seed)` drew for each node, at a node's
    # capacity.
    config = ReplayConfig((1000, 2000, 0))
    result = pool(conversation, config, num_nodes, Routing.RANDOM, False, seed=7)
    draw = random.Random(7).randrange
    routes = [draw(num_nodes) for _ in range(len(conversation))]
    hit_tokens = evictions = 0
    caps = PoolConfig(config, num_nodes).node_capacity_blocks()
    for node in range(num_nodes):
        mine = [r for r, k in enumerate(routes) if k == node]
        share = Trace(conversation.block_tokens, [conversation.timestamps_s[r] for r in mine],
                      [conversation.input_tokens[r] for r in mine],
                      [conversation.keys[r] for r in mine])
        alone = replay(share, ReplayConfig(caps[node]))
        hit_tokens += alone.hit_tokens
        evictions += alone.evictions
        assert result.requests_per_node[node] == len(mine)
    assert (result.hit_tokens, result.evictions) == (hit_tokens, evictions)
    assert result.remote_hit_tokens == 0


@needs_trace
@pytest.mark.parametrize("num_nodes", [2, 4, 8])
@pytest.mark.parametrize("routing", list(Routing))
def test_pooling_hits_at_least_what_the_nodes_hit_alone(conversation, num_nodes, routing):
    # Each request hits at least its own node's run, and more where other nodes hold the
    # blocks that follow. Not guaranteed by construction over a whole trace: a remote read
    # is a use on the node serving it, which then evicts other blocks than it would have,
    # and prefix routing follows what the nodes hold, which differs once they keep no
    # copies of what they read. Under random routing pooling adds 4.6 to 7.9 points on
    # this trace; under prefix routing it moves the hit rate by -0.04 to +0.4 points,
    # so there only the accounting is checked.
    config = ReplayConfig((TOKENS_3M, 0, 0))
    alone = pool(conversation, config, num_nodes, routing, False)
    pooled = pool(conversation, config, num_nodes, routing, True)
    if routing is Routing.RANDOM:
        assert pooled.hit_tokens > alone.hit_tokens
    assert pooled.remote_hit_tokens > 0 == alone.remote_hit_tokens
    # The local hits are counted per tier, apart from the remote ones.
    assert sum(pooled.hit_tokens_per_tier.values()) == pooled.local_hit_tokens
    assert sum(alone.hit_tokens_per_tier.values()) == alone.hit_tokens


@needs_trace
@pytest.mark.parametrize("routing", list(Routing))
def test_the_pool_never_beats_the_infinite_bound(conversation, routing):
    # Must hold request by request: a block any node holds was in an earlier request. (A
    # single node of the whole capacity is no bound: its LRU is not optimal, and nodes
    # that each keep their own requests' blocks can do better.)
    config = ReplayConfig((TOKENS_3M * 4, 0, 0), window_s=0.1)
    bound = infinite_bound(conversation, window_s=0.1)
    assert bound.windows is not None
    for num_nodes in (2, 8):
        result = pool(conversation, config, num_nodes, routing, True)
        assert result.windows is not None
        assert all(h <= b for h, b in zip(result.windows.hit_tokens, bound.windows.hit_tokens,
                                          strict=True))


@needs_trace
def test_prefix_routing_hits_more_locally_than_random_routing(conversation):
    # A conversation's turns share its prefix: prefix routing sends a turn back to the
    # node that served the one before, random routing to any node.
    config = ReplayConfig((TOKENS_3M, 0, 0))
    for num_nodes in (2, 4, 8):
        by_prefix = pool(conversation, config, num_nodes, Routing.PREFIX, True)
        by_chance = pool(conversation, config, num_nodes, Routing.RANDOM, True)
        assert by_prefix.local_hit_tokens > 1.25 * by_chance.local_hit_tokens
        assert by_prefix.remote_hit_tokens < by_chance.remote_hit_tokens
        # The load rule spreads the requests: no node takes twice its share.
        assert max(by_prefix.requests_per_node) < 2 * len(conversation) / num_nodes

"""The pool's block index in Redis: which node holds which block, in which tiers.

Each node writes its own entries, in pipelined batches (one round trip for any number of
changes); anyone reads them: `locate` answers, for one chain of block keys, how many
leading blocks each live node holds and in which tiers, in one round trip (one per shard
touched on Redis Cluster), the lookups run in Redis by a Lua script (`LEADING`). Every
batch is also an event on one stream, so that an external router can follow the pool
(docs/CLUSTER.md has the format, and what this layout costs).

Redis layout (``P`` is ``kvstore:<cluster>``)::

    P:blocks:{<node>}   HASH  16-byte block key -> its tiers on that node, as residency bits
                              in decimal (1: hbm, 2: dram, 4: nvme; "6": DRAM and NVMe)
    P:block-events      STREAM  one entry per published batch (`EVENT_FIELDS`)

The hash tag ``{<node>}`` puts all of one node's keys in one Redis Cluster slot: a node's
batch is one pipeline to one shard, and a lookup is one HMGET per node, grouped by shard.
Liveness is not here: a node is live while its registry entry (`daemon.registry`) exists;
`locate` is given the live nodes and skips the rest, whose entries are stale until
`forget_node` drops them (a node also drops its own at start, before it re-publishes what
it holds).

Invariant: a node's hash holds exactly its blocks with a committed copy in some tier, as
of its last published batch (changes are published in the order they happened).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from redis.exceptions import NoScriptError

EVENT_VERSION = 1
# A stream entry: v, node, at (Unix seconds), stored (16-byte key + 1 byte tier bits,
# repeated), removed (16-byte keys, concatenated).
EVENT_FIELDS = ("v", "node", "at", "stored", "removed")
STREAM_MAXLEN = 100_000  # entries kept (approximately): a follower far behind re-reads
KEY_BYTES = 16


# The leading run of each hash (KEYS) over a chain (ARGV): its values up to the first
# missing one, comma-separated. The lookups stay in Redis; only the runs come back. Each
# hash is read in growing pieces (1, 4, 16, 64, then 256 blocks) up to its first missing
# block, so a node holding none of the chain costs one field, not the chain's length.
LEADING = """
local out = {}
local n = #ARGV
for i, hash in ipairs(KEYS) do
  local run = {}
  local at, piece, done = 1, 1, false
  while at <= n and not done do
    local last = math.min(n, at + piece - 1)
    local values = redis.call('HMGET', hash, unpack(ARGV, at, last))
    for j = 1, #values do
      if not values[j] then
        done = true
        break
      end
      run[#run + 1] = values[j]
    end
    at = last + 1
    piece = math.min(piece * 4, 256)
  end
  out[i] = table.concat(run, ',')
end
return out
"""
# Each hash's (KEYS) tier bits for every block of ARGV as one byte each (0: not held),
# the run cut after its last held block ("" when it holds none of them).
HOLDERS = """
local out = {}
for i, hash in ipairs(KEYS) do
  local values = redis.call('HMGET', hash, unpack(ARGV))
  local bytes, last = {}, 0
  for j = 1, #values do
    if values[j] then
      bytes[j] = string.char(tonumber(values[j]))
      last = j
    else
      bytes[j] = '\\0'
    end
  end
  out[i] = table.concat(bytes, '', 1, last)
end
return out
"""
SCRIPT_KEYS = 4000  # block keys per script call (Lua's unpack takes about 8,000 at most)


def index_prefix(cluster: str, key_prefix: str = "kvstore") -> str:
    return f"{key_prefix}:{cluster}"


def blocks_key(prefix: str, node_id: str) -> str:
    return f"{prefix}:blocks:{{{node_id}}}"


def events_key(prefix: str) -> str:
    return f"{prefix}:block-events"


@dataclass(frozen=True)
class Location:
    """What one node holds of a chain: its leading blocks and each one's tier bits."""

    node_id: str
    tiers: tuple[int, ...]  # residency bits of blocks 0 .. leading-1

    @property
    def leading(self) -> int:
        return len(self.tiers)


def batch_commands(prefix: str, node_id: str, changes: Iterable[tuple[bytes, int]],
                   *, at: float | None = None) -> tuple[list[tuple[Any, ...]], int]:
    """The Redis commands that publish ``changes`` ((block key, its tier bits now; 0: gone
    from the node), oldest first) as one batch: an HSET, an HDEL and the stream entry; and
    how many keys they touch. A key changed twice counts as its last change."""
    last: dict[bytes, int] = {}
    for key, bits in changes:
        if len(key) != KEY_BYTES:
            raise ValueError(f"a block key is {KEY_BYTES} bytes, got {len(key)}")
        if not 0 <= bits < 256:
            raise ValueError(f"tier bits are a byte, got {bits}")
        last[key] = bits
    if not last:
        return [], 0
    stored = {k: b for k, b in last.items() if b}
    removed = [k for k, b in last.items() if not b]
    hash_key = blocks_key(prefix, node_id)
    commands: list[tuple[Any, ...]] = []
    if stored:
        commands.append(("HSET", hash_key, *[x for k, b in stored.items() for x in (k, b)]))
    if removed:
        commands.append(("HDEL", hash_key, *removed))
    commands.append((
        "XADD", events_key(prefix), "MAXLEN", "~", STREAM_MAXLEN, "*",
        "v", EVENT_VERSION, "node", node_id, "at", f"{time.time() if at is None else at:.3f}",
        "stored", b"".join(k + bytes([b]) for k, b in stored.items()),
        "removed", b"".join(removed)))
    return commands, len(last)


def parse_event(fields: dict[bytes, bytes]) -> tuple[str, list[tuple[bytes, int]], list[bytes]]:
    """``(node, [(key, tier bits)], [removed key])`` of one stream entry (any ``v >= 1``)."""
    stored_raw, removed_raw = fields[b"stored"], fields[b"removed"]
    stride = KEY_BYTES + 1
    stored = [(stored_raw[i:i + KEY_BYTES], stored_raw[i + KEY_BYTES])
              for i in range(0, len(stored_raw), stride)]
    removed = [removed_raw[i:i + KEY_BYTES] for i in range(0, len(removed_raw), KEY_BYTES)]
    return fields[b"node"].decode(), stored, removed


class ClusterIndex:
    """The index of one cluster over a `redis.Redis` (or `redis.cluster.RedisCluster`)
    client; see the module docstring."""

    def __init__(self, client: Any, cluster: str = "default", *,
                 key_prefix: str = "kvstore") -> None:
        self.client = client
        self.prefix = index_prefix(cluster, key_prefix)
        self._is_cluster = type(client).__name__ == "RedisCluster"
        self._scripts: dict[str, Any] = {}  # script source -> its callable or SHA

    def publish(self, node_id: str, changes: Iterable[tuple[bytes, int]]) -> int:
        """Publish ``changes`` of ``node_id`` (see `batch_commands`) in one round trip;
        returns how many keys they touched."""
        commands, touched = batch_commands(self.prefix, node_id, changes)
        if commands:
            pipe = self.client.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)
            pipe.execute()
        return touched

    def forget_node(self, node_id: str) -> None:
        """Drop everything ``node_id`` published (a node about to re-publish its inventory,
        or one that died)."""
        self.client.delete(blocks_key(self.prefix, node_id))

    def locate(self, keys: Sequence[bytes], nodes: Iterable[str]) -> list[Location]:
        """For the chain ``keys``, each of ``nodes`` (the live ones) that holds its first
        block: how many leading blocks it holds and in which tiers, most first.

        One round trip: the `LEADING` script runs the lookups in Redis and sends back only
        the leading runs. On one Redis it is one call over every node's hash; on Redis
        Cluster one call per node (a script's keys share a slot), pipelined, which the
        cluster client sends as one request per shard touched."""
        nodes = list(nodes)
        if not keys or not nodes:
            return []
        keys = list(keys)
        hashes = [blocks_key(self.prefix, node_id) for node_id in nodes]
        runs: list[str] = [""] * len(nodes)
        done = [False] * len(nodes)
        for at in range(0, len(keys), SCRIPT_KEYS):  # (a script takes so many arguments)
            part = keys[at:at + SCRIPT_KEYS]
            asked = [n for n in range(len(nodes)) if not done[n]]
            if not asked:
                break
            for n, run in zip(asked, self._leading([hashes[n] for n in asked], part),
                              strict=True):
                tiers = run.decode() if isinstance(run, bytes) else run
                count = tiers.count(",") + 1 if tiers else 0
                runs[n] += ("," if runs[n] and tiers else "") + tiers
                done[n] = count < len(part)
        found = [Location(node_id, tuple(int(t) for t in run.split(",")))
                 for node_id, run in zip(nodes, runs, strict=True) if run]
        found.sort(key=lambda location: -location.leading)
        return found

    def holders(self, keys: Sequence[bytes], nodes: Iterable[str]) -> dict[str, bytes]:
        """For each of ``keys`` (any keys, not only a chain), the tier bits each of
        ``nodes`` holds it in: node -> one byte per key (0: not held), for the nodes that
        hold any of them. One round trip, as `locate`."""
        nodes = list(nodes)
        keys = list(keys)
        found: dict[str, bytes] = {}
        if not keys or not nodes:
            return found
        hashes = [blocks_key(self.prefix, node_id) for node_id in nodes]
        parts: list[list[bytes]] = [[] for _ in nodes]
        for at in range(0, len(keys), SCRIPT_KEYS):
            part = keys[at:at + SCRIPT_KEYS]
            for n, run in enumerate(self._run_script(HOLDERS, hashes, part)):
                run = run.encode("latin-1") if isinstance(run, str) else run
                parts[n].append(run.ljust(len(part), b"\0"))
        for node_id, runs in zip(nodes, parts, strict=True):
            bits = b"".join(runs)
            if bits.strip(b"\0"):
                found[node_id] = bits
        return found

    def _leading(self, hashes: list[str], keys: list[bytes]) -> list[bytes | str]:
        """Each hash's leading run over ``keys``: its values up to the first missing one,
        comma-separated (one round trip)."""
        return self._run_script(LEADING, hashes, keys)

    def _run_script(self, script: str, hashes: list[str], keys: list[bytes]
                    ) -> list[bytes | str]:
        """``script`` over each of ``hashes`` with ``keys`` as its arguments: its answer
        per hash, in one round trip (one per shard on Redis Cluster)."""
        if not self._is_cluster:
            if script not in self._scripts:
                self._scripts[script] = self.client.register_script(script)  # reloads
            return self._scripts[script](keys=hashes, args=keys)
        for attempt in range(2):
            if script not in self._scripts or attempt:  # a cluster pipeline won't reload
                self._scripts[script] = self.client.script_load(script)  # every primary
            pipe = self.client.pipeline(transaction=False)
            for hash_key in hashes:
                pipe.evalsha(self._scripts[script], 1, hash_key, *keys)
            try:
                return [runs[0] for runs in pipe.execute()]  # one hash per call
            except NoScriptError:  # a primary restarted since (scripts are not kept)
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def holdings(self, node_id: str) -> dict[bytes, int]:
        """Everything ``node_id`` has published as held: key -> tier bits."""
        return {k: int(v) for k, v in self.client.hgetall(blocks_key(self.prefix,
                                                                      node_id)).items()}

    def events(self, after: str = "0-0", count: int = 1000
               ) -> list[tuple[str, str, list[tuple[bytes, int]], list[bytes]]]:
        """Stream entries after id ``after``: ``(id, node, stored, removed)`` each."""
        entries = self.client.xrange(events_key(self.prefix), min=f"({after}"
                                     if after != "0-0" else "-", count=count)
        out = []
        for entry_id, fields in entries:
            node, stored, removed = parse_event(fields)
            out.append((entry_id.decode() if isinstance(entry_id, bytes) else entry_id,
                        node, stored, removed))
        return out

"""The pool's block index in Redis: which node holds which block, in which tiers.

Each node writes its own entries, in pipelined batches (one round trip for any number of
changes); anyone reads them: `locate` answers, for one chain of block keys, how many
leading blocks each live node holds and in which tiers, in one round trip (one per shard
touched on Redis Cluster), the lookups run in Redis by a Lua script (`LEADING`). Every
batch is also an event on one stream, so that an external router can follow the pool
(docs/CLUSTER.md has the format, and what this layout costs).

Redis layout (``P`` is ``kvstore:<cluster>``)::

    P:blocks:{<node>}   HASH  16-byte block key -> its tiers on that node, as one byte of
                              residency bits (1: hbm, 2: dram, 4: nvme; 6: DRAM and NVMe);
                              plus the field `ENCODING_FIELD` (see there)
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
# Every batch also sets this field, whose value is longer than any listpack value (Redis
# keeps at most 64 bytes by default): the hash is then a hash table from its first batch
# on, whatever its size. A small hash is otherwise a listpack, whose lookups scan it:
# with 512 entries (a common `hash-max-listpack-entries`) a lookup of 4,500 blocks over 8
# such hashes took 8.4 ms, as hash tables 3.2 ms. A lookup never asks for this field (a
# block key is 16 bytes).
ENCODING_FIELD, ENCODING_VALUE = b"~encoding", b"hashtable " * 8  # 80 bytes


# The chain arrives as one argument, its 16-byte keys concatenated (packing 1,000 arguments
# cost the client more than the lookups cost Redis), and is split here once for all hashes,
# by one `struct.unpack` (in C: half the time of a loop of string.sub), whose last value,
# the position after the chain, is dropped.
SPLIT_CHAIN = """
local chain = ARGV[1]
local n = #chain / 16
local keys = {struct.unpack(string.rep('c16', n), chain)}
keys[n + 1] = nil
"""
# The leading run of each hash (KEYS) over the chain: its tier bytes up to the first
# missing block. The lookups stay in Redis; only the runs come back. Each hash is read in
# growing pieces (1, 4, 16, 64, then 256 blocks) up to its first missing block, so a node
# holding none of the chain costs one field, not the chain's length; a piece's bytes are
# joined by table.concat, not one by one in Lua.
LEADING = SPLIT_CHAIN + """
local out = {}
local n = #keys
for i, hash in ipairs(KEYS) do
  local parts = {}
  local at, piece = 1, 1
  while at <= n do
    local last = math.min(n, at + piece - 1)
    local values = redis.call('HMGET', hash, unpack(keys, at, last))
    local held = #values
    for j = 1, held do
      if not values[j] then
        held = j - 1
        break
      end
    end
    parts[#parts + 1] = table.concat(values, '', 1, held)
    if held < #values then
      break
    end
    at = last + 1
    piece = math.min(piece * 4, 256)
  end
  out[i] = table.concat(parts)
end
return out
"""
# Each hash's (KEYS) tier byte for every block of the chain (a zero byte: not held), the
# run cut after its last held block ("" when it holds none of them).
HOLDERS = SPLIT_CHAIN + """
local out = {}
for i, hash in ipairs(KEYS) do
  local values = redis.call('HMGET', hash, unpack(keys))
  local last = 0
  for j = 1, #values do
    if values[j] then
      last = j
    else
      values[j] = '\\0'
    end
  end
  out[i] = table.concat(values, '', 1, last)
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
        commands.append(("HSET", hash_key, ENCODING_FIELD, ENCODING_VALUE,
                         *[x for k, b in stored.items() for x in (k, bytes((b,)))]))
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
        runs: list[bytes] = [b""] * len(nodes)
        done = [False] * len(nodes)
        for at in range(0, len(keys), SCRIPT_KEYS):  # (a script takes so many arguments)
            part = keys[at:at + SCRIPT_KEYS]
            asked = [n for n in range(len(nodes)) if not done[n]]
            if not asked:
                break
            for n, run in zip(asked, self._run_script(LEADING, [hashes[n] for n in asked],
                                                      part), strict=True):
                run = _as_bytes(run)
                runs[n] += run
                done[n] = len(run) < len(part)
        found = [Location(node_id, tuple(run)) for node_id, run in zip(nodes, runs, strict=True)
                 if run]
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
                parts[n].append(_as_bytes(run).ljust(len(part), b"\0"))
        for node_id, runs in zip(nodes, parts, strict=True):
            bits = b"".join(runs)
            if bits.strip(b"\0"):
                found[node_id] = bits
        return found

    def _run_script(self, script: str, hashes: list[str], keys: list[bytes]
                    ) -> list[bytes | str]:
        """``script`` over each of ``hashes`` with ``keys`` as its one argument (the keys
        concatenated): its answer per hash, in one round trip (one per shard on Redis
        Cluster)."""
        chain = b"".join(keys)
        if len(chain) != KEY_BYTES * len(keys):
            raise ValueError(f"a block key is {KEY_BYTES} bytes")
        if not self._is_cluster:
            if script not in self._scripts:
                self._scripts[script] = self.client.register_script(script)  # reloads
            return self._scripts[script](keys=hashes, args=[chain])
        for attempt in range(2):
            if script not in self._scripts or attempt:  # a cluster pipeline won't reload
                self._scripts[script] = self.client.script_load(script)  # every primary
            pipe = self.client.pipeline(transaction=False)
            for hash_key in hashes:
                pipe.evalsha(self._scripts[script], 1, hash_key, chain)
            try:
                return [runs[0] for runs in pipe.execute()]  # one hash per call
            except NoScriptError:  # a primary restarted since (scripts are not kept)
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def holdings(self, node_id: str) -> dict[bytes, int]:
        """Everything ``node_id`` has published as held: key -> tier bits."""
        entries = self.client.hgetall(blocks_key(self.prefix, node_id))
        return {k: _as_bytes(v)[0] for k, v in entries.items() if len(k) == KEY_BYTES}

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


def _as_bytes(value: bytes | str) -> bytes:
    """A script's answer as bytes (a client that decodes answers gives them as str)."""
    return value.encode("latin-1") if isinstance(value, str) else value

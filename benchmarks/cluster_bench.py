#!/usr/bin/env python3
"""The cluster's block index in Redis (issue 17), beside the raw limits of the same run.

    figure                        what runs                                raw limit
    index events/s                one node publishing batches of block     the same HSETs with
                                  changes (ClusterIndex.publish: HSET,     no HDEL and no event,
                                  HDEL, XADD in one pipeline)              pipelined alike
    lookup of a 1,000-block chain ClusterIndex.locate over N nodes: one    a PING round trip
                                  HMGET per node, pipelined

A redis-server is started on a free loopback port for the run (and stopped after). Prints
one JSON document on stdout; each figure is the median of ``--repeats`` runs.
Targets (the issue): at least 200,000 events/s from one node; a lookup in one round trip,
under 1 ms on loopback.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis
from store_bench import emit, log, machine_info

from kvstore.cluster.index import ClusterIndex, blocks_key

TARGET_EVENTS_PER_S = 200_000
TARGET_LOOKUP_S = 1e-3


def start_redis(workdir: str) -> tuple[subprocess.Popen, int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--dir", workdir],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            redis.Redis(port=port, socket_connect_timeout=0.2).ping()
            return proc, port
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.05)


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="block changes to publish")
    parser.add_argument("--batch", type=int, default=10_000, help="changes per batch")
    parser.add_argument("--nodes", type=int, default=8, help="nodes a lookup asks about")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json-out")
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        proc, port = start_redis(workdir)
        try:
            client = redis.Redis(port=port)
            index = ClusterIndex(client, "bench")
            keys = [key(i) for i in range(args.events)]

            def publish_all() -> float:
                index.forget_node("n0")
                t = time.perf_counter()
                for at in range(0, args.events, args.batch):
                    index.publish("n0", [(k, 2) for k in keys[at:at + args.batch]])
                return time.perf_counter() - t

            def raw_all() -> float:
                client.delete("raw")
                t = time.perf_counter()
                for at in range(0, args.events, args.batch):
                    pipe = client.pipeline(transaction=False)
                    pipe.hset("raw", mapping={k: 2 for k in keys[at:at + args.batch]})
                    pipe.execute()
                return time.perf_counter() - t

            publish = statistics.median(args.events / publish_all() for _ in range(args.repeats))
            raw = statistics.median(args.events / raw_all() for _ in range(args.repeats))
            log(f"publish {publish:,.0f} events/s, raw HSET {raw:,.0f}/s")
            memory = client.memory_usage(blocks_key(index.prefix, "n0"), samples=0)
            chain = keys[:1000]
            nodes = [f"n{i}" for i in range(args.nodes)]
            for i, node in enumerate(nodes[1:], 1):
                index.publish(node, [(k, 2) for k in chain[:1000 * i // args.nodes]])
            lookups, pings = [], []
            for _ in range(max(args.repeats, 200)):
                t = time.perf_counter()
                index.locate(chain, nodes)
                lookups.append(time.perf_counter() - t)
                t = time.perf_counter()
                client.ping()
                pings.append(time.perf_counter() - t)
            lookup, ping = statistics.median(lookups), statistics.median(pings)
            log(f"lookup of 1,000 blocks over {args.nodes} nodes {lookup * 1e3:.3f} ms, "
                f"ping {ping * 1e3:.3f} ms")
            doc = {"benchmark": "cluster", "machine": machine_info(None),
                   "redis": client.info("server")["redis_version"],
                   "index": {"events_per_s": publish, "raw_hset_per_s": raw,
                             "ratio": publish / raw, "batch": args.batch,
                             "target_events_per_s": TARGET_EVENTS_PER_S,
                             "redis_bytes_per_indexed_block": memory / args.events},
                   "lookup": {"chain_blocks": 1000, "nodes": args.nodes, "median_s": lookup,
                              "ping_s": ping, "ratio": lookup / ping,
                              "target_s": TARGET_LOOKUP_S},
                   "meets_target": publish >= TARGET_EVENTS_PER_S
                   and lookup <= TARGET_LOOKUP_S}
            client.close()
        finally:
            proc.kill()
            proc.wait()
    emit(doc, started, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The `kvstored` command line (also `python -m daemon`)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from typing import Any

from daemon import segments
from daemon.startup import StartupInterrupted, StopSignals
from kvstore.errors import KVStoreError

log = logging.getLogger("daemon")

EPILOG = """\
Sizes take units: 512MiB, 8GiB, 1.5TB. Flags override the --config file, which uses
the same names (TOML, e.g. dram = "8GiB", nvme-path = "/mnt/nvme/kvstore").

Clients connect with kvstore.connect("kvstore://HOST:PORT", token=...). Same-host
clients map the DRAM pool (POSIX shared memory) and copy values themselves; others
stream them over the socket. The wire protocol is in docs/PROTOCOL.md.

SIGTERM or SIGINT: stop accepting, finish requests in flight (up to --drain), flush the
NVMe tier, exit 0. Restarting with the same --nvme-path brings the NVMe tier back. During
start-up (a large pool takes seconds to allocate, its progress in the log) they stop it
as cleanly, exit 0.

Shared memory: the pool, its directory and the doorbell socket live in
/dev/shm/kvstored-PID-START-BOOT-PIDNS-*, named for the process that made them; every exit
that runs code removes them, and a daemon starting removes those of kvstored processes
that no longer exist (after a SIGKILL, say), logging what it reclaimed.

Before allocating --dram, kvstored checks it against MemAvailable, the free space of
/dev/shm (for a shared pool) and a memory cgroup limit, and refuses (exit 2) a pool over
any of them; --force starts anyway, with a warning.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvstored", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve one kvstore store (HBM, DRAM and NVMe tiers) to many processes "
                    "and hosts.", epilog=EPILOG)
    p.add_argument("--listen", metavar="HOST:PORT",
                   help="address to serve clients on (default 127.0.0.1:7400; port 0 picks "
                        "a free port and logs it)")
    p.add_argument("--dram", metavar="SIZE", help="DRAM tier size (default 1GiB; 0 for none)")
    p.add_argument("--nvme-path", metavar="DIR",
                   help="directory of the NVMe tier's segment files (recovered at start)")
    p.add_argument("--nvme", metavar="SIZE", help="NVMe tier size (needs --nvme-path)")
    p.add_argument("--hbm", metavar="SIZE", help="GPU HBM tier size (needs CUDA; default 0)")
    p.add_argument("--max-value", metavar="SIZE",
                   help="largest value (default 16MiB, less for small tiers: at most a "
                        "quarter of --dram and --hbm, an eighth of --nvme)")
    p.add_argument("--ucx", metavar="HOST:PORT",
                   help="also serve clients over UCX (ucxx; kvstore+ucx://HOST:PORT URLs), "
                        "for other hosts on RDMA-capable networks (default: off)")
    p.add_argument("--metrics", metavar="HOST:PORT",
                   help="serve Prometheus /metrics and /healthz here (default: off)")
    p.add_argument("--token-file", metavar="FILE",
                   help="TOML file of tenants: token -> allowed namespaces (default: no "
                        "auth, one trusted tenant); see daemon/tenants.py")
    p.add_argument("--key-file", metavar="FILE",
                   help="the daemon's secret that keeps tenants' keys apart (32 random "
                        "bytes, made at first start, mode 0600); it must outlive the NVMe "
                        "tier's blocks (default: kvstored.key in --nvme-path; without "
                        "NVMe, a fresh secret per start)")
    p.add_argument("--redis", metavar="URL",
                   help="join the pool in this Redis (redis://host:port/db): register "
                        "with a heartbeat, publish the blocks held here to the pool's "
                        "index, serve them to the other nodes and read theirs for this "
                        "node's clients (docs/CLUSTER.md); keeps serving its own blocks "
                        "while Redis is down")
    p.add_argument("--cluster", metavar="NAME",
                   help="with --redis: the pool to join (default 'default'); nodes of one "
                        "name share their blocks")
    p.add_argument("--cluster-secret", metavar="FILE",
                   help="with --redis: the secret the pool's nodes share (32 bytes, made "
                        "here if absent: copy it to every node); it authenticates peer "
                        "traffic and scopes tenants' keys. Required with --token-file; "
                        "without it the nodes share a secret kept in Redis")
    p.add_argument("--redis-ttl", type=float, metavar="SECONDS",
                   help="with --redis: a node that stops heartbeating (killed, cut off) "
                        "leaves the registry and the pool's lookups after this (default "
                        "10; a heartbeat every third of it)")
    p.add_argument("--node-id", help="this node's id in Redis (default hostname:port)")
    p.add_argument("--no-shared-memory", dest="shared_memory", action="store_const",
                   const=False, help="do not offer same-host clients the DRAM pool")
    p.add_argument("--lease", type=float, metavar="SECONDS",
                   help="pins and reservations of a silent client expire after this "
                        "(default 30)")
    p.add_argument("--drain", type=float, metavar="SECONDS",
                   help="on SIGTERM, time requests in flight get to finish (default 10)")
    p.add_argument("--workers", type=int, help="threads running store calls (default 8)")
    p.add_argument("--frame-timeout", type=float, metavar="SECONDS",
                   help="a client that starts a frame must send all of it within this, or "
                        "it is dropped (slow senders; default 30)")
    p.add_argument("--frame-memory", metavar="SIZE",
                   help="memory the large bodies of unfinished requests may hold, all "
                        "connections together (default 256MiB, at least one largest body: "
                        "--max-value or 64MiB of data, plus 4MiB). A body that does not "
                        "fit waits, its connection unread, until others are answered")
    p.add_argument("--access-log", metavar="FILE",
                   help="append one JSON line per request (each match_prefix lookup) to "
                        "FILE, created with mode 0600: {\"ts\", \"keys\" (hex, as the "
                        "client sent them), \"input_tokens\" (keys x --block-tokens), "
                        "\"block_tokens\", \"hit_blocks\", \"namespace\"}; flushed "
                        "every second and at shutdown. `kvstore hitrate FILE` replays it "
                        "(default: off)")
    p.add_argument("--block-tokens", type=int, metavar="N",
                   help="tokens per block of the clients' keys (the engines' page size), "
                        "for the token counts of --access-log and of `kvstore stats` "
                        "(default 16)")
    p.add_argument("--force", action="store_const", const=True,
                   help="start even when --dram is more than the machine can give "
                        "(MemAvailable, free space of /dev/shm, memory cgroup limit): a "
                        "warning instead of the refusal (the OOM killer may follow)")
    p.add_argument("--log-format", choices=["text", "json"], help="log lines (default text)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING"],
                   help="default INFO: a line per client connect/disconnect and per error")
    p.add_argument("--config", metavar="FILE", help="TOML file of the settings above")
    return p


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg (and exc when there is one)."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"ts": round(record.created, 3), "level": record.levelname,
                "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line)


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


async def run(config: object, signals: StopSignals) -> int:
    from daemon.config import DaemonConfig, parse_address
    from daemon.server import Daemon, bind_error

    assert isinstance(config, DaemonConfig)
    registry = metrics_server = ucx = cluster = None
    signals.check()
    daemon = Daemon(config, check_stop=signals.check)
    # Handlers first: a SIGTERM that lands while we start (say, just after the registry
    # entry is written) must still run the cleanup below, not kill the process outright.
    signals.hand_over(asyncio.get_running_loop(), daemon.request_stop)
    try:
        signals.check()  # one came while the store was built: stop before serving
        metrics = daemon.metrics  # with --metrics, the daemon made them
        await daemon.start()
        if metrics is not None:
            from daemon.metrics import MetricsServer

            host, port = config.metrics_address
            metrics_server = MetricsServer(metrics, host, port, health=daemon.health)
            try:
                await metrics_server.start()
            except OSError as e:
                raise bind_error("--metrics", config.metrics, e) from e
            log.info("metrics on http://%s:%d/metrics", *metrics_server.address)
        if config.ucx_listen is not None:
            from daemon.ucx import UcxListener

            host, port = parse_address(config.ucx_listen, "--ucx")
            ucx = UcxListener(daemon, host, port)
            try:
                await ucx.start()
            except OSError as e:
                raise bind_error("--ucx", config.ucx_listen, e) from e
        if config.redis_url is not None:
            from daemon.cluster import ClusterMember
            from daemon.registry import NodeInfo, NodeRegistry, default_node_id
            from kvstore.cluster.peers import registry_prefix

            host, port = daemon.address
            addresses = {"control": f"{host}:{port}"}
            if ucx is not None:
                addresses["ucx"] = "{}:{}".format(*ucx.address)
            if metrics_server is not None:
                addresses["metrics"] = "{}:{}".format(*metrics_server.address)
            node = NodeInfo(
                node_id=config.node_id or default_node_id(f"{host}:{port}"),
                addresses=addresses,
                tiers={t["name"]: t["capacity_bytes"] for t in _tiers(daemon)},
                started_at=time.time())
            registry = NodeRegistry(config.redis_url, node, status=lambda: {
                t["name"]: t["used_bytes"] for t in _tiers(daemon)},
                key_prefix=registry_prefix(config.cluster), ttl_s=config.redis_ttl_s)
            await registry.start()
            cluster = ClusterMember(
                daemon.store, redis_url=config.redis_url, cluster=config.cluster,
                node_id=node.node_id, secret=daemon.cluster_secret,
                secret_in_redis=config.cluster_secret is None,
                max_answer_data_bytes=daemon.store_ops.max_answer_data_bytes,
                ttl_s=config.redis_ttl_s)
            daemon.join_cluster(cluster)
            await cluster.start()
        await daemon.serve_until_stopped()
    finally:
        if cluster is not None:
            await cluster.stop()
        if registry is not None:
            await registry.stop()
        if metrics_server is not None:
            await metrics_server.stop()
        if ucx is not None:
            await ucx.stop()
        await daemon.stop()
    return 0


def _tiers(daemon: object) -> list[dict[str, int | str]]:
    stats = daemon.store.stats()["tiers"]  # type: ignore[attr-defined]
    return [{"name": name, **{k: v for k, v in tier.items()
                              if k in ("capacity_bytes", "used_bytes")}}
            for name, tier in stats.items()]


def _run_loop(main: Any) -> int:
    """Run the daemon on uvloop where it is installed (each request's trip through the
    event loop costs about a third of asyncio's), else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def main(argv: list[str] | None = None, *, signals: StopSignals | None = None) -> int:
    """``signals``: installed by the caller before its imports (`python -m daemon` does),
    else here."""
    signals = signals if signals is not None else StopSignals()
    try:
        return _main(argv, signals)
    finally:
        segments.remove_own()  # whatever failed on the way out, nothing of ours stays
        signals.restore()


def _main(argv: list[str] | None, signals: StopSignals) -> int:
    args = build_parser().parse_args(argv)
    from daemon.config import build

    flags = {"listen": args.listen, "dram": args.dram, "nvme-path": args.nvme_path,
             "nvme": args.nvme, "hbm": args.hbm, "max-value": args.max_value,
             "metrics": args.metrics, "ucx": args.ucx, "token-file": args.token_file,
             "key-file": args.key_file,
             "redis": args.redis, "cluster": args.cluster,
             "cluster-secret": args.cluster_secret, "redis-ttl": args.redis_ttl,
             "node-id": args.node_id, "shared-memory": args.shared_memory,
             "lease": args.lease, "drain": args.drain, "workers": args.workers,
             "log-format": args.log_format, "frame-timeout": args.frame_timeout,
             "access-log": args.access_log, "block-tokens": args.block_tokens,
             "force": args.force, "frame-memory": args.frame_memory}
    try:
        config = build(args.config, flags)
        setup_logging(args.log_level, config.log_format)
        return _run_loop(run(config, signals))
    except StartupInterrupted as e:
        log.info("%s; nothing left behind", e)
        return 0
    except KVStoreError as e:
        print(f"kvstored: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the listen address is taken, and the like
        print(f"kvstored: {e.strerror or e}", file=sys.stderr)
        return 1

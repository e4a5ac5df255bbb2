"""`DaemonConfig`: everything `kvstored` is told, from a TOML file and flags (flags win).

The TOML file uses the flags' names with dashes or underscores, sizes as in the flags:

    listen = "0.0.0.0:7400"
    dram = "8GiB"
    nvme-path = "/mnt/nvme/kvstore"
    nvme = "100GiB"
    metrics = "127.0.0.1:9400"
    token-file = "/etc/kvstore/tokens.toml"
    key-file = "/var/lib/kvstore/kvstored.key"
    redis = "redis://cache:6379/0"
    cluster = "prod"
    cluster-secret = "/etc/kvstore/cluster.key"
    access-log = "/var/log/kvstore/access.jsonl"
    block-tokens = 16
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.frame_memory import largest_body_bytes
from kvstore.config import StoreConfig
from kvstore.errors import ConfigError
from kvstore.units import parse_size


def parse_address(text: str, what: str) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port); port 0 picks a free one."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"{what} must be HOST:PORT, got {text!r}")
    return host, int(port)


@dataclass(frozen=True)
class DaemonConfig:
    listen: str = "127.0.0.1:7400"
    dram_bytes: int | str = "1GiB"
    nvme_path: str | None = None
    nvme_bytes: int | str = 0
    hbm_bytes: int | str = 0
    max_value_bytes: int | str | None = None  # None: derived from the tiers (StoreConfig)
    metrics: str | None = None  # HOST:PORT of /metrics and /healthz
    ucx_listen: str | None = None  # HOST:PORT of the UCX data plane (needs ucxx)
    token_file: str | None = None
    # The secret that scopes tenants' keys (daemon.scope); default kvstored.key in the
    # NVMe directory, or a fresh one per start without NVMe.
    key_file: str | None = None
    redis_url: str | None = None
    node_id: str | None = None  # default: hostname:port
    # With redis_url: the pool this node joins (docs/CLUSTER.md), and the file of the
    # secret its nodes share (peer authentication and the scope key; made if absent).
    # Without a file, the secret is the one the cluster's first node left in Redis.
    cluster: str = "default"
    cluster_secret: str | None = None
    # A node that stops heartbeating leaves the registry (and the pool's lookups) after this.
    redis_ttl_s: float = 10.0
    shared_memory: bool = True  # offer same-host clients the DRAM pool in /dev/shm
    lease_s: float = 30.0  # pins and reservations of a silent client expire after this
    drain_s: float = 10.0  # on SIGTERM, how long in-flight requests may take to finish
    workers: int = 8  # threads running store calls (the event loop never blocks on them)
    frame_timeout_s: float = 30.0  # a started frame must arrive whole within this
    # Bytes the large bodies of unfinished requests may hold, all connections together
    # (daemon/frame_memory.py); None: 256 MiB, or one largest body if that is more.
    frame_memory_bytes: int | str | None = None
    log_format: str = "text"  # or "json"
    access_log: str | None = None  # JSONL of prefix lookups (daemon/access_log.py)
    # Tokens per block of the clients' keys (the daemon cannot see it): token counts in
    # the access log and in stats are blocks times this.
    block_tokens: int = 16
    # Start even when dram_bytes is more than the machine can give (daemon.host_memory):
    # a warning instead of a refusal.
    force: bool = False

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        for name in ("dram_bytes", "nvme_bytes", "hbm_bytes", "max_value_bytes"):
            if getattr(self, name) is not None:
                set_(self, name, parse_size(getattr(self, name), what=f"--{_flag(name)}"))
        parse_address(self.listen, "--listen")
        if self.metrics is not None:
            parse_address(self.metrics, "--metrics")
        if self.ucx_listen is not None:
            parse_address(self.ucx_listen, "--ucx")
        if self.token_file is not None and not Path(self.token_file).is_file():
            raise ConfigError(f"--token-file {self.token_file} is not a readable file")
        if self.nvme_path is not None and Path(self.nvme_path).exists() and not Path(
                self.nvme_path).is_dir():
            raise ConfigError(f"--nvme-path {self.nvme_path} is a file, not a directory")
        if not isinstance(self.cluster, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}",
                                                                 self.cluster):
            raise ConfigError(f"--cluster must be a name of letters, digits, '.', '_' or "
                              f"'-' (at most 64), got {self.cluster!r}")
        if isinstance(self.redis_ttl_s, bool) or not isinstance(self.redis_ttl_s, (int, float)) \
                or not 0.5 <= self.redis_ttl_s <= 3600:
            raise ConfigError(f"--redis-ttl must be in 0.5..3600 seconds, got "
                              f"{self.redis_ttl_s!r}")
        if self.redis_url is None and (self.cluster_secret is not None
                                       or self.cluster != "default"):
            raise ConfigError("--cluster and --cluster-secret need --redis (the pool lives "
                              "in Redis)")
        if self.redis_url is not None and self.key_file is not None:
            raise ConfigError("--key-file with --redis: a node of a pool scopes keys with "
                              "the cluster's secret; give --cluster-secret FILE instead")
        if self.redis_url is not None and self.token_file is not None \
                and self.cluster_secret is None:
            raise ConfigError("--redis with --token-file needs --cluster-secret FILE: the "
                              "secret that authenticates the nodes to each other must not "
                              "come from Redis when tenants are kept apart")
        if self.cluster_secret is not None and Path(self.cluster_secret).is_dir():
            raise ConfigError(f"--cluster-secret {self.cluster_secret} is a directory, not "
                              "a file")
        if self.key_file is not None and Path(self.key_file).is_dir():
            raise ConfigError(f"--key-file {self.key_file} is a directory, not a file")
        if not self.lease_s > 0 or not self.drain_s >= 0:
            raise ConfigError("--lease must be positive and --drain not negative")
        if not self.frame_timeout_s > 0:
            raise ConfigError("--frame-timeout must be positive")
        if not 1 <= self.workers <= 256:
            raise ConfigError("--workers must be in 1..256")
        if isinstance(self.block_tokens, bool) or not isinstance(self.block_tokens, int) \
                or self.block_tokens <= 0:
            raise ConfigError(f"--block-tokens must be a positive int, got "
                              f"{self.block_tokens!r}")
        if not isinstance(self.force, bool):
            raise ConfigError(f"--force must be true or false, got {self.force!r}")
        if self.access_log is not None:
            parent = Path(self.access_log).parent
            if not parent.is_dir() or Path(self.access_log).is_dir():
                raise ConfigError(f"--access-log {self.access_log}: not a file in an "
                                  "existing directory")
        if self.log_format not in ("text", "json"):
            raise ConfigError("--log-format must be text or json")
        max_value_bytes = self.store_config("probe").max_value_bytes  # the store's checks
        if self.frame_memory_bytes is not None:
            set_(self, "frame_memory_bytes",
                 parse_size(self.frame_memory_bytes, what="--frame-memory"))
            least = largest_body_bytes(max_value_bytes)
            if self.frame_memory_bytes < least:
                raise ConfigError(f"--frame-memory must hold one largest request body, "
                                  f"{least} bytes with --max-value {max_value_bytes} "
                                  f"(its data, at least 64 MiB, and 4 MiB of meta); got "
                                  f"{self.frame_memory_bytes}")

    @property
    def scope_key_path(self) -> str | None:
        """Where the scope key lives: ``key_file``, else in the NVMe directory, else nowhere
        (a daemon without NVMe keeps nothing across restarts)."""
        if self.key_file is not None:
            return self.key_file
        if self.nvme_path is not None:
            from daemon.scope import DEFAULT_FILE_NAME

            return str(Path(self.nvme_path) / DEFAULT_FILE_NAME)
        return None

    @property
    def listen_address(self) -> tuple[str, int]:
        return parse_address(self.listen, "--listen")

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        return None if self.metrics is None else parse_address(self.metrics, "--metrics")

    def store_config(self, shm_name: str | None) -> StoreConfig:
        try:
            return StoreConfig(
                dram_bytes=self.dram_bytes, nvme_path=self.nvme_path, nvme_bytes=self.nvme_bytes,
                hbm_bytes=self.hbm_bytes, max_value_bytes=self.max_value_bytes,
                lease_s=self.lease_s,
                dram_shm_name=shm_name if self.shared_memory and self.dram_bytes else None)
        except ConfigError as e:
            message = str(e).replace("StoreConfig.", "--").replace("_bytes", "")
            message = message.replace("max_value", "max-value")
            raise ConfigError(message.replace("nvme_path", "nvme-path")) from None

    def replace(self, **changes: Any) -> DaemonConfig:
        return dataclasses.replace(self, **changes)


# flag name <-> field name
_FIELD_OF_FLAG = {
    "listen": "listen", "dram": "dram_bytes", "nvme-path": "nvme_path", "nvme": "nvme_bytes",
    "hbm": "hbm_bytes", "max-value": "max_value_bytes", "metrics": "metrics", "ucx": "ucx_listen",
    "token-file": "token_file", "key-file": "key_file", "redis": "redis_url", "node-id": "node_id",
    "cluster": "cluster", "cluster-secret": "cluster_secret", "redis-ttl": "redis_ttl_s",
    "shared-memory": "shared_memory", "lease": "lease_s", "drain": "drain_s",
    "workers": "workers", "log-format": "log_format", "frame-timeout": "frame_timeout_s",
    "access-log": "access_log", "block-tokens": "block_tokens", "force": "force",
    "frame-memory": "frame_memory_bytes",
}


def _flag(field: str) -> str:
    return next(f for f, name in _FIELD_OF_FLAG.items() if name == field)


def load_toml(path: str | Path) -> dict[str, Any]:
    """A config file's settings as DaemonConfig fields; unknown keys are errors."""
    try:
        document = tomllib.loads(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"cannot read --config {path}: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config {path} is not valid TOML: {e}") from e
    fields = {}
    for key, value in document.items():
        flag = key.replace("_", "-")
        if flag not in _FIELD_OF_FLAG:
            raise ConfigError(f"--config {path}: unknown setting {key!r} (known: "
                              f"{', '.join(sorted(_FIELD_OF_FLAG))})")
        fields[_FIELD_OF_FLAG[flag]] = value
    return fields


def build(file: str | Path | None, flags: dict[str, Any]) -> DaemonConfig:
    """The config file's settings, overridden by the flags given (None = not given)."""
    fields = load_toml(file) if file is not None else {}
    fields.update({_FIELD_OF_FLAG[f]: v for f, v in flags.items() if v is not None})
    try:
        return DaemonConfig(**fields)
    except TypeError as e:
        raise ConfigError(f"bad setting type: {e}") from None

"""``kvstored --access-log FILE``: what a client's lookups write, replayed by `kvstore hitrate`."""

from __future__ import annotations

import json
import signal
import stat
import subprocess
import sys
import time

import pytest

import kvstore
from daemon.config import DaemonConfig
from kvstore.errors import ConfigError
from kvstore.sim.traces import TraceFormat, read_traces
from tests.daemon.conftest import REPO

BLOCK_TOKENS = 16


def _serve(client: kvstore.Client, tokens: list[int]) -> int:
    """What an engine does per request: look up the prefix, then store every block."""
    keys = kvstore.prefix_hashes(tokens, block_tokens=BLOCK_TOKENS, namespace="test")
    hit_blocks = client.match_prefix(keys)
    client.put_many(keys, [bytes([i]) * 64 for i in range(len(keys))])
    return hit_blocks


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_lookups_replay_to_the_hit_rate_worked_out_by_hand(tmp_path, start_daemon):
    log_path = tmp_path / "access.jsonl"
    daemon = start_daemon("--dram", "16MiB", "--access-log", str(log_path),
                          "--block-tokens", str(BLOCK_TOKENS))
    a = list(range(64))  # 4 blocks
    b = a[:32] + list(range(1000, 1032))  # shares a's first 2 blocks
    c = [*range(2000, 2048), 7]  # 3 full blocks, 1 token with no key
    with kvstore.connect(daemon.url) as client:
        client.match_prefix([])  # no keys: no request, not logged
        answers = [_serve(client, t) for t in (a, b, a, c, b)]
    assert answers == [0, 2, 4, 0, 4]
    assert daemon.signal(signal.SIGTERM) == 0

    lines = _lines(log_path)
    assert [line["hit_blocks"] for line in lines] == answers
    assert [line["input_tokens"] for line in lines] == [64, 64, 64, 48, 64]
    assert all(line["block_tokens"] == BLOCK_TOKENS and line["namespace"] == "default"
               for line in lines)
    # The keys the client sent, unscoped.
    assert lines[0]["keys"] == [k.hex() for k in kvstore.prefix_hashes(
        a, block_tokens=BLOCK_TOKENS, namespace="test")]
    assert [line["ts"] for line in lines] == sorted(line["ts"] for line in lines)

    trace = read_traces([log_path])  # format sniffed, block size from the log
    assert trace.block_tokens == BLOCK_TOKENS and len(trace) == 5
    # hits: 0 + 2 + 4 + 0 + 4 blocks = 10 blocks = 160 tokens of 304 input tokens
    result = subprocess.run(
        [sys.executable, "-m", "kvstore.cli", "hitrate", str(log_path), "--format",
         "access-log", "--dram", "1M", "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["block_tokens"] == BLOCK_TOKENS and doc["input_tokens"] == 304
    assert doc["infinite"]["hit_rate"] == pytest.approx(160 / 304)
    for replayed in doc["runs"][0]["policies"].values():
        assert replayed["hit_rate"] == pytest.approx(160 / 304)


def test_the_log_survives_sigterm_whole_and_is_appended_to(tmp_path, start_daemon):
    log_path = tmp_path / "access.jsonl"
    daemon = start_daemon("--dram", "16MiB", "--access-log", str(log_path))
    keys = kvstore.prefix_hashes(list(range(160)), block_tokens=16, namespace="t")
    with kvstore.connect(daemon.url) as client:
        for i in range(300):
            client.match_prefix(keys[:1 + i % len(keys)])
    # Well within the 1 s flush interval: the lines are still in the daemon's memory.
    assert daemon.signal(signal.SIGTERM) == 0
    assert stat.S_IMODE(log_path.stat().st_mode) == 0o600
    lines = _lines(log_path)
    assert [len(line["keys"]) for line in lines] == [1 + i % 10 for i in range(300)]
    assert all(line["input_tokens"] == 16 * len(line["keys"]) for line in lines)

    daemon = start_daemon("--dram", "16MiB", "--access-log", str(log_path))
    with kvstore.connect(daemon.url) as client:
        client.match_prefix(keys)
    assert daemon.signal(signal.SIGTERM) == 0
    assert len(_lines(log_path)) == 301
    assert read_traces([log_path], fmt=TraceFormat.ACCESS_LOG).num_accesses == \
        sum(1 + i % 10 for i in range(300)) + 10


def test_lines_reach_the_file_within_about_a_second(tmp_path, start_daemon):
    log_path = tmp_path / "access.jsonl"
    daemon = start_daemon("--dram", "16MiB", "--access-log", str(log_path))
    with kvstore.connect(daemon.url) as client:
        client.match_prefix(kvstore.prefix_hashes(list(range(32)), block_tokens=16,
                                                    namespace="t"))
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and not log_path.read_text():
            time.sleep(0.05)
    assert len(_lines(log_path)) == 1  # while the daemon still runs


def test_bad_settings_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="block-tokens"):
        DaemonConfig(block_tokens=0)
    with pytest.raises(ConfigError, match="access-log"):
        DaemonConfig(access_log=str(tmp_path / "missing-dir" / "a.jsonl"))
    result = subprocess.run([sys.executable, "-m", "daemon", "--access-log", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "access-log" in result.stderr
    assert "Traceback" not in result.stderr


def test_routing_probes_are_neither_logged_nor_counted(start_daemon, tmp_path):
    log = tmp_path / "access.jsonl"
    daemon = start_daemon("--dram", "16MiB", "--access-log", str(log))
    keys = [bytes([i]) * 16 for i in range(3)]
    with kvstore.connect(daemon.url) as client:
        assert client.match_prefix(keys, probe=True) == 0
        assert client.stats()["prefix"]["lookups"] == 0
        assert client.match_prefix(keys) == 0
        assert client.stats()["prefix"]["lookups"] == 1
    daemon.stop()
    lines = log.read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["keys"] == [k.hex() for k in keys]

"""``kvstore stats URL`` against real kvstored subprocesses (through `stats_cli.register`,
as `kvstore.cli` will wire it)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys

import pytest

import kvstore
from kvstore.cli.stats import register
from tests.daemon.conftest import REPO, DaemonProcess, free_port

BLOCK_TOKENS = 32
# `python -m kvstore.cli stats ...` until the lead routes "stats" there.
STATS = ("import argparse, sys; from kvstore.cli.stats import register; "
         "p = argparse.ArgumentParser(prog='kvstore'); register(p.add_subparsers()); "
         "a = p.parse_args(sys.argv[1:]); sys.exit(a.run(a))")


def _run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="kvstore")
    register(parser.add_subparsers())
    args = parser.parse_args(["stats", *argv])
    return args.run(args)


def _spawn(*argv: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", STATS, "stats", *argv], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    """A daemon holding 2 blocks, asked: a lookup of 4 keys (2 hit), one of 1 key (hit),
    a get that hits and one that misses."""
    process = DaemonProcess(tmp_path_factory.mktemp("kvstored"), "--dram", "16MiB",
                            "--block-tokens", str(BLOCK_TOKENS)).start()
    keys = kvstore.prefix_hashes(list(range(4 * BLOCK_TOKENS)), block_tokens=BLOCK_TOKENS,
                                 namespace="t")
    with kvstore.connect(process.url) as client:
        client.put_many(keys[:2], [b"a" * 1000, b"b" * 1000])
        assert client.match_prefix(keys) == 2
        assert client.match_prefix(keys[:1]) == 1
        assert client.get(keys[0]) is not None and client.get(keys[3]) is None
    yield process
    process.stop()


def test_json_figures_match_what_the_daemon_was_asked(daemon, capsys):
    assert _run(daemon.url, "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["block_tokens"] == BLOCK_TOKENS and doc["blocks"] == 2
    since = doc["since_start"]
    assert since["lookups"] == 2
    assert since["tokens_queried"] == 5 * BLOCK_TOKENS
    assert since["tokens_hit"] == 3 * BLOCK_TOKENS
    assert since["token_hit_rate"] == pytest.approx(3 / 5)
    assert (since["block_gets"], since["block_get_hits"]) == (2, 1)
    dram = doc["tiers"]["dram"]
    assert dram["capacity_bytes"] == 16 << 20 and dram["blocks"] == 2
    assert 2000 <= dram["used_bytes"] < 16 << 20
    assert dram["get_hits"] == 1
    assert doc["interval"] is None  # one view: nothing to difference


def test_once_prints_one_table_since_start(daemon, capsys):
    assert _run(daemon.url) == 0
    out = capsys.readouterr().out
    assert out.count("since start") == 1 and "last " not in out
    assert "dram" in out and "16.0 MiB" in out
    assert "60.0%" in out  # the token hit rate, 3 of 5 blocks
    assert f"blocks x {BLOCK_TOKENS}" in out


def test_watch_json_reports_each_interval(daemon):
    proc = _spawn(daemon.url, "--watch", "1", "--count", "2", "--json")
    try:
        first = json.loads(proc.stdout.readline())
        keys = kvstore.prefix_hashes(list(range(4 * BLOCK_TOKENS)), block_tokens=BLOCK_TOKENS,
                                     namespace="t")
        with kvstore.connect(daemon.url) as client:  # during the interval
            assert client.match_prefix(keys[:2]) == 2
            assert client.match_prefix(keys[2:]) == 0  # another prefix: nothing stored
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert first["interval"] is None
    [second] = [json.loads(line) for line in out.splitlines()]
    interval = second["interval"]
    assert interval["seconds"] == pytest.approx(1.0, abs=0.3)
    assert interval["lookups"] == 2
    assert interval["tokens_queried"] == 4 * BLOCK_TOKENS
    assert interval["tokens_hit"] == 2 * BLOCK_TOKENS
    assert interval["token_hit_rate"] == pytest.approx(0.5)
    assert second["since_start"]["lookups"] == first["since_start"]["lookups"] + 2


def test_watch_table_redraws_until_ctrl_c(daemon):
    proc = _spawn(daemon.url, "--watch", "0.2")
    try:
        lines = []
        while sum("since start" in line for line in lines) < 2:  # two views drawn
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            lines.append(line)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0 and "Traceback" not in err
    assert any("last 0.2 s" in line for line in lines)  # the second view has an interval


def test_count_stops_the_watch(daemon):
    proc = _spawn(daemon.url, "--watch", "0.1", "--count", "3")
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out.count("since start") == 3 and out.count("last 0.1 s") == 2


@pytest.mark.parametrize("url, message", [
    (f"kvstore://127.0.0.1:{free_port()}", "cannot reach kvstored"),
    ("http://localhost:7400", "not a kvstore URL"),
])
def test_unreachable_or_bad_url_exits_2_with_one_line(url, message):
    proc = _spawn(url)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and out == ""
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_refused_token_exits_2(tmp_path, capsys):
    tokens = tmp_path / "tokens.toml"
    tokens.write_text('[[tenant]]\nname = "a"\ntoken = "the-right-token-0123"\n'
                      'namespaces = ["a"]\n')
    process = DaemonProcess(tmp_path, "--dram", "16MiB", "--token-file", str(tokens)).start()
    try:
        assert _run(process.url, "--token", "a-wrong-token-000000") == 2
        assert "token" in capsys.readouterr().err
        assert _run(process.url, "--token", "the-right-token-0123", "--json") == 0
        assert json.loads(capsys.readouterr().out)["since_start"]["lookups"] == 0
    finally:
        process.stop()


def test_a_token_of_several_namespaces_gets_its_own_figures(tmp_path, capsys):
    """Issue 15: `kvstore stats` failed with a token granting several namespaces."""
    tokens = tmp_path / "tokens.toml"
    tokens.write_text('[[tenant]]\nname = "a"\ntoken = "the-right-token-0123"\n'
                      'namespaces = ["a", "b"]\nquota = { dram = "4MiB" }\n')
    process = DaemonProcess(tmp_path, "--dram", "16MiB", "--token-file", str(tokens)).start()
    try:
        with kvstore.connect(process.url, token="the-right-token-0123", namespace="b") as client:
            client.put(b"k" * 16, b"v" * 1000)
        assert _run(process.url, "--token", "the-right-token-0123", "--json") == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["tenant"] == "a"
        assert doc["tiers"]["dram"] == {"capacity_bytes": 4 << 20, "used_bytes": 1000,
                                        "used_fraction": 1000 / (4 << 20), "blocks": 1,
                                        "get_hits": 0}
        assert _run(process.url, "--token", "the-right-token-0123", "--namespace", "a") == 0
        assert "tenant a" in capsys.readouterr().out
    finally:
        process.stop()


def test_bad_watch_interval_exits_2(daemon, capsys):
    assert _run(daemon.url, "--watch", "0") == 2
    assert "--watch" in capsys.readouterr().err


def test_a_node_of_a_pool_shows_its_peers_and_what_it_read_from_them(tmp_path, capsys):
    from tests.cluster.conftest import Pool
    from tests.cluster.test_pool import chain, value

    pool = Pool(tmp_path)
    try:
        a = pool.start("n0", "--dram", "16MiB")
        b = pool.start("n1", "--dram", "16MiB")
        keys = chain(3, 2)
        with kvstore.connect(a.url) as ca, kvstore.connect(b.url, shared_memory=False) as cb:
            ca.put_many(keys, [value(k) for k in keys])
            pool.wait_published("n0", keys)
            pool.wait_peers("n1", {"n0"}, cb)
            assert cb.get_many(keys) == [value(k) for k in keys]
        assert _run(b.url, "--json") == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["cluster"]["peers"] == ["n0"] and doc["cluster"]["remote_hits"] == 2
        assert _run(b.url) == 0
        out = capsys.readouterr().out
        assert "pool 'test' as node n1: peers n0; blocks read from peers 2" in out
    finally:
        pool.close()

"""The `kvstore` command line, run as a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def kvstore(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvstore.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_demo_json_serves_every_turn_and_matches_the_reference(tmp_path):
    result = kvstore("demo", "--json", "--preset", "tiny", "--users", "2", "--turns", "3",
                     "--max-new-tokens", "6", "--interval", "0", "--dram", "64MiB",
                     "--nvme", "128MiB", "--nvme-path", str(tmp_path))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    summary = report["summary"]
    assert summary["requests"] == 6 == len(report["requests"])
    assert summary["all_disaggregated_matched"]
    # Every turn after the first finds at least the system prompt and the earlier turns.
    later = [r for r in report["requests"] if r["turn"] > 0]
    assert all(r["cached_tokens"] >= 256 for r in later)
    assert 0 < summary["cached_tokens"] < summary["prompt_tokens"]
    assert all(r["output_tokens"] == 6 and r["ttft_s"] > 0 for r in report["requests"])
    assert report["store_stats"]["checksum_failures"] == 0
    # The engines plan their fetches with each tier's measured cost (engines.fetch_plan).
    planner = report["fetch_planner"]
    assert planner["plans"] > 0 and set(planner["tier_costs"]) == {"dram", "nvme"}


def test_demo_through_a_daemon(tmp_path):
    from tests.daemon.conftest import DaemonProcess

    daemon = DaemonProcess(tmp_path, "--dram", "64MiB").start()
    try:
        result = kvstore("demo", "--json", "--preset", "tiny", "--users", "2", "--turns", "2",
                         "--max-new-tokens", "4", "--interval", "0", "--url", daemon.url)
    finally:
        daemon.stop()
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["store"] == daemon.url and report["summary"]["requests"] == 4
    assert report["summary"]["all_disaggregated_matched"]
    assert report["summary"]["cached_tokens"] > 0
    # The daemon's client tells tiers: its one tier measured through the client.
    assert set(report["fetch_planner"]["tier_costs"]) == {"dram"}


def test_every_subcommand_has_help():
    for name in ("demo", "hitrate", "size", "stats"):
        result = kvstore(name, "--help")
        assert result.returncode == 0 and "usage: kvstore" in result.stdout, name


def test_bad_arguments_exit_2_with_a_message():
    result = kvstore("demo", "--preset", "tiny", "--dram", "lots")
    assert result.returncode == 2 and "lots" in result.stderr
    assert "Traceback" not in result.stderr
    assert kvstore("frobnicate").returncode == 2


def test_a_bad_flag_of_a_subcommand_shows_that_subcommands_usage():
    for name, args, flag in (("hitrate", ("t.jsonl", "--hmb", "3M"), "--hmb"),
                             ("size", ("--bogus",), "--bogus"),
                             ("stats", ("kvstore://127.0.0.1:1", "--wach", "5"), "--wach")):
        result = kvstore(name, *args)
        assert result.returncode == 2, (name, result.stderr)
        assert result.stderr.startswith(f"usage: kvstore {name} "), (name, result.stderr)
        assert f"kvstore {name}: error: unrecognized arguments: {flag}" in result.stderr, name
    # A value the subcommand refuses once parsed reads the same.
    result = kvstore("hitrate", "t.jsonl", "--hbm=-3M")
    assert result.returncode == 2 and result.stderr.startswith("usage: kvstore hitrate ")
    assert "kvstore hitrate: error: --hbm must not be negative" in result.stderr
    # An unknown flag before the command is still the top-level parser's.
    result = kvstore("--bogus", "size", "--model", "tiny", "--tokens", "1")
    assert result.returncode == 2 and result.stderr.startswith("usage: kvstore [-h]")
    assert "kvstore: error: unrecognized arguments: --bogus" in result.stderr


def test_demo_with_fp8_kv_blocks(tmp_path):
    """``--kv-codec fp8``: the engines store compressed blocks and still reuse them; the
    report says which codec, and a reply that differs from the reference (lossy) is
    counted, not a failure."""
    result = kvstore("demo", "--json", "--preset", "tiny", "--users", "2", "--turns", "2",
                     "--max-new-tokens", "4", "--interval", "0", "--dram", "64MiB",
                     "--nvme", "0", "--kv-codec", "fp8")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["kv_codec"] == "fp8" and report["summary"]["cached_tokens"] > 0
    assert report["summary"]["requests"] == 4

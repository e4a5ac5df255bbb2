"""The `kvstore` command line, run as a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def kvstore(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvstore.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_demo_json_reports_hits_and_a_complete_recovery(tmp_path):
    result = kvstore("demo", "--json", "--users", "3", "--turns", "3", "--system-tokens", "256",
                     "--dram", "8MiB", "--nvme", "64MiB", "--nvme-path", str(tmp_path))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["requests"] == 9
    assert report["corrupt_blocks"] == 0
    assert 0 < report["cached_tokens"] < report["input_tokens"]
    assert report["recovered_blocks"] == report["blocks_on_nvme_at_close"] > 0


def test_later_subcommands_say_not_yet():
    for name in ("hitrate", "stats", "size"):
        result = kvstore(name)
        assert result.returncode == 2 and "not yet" in result.stderr


def test_bad_arguments_exit_2_with_a_message():
    result = kvstore("demo", "--dram", "lots")
    assert result.returncode == 2 and "lots" in result.stderr
    assert "Traceback" not in result.stderr
    assert kvstore("frobnicate").returncode == 2

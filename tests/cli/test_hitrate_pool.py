"""`kvstore hitrate --nodes`: the pool's report, its equality with the plain command at one
node, and clear errors for flags that do not fit."""

from __future__ import annotations

import json

import pytest

from tests.cli.test_hitrate import write_trace
from tests.sim.test_replay import CONVERSATION, kvstore, needs_trace


def report(*args: str) -> dict:
    result = kvstore(str(CONVERSATION), "--json", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@needs_trace
def test_one_node_reports_what_the_plain_command_does():
    plain = report("--hbm", "1M", "--dram", "2M")
    pool = report("--hbm", "1M", "--dram", "2M", "--nodes", "1")
    assert pool["infinite"] == plain["infinite"]
    assert pool["capacity_tokens"] == plain["runs"][0]["capacity_tokens"]
    # A node's capacity is counted in whole blocks.
    assert pool["node_capacity_tokens"] == [{"hbm": 1_000_000 // 512 * 512,
                                             "dram": 2_000_000 // 512 * 512, "nvme": 0}]
    for name, single in plain["runs"][0]["policies"].items():
        runs = pool["policies"][name]
        assert runs["one_node"] == single
        assert [(r["configuration"], r["routing"]) for r in runs["configurations"]] == [
            ("per-node", "random"), ("pooled", "random"), ("pooled", "prefix")]
        for run in runs["configurations"]:
            assert (run["hit_tokens"], run["local_hit_tokens"], run["remote_hit_tokens"]) == (
                single["hit_tokens"], single["hit_tokens"], 0)
            assert run["hit_tokens_per_tier"] == single["hit_tokens_per_tier"]


@needs_trace
def test_four_nodes_report_every_configuration():
    doc = report("--hbm", "3M", "--nodes", "4", "--policy", "leaf-lru")
    assert (doc["nodes"], doc["routing"], doc["seed"]) == (4, "random", 0)
    assert sum(n["hbm"] for n in doc["node_capacity_tokens"]) == 3_000_000 // 512 * 512
    runs = doc["policies"]["leaf-lru"]
    alone, pooled, by_prefix = runs["configurations"]
    assert alone["remote_hit_tokens"] == 0 < pooled["remote_hit_tokens"]
    assert alone["hit_tokens"] < pooled["hit_tokens"]
    assert pooled["local_hit_tokens"] < by_prefix["local_hit_tokens"]
    for run in runs["configurations"]:
        assert run["local_hit_tokens"] + run["remote_hit_tokens"] == run["hit_tokens"]
        assert sum(run["requests_per_node"]) == doc["requests"]
    assert alone["requests_per_node"] == pooled["requests_per_node"]  # the same draws
    other_seed = report("--hbm", "3M", "--nodes", "4", "--policy", "leaf-lru", "--seed", "1")
    assert other_seed["policies"]["leaf-lru"]["configurations"][0]["requests_per_node"] != (
        alone["requests_per_node"])
    # --routing prefix: per node and pooled, both by prefix (no third line: it would repeat).
    doc = report("--hbm", "3M", "--nodes", "4", "--policy", "leaf-lru", "--routing", "prefix")
    assert doc["seed"] is None
    runs = doc["policies"]["leaf-lru"]["configurations"]
    assert [(r["configuration"], r["routing"]) for r in runs] == [
        ("per-node", "prefix"), ("pooled", "prefix")]
    assert runs[1] == by_prefix


@needs_trace
def test_the_table_names_each_configuration():
    result = kvstore(str(CONVERSATION), "--hbm", "3M", "--nodes", "4", "--policy", "lru")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "4 nodes of hbm 749,568-750,080 tokens each; a pool of 3,000,000 tokens; " \
        "random routing seed 0" in lines
    names = [line.split()[0] for line in lines[lines.index(next(
        line for line in lines if line.startswith("lru "))) + 1:]]
    assert names == ["one", "per-node", "pooled", "pooled"]
    assert "local hit tokens" in result.stdout and "remote hit tokens" in result.stdout


BAD = {
    ("--nodes", "0"): "--nodes must be 1 or more, got 0",
    ("--nodes", "-2"): "--nodes must be 1 or more, got -2",
    ("--nodes", "two"): "argument --nodes: invalid int value",
    ("--routing", "prefix"): "--routing needs --nodes N",
    ("--seed", "3"): "--seed needs --nodes N",
    ("--nodes", "1", "--routing", "random"): "--routing needs --nodes 2 or more",
    ("--nodes", "4", "--routing", "prefix", "--seed", "1"): "--seed draws the random routing",
    ("--nodes", "4", "--routing", "hash"): "argument --routing: invalid choice",
    ("--nodes", "4", "--sweep", "1k,2k"): "--sweep does not combine with --nodes",
    ("--nodes", "4", "--window", "10"): "--window does not combine with --nodes",
    ("--nodes", "4", "--hbm", "1536", "--dram", "0"): "leave node 4 none",
}


@pytest.mark.parametrize(("args", "message"), list(BAD.items()))
def test_bad_arguments_exit_2_with_a_message(tmp_path, args, message):
    trace = write_trace(tmp_path / "t.jsonl")
    result = kvstore(str(trace), "--hbm", "3k", *args)
    assert result.returncode == 2, (args, result.stderr)
    assert message in result.stderr, (args, result.stderr)
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_help_explains_the_pool():
    result = kvstore("--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "``--nodes N`` replays the trace over a pool of N cache nodes" in text
    assert "the pool's total, 1/N per node" in text
    assert "--routing {random,prefix}" in text and "--seed SEED" in text

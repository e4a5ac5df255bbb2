"""`kvstore hitrate`: hand-worked traces, independent counts on the real trace, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest

from kvstore.placement.rules import EvictionPolicy
from kvstore.sim.replay import ReplayConfig, belady, infinite_bound, replay
from kvstore.sim.traces import Trace, TraceError, TraceFormat, read_traces

REPO = Path(__file__).resolve().parents[2]
CONVERSATION = Path("/work/shared/data/mooncake_conversation_trace.jsonl")
needs_trace = pytest.mark.skipif(not CONVERSATION.exists(), reason="conversation trace absent")
BT = 10  # block tokens of the hand-made traces


def make_trace(*requests: tuple[str, int]) -> Trace:
    """Requests as ``("S a", input_tokens)``: each name a block, chained in that order."""
    trace = Trace(BT)
    for i, (names, n) in enumerate(requests):
        trace.keys.append([name.encode() for name in names.split()])
        trace.input_tokens.append(n)
        trace.timestamps_s.append(float(i))
    return trace


def one_tier(blocks: int, policy: EvictionPolicy) -> ReplayConfig:
    return ReplayConfig((blocks, 0, 0), policy=policy)


def kvstore(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvstore.cli", "hitrate", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


# -- hand-made traces -----------------------------------------------------------------------


def test_leaf_first_keeps_the_shared_root_that_plain_lru_evicts():
    # Two blocks of room. After [S a], the unrelated x needs room: plain LRU evicts S (used
    # first), leaf-first evicts a (S has a child, so is no candidate). [S b] then hits S
    # under leaf-first only: 10 of 20+10+20 input tokens.
    trace = make_trace(("S a", 20), ("x", 10), ("S b", 20))
    leaf = replay(trace, one_tier(2, EvictionPolicy.LEAF_LRU))
    lru = replay(trace, one_tier(2, EvictionPolicy.LRU))
    assert (leaf.hit_tokens, lru.hit_tokens) == (10, 0)
    assert leaf.hit_rate == pytest.approx(0.2) and lru.hit_rate == 0.0
    # Leaf-first evicts for x and b; plain LRU also for S, which it has to bring back.
    assert (leaf.evictions, lru.evictions) == (2, 3)
    # Belady: x is never used again, later than anything held: not admitted; S stays.
    assert belady(trace, 2).hit_tokens == 10
    assert infinite_bound(trace).hit_tokens == 10


@pytest.mark.parametrize("policy", list(EvictionPolicy))
def test_lru_order_and_the_input_length_trim(policy):
    # Three blocks of room; [A B] then [C] then [A B D] (input 25: the hit of 2 blocks is
    # 20 tokens), [C] again: A, B, C all fit, D evicts the least recently used leaf, C
    # (C is a leaf and older than A's chain for both policies), so the last [C] misses.
    trace = make_trace(("A B", 20), ("C", 10), ("A B D", 25), ("C", 5))
    result = replay(trace, one_tier(3, policy))
    assert result.hit_tokens == 20
    assert result.input_tokens == 60
    assert result.hit_tokens_per_tier == {"hbm": 20}
    # A partial last block: a hit of 2 blocks on a 15-token input counts 15 tokens.
    short = replay(make_trace(("A B", 20), ("A B", 15)), one_tier(3, policy))
    assert short.hit_tokens == 15


def test_demotion_and_promotion_follow_the_store():
    # HBM 1 block, DRAM 2, leaf-first. [S a]: S into HBM; a would evict its own parent
    # (put_many protects it), so a goes to DRAM. [S a] hits S in HBM, a in DRAM; touching a
    # promotes it: S (an HBM leaf now) is evicted and demoted to DRAM. [S a c]: S in DRAM
    # and a in HBM hit; S is promoted (a evicted from HBM, already in DRAM: no demotion),
    # then a (S evicted, in DRAM), then c needs HBM room: a goes (in DRAM already).
    trace = make_trace(("S a", 20), ("S a", 20), ("S a c", 30))
    result = replay(trace, ReplayConfig((1, 2, 0), policy=EvictionPolicy.LEAF_LRU))
    assert result.hit_tokens == 40 and result.input_tokens == 70
    assert result.hit_tokens_per_tier == {"hbm": 20, "dram": 20}
    assert (result.evictions, result.demotions, result.promotions) == (4, 1, 3)


def test_belady_beats_lru_on_a_cyclic_scan():
    # Cyclic access over 3 single-block requests with room for 2: LRU always misses,
    # Belady keeps one of them and hits every other time at least.
    trace = make_trace(*[(name, 10) for name in "xyzxyzxyz"])
    assert replay(trace, one_tier(2, EvictionPolicy.LRU)).hit_tokens == 0
    assert belady(trace, 2).hit_tokens >= 30


# -- the real trace, against independent counts ------------------------------------------------


def mooncake_rows(limit: int | None = None) -> list[dict]:
    with CONVERSATION.open() as f:
        rows = [json.loads(line) for line in f]
    return rows[:limit] if limit else rows


@needs_trace
def test_infinite_bound_equals_an_independent_count():
    seen: set[int] = set()
    hit = total = 0
    for row in mooncake_rows():
        ids = row["hash_ids"]
        n = 0
        while n < len(ids) and ids[n] in seen:
            n += 1
        hit += min(n * 512, row["input_length"])
        total += row["input_length"]
        seen.update(ids)
    result = infinite_bound(read_traces([CONVERSATION]))
    assert (result.hit_tokens, result.input_tokens) == (hit, total)
    assert 0.35 < result.hit_rate < 0.42  # the paper's cache ratio is about 40%


@needs_trace
def test_plain_lru_equals_an_ordered_dict_simulation():
    rows, capacity = mooncake_rows(3000), 1000  # more room than any request's 247 blocks
    cache: OrderedDict[int, None] = OrderedDict()
    hit = 0
    for row in rows:
        ids = row["hash_ids"]
        n = 0
        while n < len(ids) and ids[n] in cache:
            n += 1
        hit += min(n * 512, row["input_length"])
        for block in ids:
            if block in cache:
                cache.move_to_end(block)
            else:
                if len(cache) >= capacity:
                    cache.popitem(last=False)
                cache[block] = None
    trace = read_traces([CONVERSATION])
    trace.keys, trace.input_tokens = trace.keys[:3000], trace.input_tokens[:3000]
    trace.timestamps_s = trace.timestamps_s[:3000]
    result = replay(trace, one_tier(capacity, EvictionPolicy.LRU))
    assert result.hit_tokens == hit > 0


@needs_trace
def test_belady_is_at_least_lru_on_every_sweep_point(tmp_path):
    head = tmp_path / "head.jsonl"
    head.write_text("".join(CONVERSATION.read_text().splitlines(True)[:3000]))
    result = kvstore(str(head), "--sweep", "100k,300k,1M,3M", "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert len(doc["runs"]) == 4
    for row in doc["runs"]:
        best = row["belady"]["hit_rate"]
        assert best <= doc["infinite"]["hit_rate"] + 1e-12
        for policy in EvictionPolicy:
            assert best >= row["policies"][policy.value]["hit_rate"]
    rates = [row["policies"]["leaf-lru"]["hit_rate"] for row in doc["runs"]]
    assert rates == sorted(rates) and rates[0] < rates[-1]


# -- the other formats ---------------------------------------------------------------------------


def test_token_and_access_log_traces(tmp_path):
    system = list(range(100, 116))  # 16 tokens: 2 blocks of 8
    tokens = tmp_path / "tokens.jsonl"
    tokens.write_text("\n".join(json.dumps({"tokens": system + tail})
                                for tail in ([1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11])) + "\n")
    trace = read_traces([tokens], block_tokens=8)
    assert [len(k) for k in trace.keys] == [2, 3]  # the 3-token tail is no block
    assert trace.keys[0] == trace.keys[1][:2]
    assert infinite_bound(trace).hit_tokens == 16
    log = tmp_path / "access.jsonl"
    log.write_text("\n".join(json.dumps({"ts": 1.5 * i, "input_tokens": 20,
                                         "keys": [k.hex() for k in trace.keys[1]]})
                             for i in range(2)) + "\n")
    logged = read_traces([log], block_tokens=8)
    assert logged.keys[0] == trace.keys[1] and logged.timestamps_s == [0.0, 1.5]
    assert infinite_bound(logged).hit_tokens == 20
    with pytest.raises(TraceError, match="fix --block-tokens"):
        read_traces([CONVERSATION], block_tokens=16, fmt=TraceFormat.MOONCAKE)


# -- the command line ----------------------------------------------------------------------------


def test_cli_report_and_plot(tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_text("\n".join(json.dumps({"timestamp": 1000 * i, "input_length": 1024,
                                           "hash_ids": [0, 1 + i % 3]})
                               for i in range(30)) + "\n")
    result = kvstore(str(trace), "--hbm", "3k", "--window", "10")
    assert result.returncode == 0, result.stderr
    assert "infinite-capacity bound" in result.stdout and "belady" in result.stdout
    result = kvstore(str(trace), "--hbm", "6MiB", "--model", "tiny", "--json")  # 6144 tokens
    doc = json.loads(result.stdout)
    assert doc["runs"][0]["capacity_tokens"]["hbm"] == 6 * 1024 * 1024 // 1024
    assert not result.stderr
    pytest.importorskip("matplotlib")
    png = tmp_path / "sweep.png"
    result = kvstore(str(trace), "--sweep", "1k,2k", "--plot", str(png))
    assert result.returncode == 0, result.stderr
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_cli_bad_input_exits_2_with_a_message(tmp_path):
    good = json.dumps({"timestamp": 0, "input_length": 600, "hash_ids": [0, 1]})
    trace = tmp_path / "bad.jsonl"
    trace.write_text(f"{good}\n{good}\n{{not json\n{good}\n")
    result = kvstore(str(trace), "--hbm", "3M")
    assert result.returncode == 2, result.stderr
    # The file's line, then the JSON parser's own position inside that line's record.
    assert f"{trace} line 3: not a mooncake trace line (not JSON: Expecting property name " \
        "enclosed in double quotes at line 1 column 2 of the record)" in result.stderr
    assert "Traceback" not in result.stderr and "usage:" not in result.stderr
    result = kvstore(str(trace), "--hbm", "3M", "--skip-bad", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["bad_lines_skipped"] == 1
    cases = {
        ("--hbm=-3M",): "negative",
        ("--hbm", "80GiB", "--model", "gpt-9"): "unknown --model",
        ("--hbm", "80GiB"): "--kv-bytes-per-token",
        ("--hbm", "3M", "--policy", "fifo"): "unknown --policy",
        ("--hbm", "3M", "--format", "csv"): "invalid choice",
        (): "give a capacity",
    }
    for args, message in cases.items():
        result = kvstore(str(trace), *args)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
    cut = tmp_path / "cut.jsonl"  # the second record ends early: the parser is on its line 2
    cut.write_text(f'{good}\n{{"timestamp": 0,\n')
    result = kvstore(str(cut), "--hbm", "3M")
    assert result.returncode == 2 and f"{cut} line 2: " in result.stderr
    assert "at line 2 column 1 of the record" in result.stderr
    missing = tmp_path / "missing-field.jsonl"  # valid JSON, not a Mooncake record
    missing.write_text(f'{good}\n{{"timestamp": 0, "hash_ids": [0]}}\n')
    result = kvstore(str(missing), "--hbm", "3M")
    assert result.returncode == 2, result.stderr
    assert f"{missing} line 2: not a mooncake trace line (missing field 'input_length')" \
        in result.stderr
    unknown = tmp_path / "other.jsonl"
    unknown.write_text('{"prompt": "hello"}\n')
    result = kvstore(str(unknown), "--hbm", "3M")
    assert result.returncode == 2 and "cannot tell the trace format" in result.stderr
    result = kvstore(str(tmp_path / "missing.jsonl"), "--hbm", "3M")
    assert result.returncode == 2 and "cannot read" in result.stderr

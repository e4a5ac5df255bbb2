"""`kvstore size`, run as a real subprocess."""

from __future__ import annotations

import json

from tests.cli.test_main import kvstore


def size(*args: str) -> dict:
    result = kvstore("size", "--json", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_llama3_70b_by_hand_and_by_name_agree_with_the_issue():
    by_hand = size("--layers", "80", "--kv-heads", "8", "--head-dim", "128",
                   "--tokens", "4096", "--link-gbps", "100", "--hbm", "80GiB")
    assert by_hand["bytes_per_token"] == 2 * 80 * 8 * 128 * 2 == 327_680
    assert by_hand["request_bytes"] == 1_342_177_280  # "1.34 GB for 4,096 tokens"
    assert by_hand["links"] == [{"gbps": 100.0, "transfer_s": 1_342_177_280 * 8 / 100e9}]
    assert by_hand["tiers"]["hbm"] == {"bytes": 80 * 2**30, "tokens": 262_144, "requests": 64}
    by_name = size("--model", "llama3-70b", "--tokens", "4096", "--link-gbps", "100",
                   "--hbm", "80GiB")
    assert by_name == by_hand
    text = kvstore("size", "--model", "llama3-70b").stdout
    assert "327,680" in text and "1.34 GB" in text


def test_dtype_and_block_size_change_the_arithmetic():
    fp8 = size("--model", "llama3-8b", "--dtype", "float8_e4m3fn", "--block-tokens", "32")
    assert fp8["bytes_per_token"] == 2 * 32 * 8 * 128
    assert fp8["block_bytes"] == 32 * fp8["bytes_per_token"]


def test_bad_input_exits_2_with_a_message():
    for args, message in ((["--model", "nope"], "unknown model"),
                          (["--layers", "80"], "all of --layers"),
                          (["--model", "llama3-8b", "--layers", "2"], "not both"),
                          (["--model", "llama3-8b", "--tokens", "0"], "--tokens"),
                          (["--model", "llama3-8b", "--dram", "lots"], "--dram"),
                          (["--model", "llama3-8b", "--link-gbps", "-1"], "--link-gbps")):
        result = kvstore("size", *args)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr

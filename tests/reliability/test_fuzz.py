"""Protocol fuzzing: thousands of seeded frames (`fuzz.Fuzzer`) against a real daemon. No
internal error, no hang, every whole frame answered or its connection hung up on; the
daemon stays up, a normal client's values stay exact, and its memory comes back."""

from __future__ import annotations

import gc
import time

import kvstore
from tests.reliability.fuzz import Fuzzer
from tests.reliability.harness import KiB, Verdicts, key_of, rss_bytes, value_of


def test_fuzzed_frames_break_nothing(tmp_path, start_daemon, scale):
    daemon = start_daemon("--dram", "16MiB", "--nvme-path", str(tmp_path / "nvme"), "--nvme",
                          "64MiB", "--max-value", "256KiB", "--frame-timeout", "1")
    witness = {i: value_of(i, 1, size) for i, size in
               enumerate([48, 4 * KiB, 64 * KiB, 200 * KiB, 256 * KiB] * 4)}
    with kvstore.connect(daemon.url, timeout_s=10) as client:
        for i, value in witness.items():
            assert client.put(key_of(i), value)
        rss_before = rss_bytes(daemon.proc.pid)
        fuzzer = Fuzzer(daemon.port, seed=2026, max_value_bytes=256 * KiB)
        report = fuzzer.run(max(500, round(3000 * scale)))
        assert daemon.proc.poll() is None, daemon.output()[-3000:]
        assert report.internal_errors == [], report.internal_errors[:5]
        assert report.hangs == [], report.hangs[:5]
        assert report.answers["ok"] > report.frames // 10, report.figures()
        assert len(report.answers) >= 8, report.figures()  # many kinds of refusal seen
        verdicts = Verdicts()
        for i, got in enumerate(client.get_many([key_of(i) for i in witness])):
            verdicts.judge(i, got, {1}, 1)
        assert verdicts.bad == 0, verdicts.examples
        gc.collect()
        time.sleep(1.5)  # connections the fuzzer cut short are dropped after the frame timeout
        rss_after = rss_bytes(daemon.proc.pid)
        assert rss_after - rss_before < 64 << 20, (rss_before, rss_after)

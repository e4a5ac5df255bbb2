"""SIGKILL of `kvstored` during a stream of puts, overwrites, deletes and flushes, then a
restart on the same NVMe directory, round after round: nothing acknowledged before a
completed flush is lost, and no read returns bytes other than a value written for its key
(`harness.CrashLoop` says exactly what each read may be)."""

from __future__ import annotations

from tests.reliability.harness import CrashLoop


def test_sigkill_rounds_lose_nothing_flushed_and_serve_nothing_foreign(tmp_path, start_daemon,
                                                                       scale):
    loop = CrashLoop(tmp_path, start=start_daemon, seed=15)
    loop.run(max(1, round(6 * scale)))
    figures = loop.figures()
    assert loop.verdicts.bad == 0, (figures, loop.verdicts.examples)
    assert figures["rounds"] >= 1 and figures["values_checked"] == 160 * figures["rounds"]
    assert loop.verdicts.exact == figures["values_checked"]

"""`kvstore hitrate --plot`: matplotlib checked before the replay, a sweep plot that reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kvstore.placement.rules import EvictionPolicy
from tests.sim.test_replay import REPO, kvstore


def write_trace(path):
    path.write_text("\n".join(json.dumps({"timestamp": 1000 * i, "input_length": 1024,
                                          "hash_ids": [0, 1 + i % 5]})
                              for i in range(60)) + "\n")
    return path


def test_plot_without_matplotlib_fails_before_the_replay(tmp_path):
    hidden = tmp_path / "no-matplotlib"  # first on the path: `import matplotlib` fails
    hidden.mkdir()
    (hidden / "matplotlib.py").write_text(
        "raise ImportError(\"No module named 'matplotlib' (hidden by the test)\")\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(hidden), str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    trace, png = write_trace(tmp_path / "t.jsonl"), tmp_path / "sweep.png"
    result = subprocess.run([sys.executable, "-m", "kvstore.cli", "hitrate", str(trace),
                             "--sweep", "1k,2k", "--plot", str(png)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "--plot needs matplotlib" in result.stderr
    assert "pip install 'kvstore[plot]'" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""  # the report follows the replay: none was run
    assert not png.exists()


@pytest.mark.parametrize("extra", [(), ("--model", "tiny")])
def test_sweep_plot_has_a_title_units_and_every_line_visible(tmp_path, extra):
    pytest.importorskip("matplotlib")
    from kvstore.cli.hitrate import sweep_figure

    trace, png = write_trace(tmp_path / "t.jsonl"), tmp_path / "sweep.png"
    result = kvstore(str(trace), "--sweep", "1k,2k,3k", "--plot", str(png), *extra)
    assert result.returncode == 0, result.stderr
    assert png.read_bytes()[:4] == b"\x89PNG"
    doc = json.loads(kvstore(str(trace), "--sweep", "1k,2k,3k", "--json").stdout)
    bytes_per_token = 1024 if extra else None  # the tiny preset's KV bytes per token
    fig = sweep_figure(doc, list(EvictionPolicy), "t.jsonl", bytes_per_token)
    ax = fig.axes[0]
    assert ax.get_title() == "Hit rate by cache size: t.jsonl (60 requests, 512-token blocks)"
    assert ax.get_xlabel() == "total cache capacity (tokens)"
    assert ax.get_ylabel() == "prefix hit rate (% of input tokens)"
    [top] = ax.child_axes
    assert top.get_xlabel() == ("KV bytes (MiB, at 1,024 bytes per token)" if extra
                                else "capacity (blocks of 512 tokens)")
    assert [t.get_text() for t in ax.xaxis.get_ticklabels()] == ["1k", "2k", "3k"]
    assert [t.get_text() for t in top.xaxis.get_ticklabels()] == (
        ["0.98", "2", "2.9"] if extra else ["1", "3", "5"])  # MiB; blocks (1k // 512 is 1)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["leaf-lru", "lru", "belady (optimal)", "infinite capacity"]
    lines = {line.get_label(): line for line in ax.get_lines()}
    styles = {(line.get_linestyle(), line.get_marker()) for line in lines.values()}
    assert len(styles) == len(lines) == 4
    # Where leaf-first LRU and LRU coincide (they do on this trace), LRU is drawn over it,
    # dashed and narrower, so both show.
    leaf, lru = lines["leaf-lru"], lines["lru"]
    assert list(leaf.get_ydata()) == list(lru.get_ydata())
    assert lru.get_zorder() > leaf.get_zorder()
    assert lru.get_linewidth() < leaf.get_linewidth() and lru.get_linestyle() == "--"

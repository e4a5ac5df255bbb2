"""`kvstore hitrate --plot`: matplotlib is checked before the replay."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.test_hitrate import REPO


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


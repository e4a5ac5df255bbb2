"""`kvstore serve` in a subprocess, for the tests and `benchmarks/serve_bench.py`."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


class ServeProcess:
    """``python -m engines.serving --port PORT FLAGS...``, its output in ``log``; up once
    its /health answers 200 (`RuntimeError` if it exits or takes past ``timeout_s``)."""

    def __init__(self, port: int, log: Path, *flags: str, timeout_s: float = 300) -> None:
        self.port = port
        self.log = log
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "engines.serving", "--port",
                                      str(port), *flags], cwd=REPO, stdout=log.open("w"),
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kvstore serve exited: {log.read_text()[-3000:]}")
            try:
                if self.get("/health")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"kvstore serve did not start: {log.read_text()[-3000:]}")
            time.sleep(0.5)

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as answer:
                return answer.status, answer.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

"""The standing reliability suite (marker ``reliability``): faults, crashes and hostile
clients against real daemons, disks and sockets.

Sizes are CI's by default (the whole suite in a couple of minutes); ``--reliability-scale
N`` (or KVSTORE_RELIABILITY_SCALE=N) multiplies rounds and frames, and
`benchmarks/reliability_bench.py` runs the long version and prints its figures as JSON.
"""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/reliability/" in item.nodeid.replace("\\", "/"):
            item.add_marker(pytest.mark.reliability)


@pytest.fixture(scope="session")
def scale(request: pytest.FixtureRequest) -> float:
    """How much longer than CI's run to go (1 = CI)."""
    value = request.config.getoption("--reliability-scale", None)
    return float(value or os.environ.get("KVSTORE_RELIABILITY_SCALE", "1"))


from tests.daemon.conftest import start_daemon  # noqa: E402,F401  (the daemons' fixture)

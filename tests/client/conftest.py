"""The client's tests run against real `kvstored` subprocesses: the daemon tests' fixtures."""

from tests.daemon.conftest import shared_daemon, start_daemon  # noqa: F401

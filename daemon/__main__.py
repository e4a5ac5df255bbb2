from daemon.startup import StopSignals

# First: from here on SIGTERM and SIGINT stop the start-up cleanly (daemon.startup); the
# imports below take a while.
signals = StopSignals()

from daemon.cli import main  # noqa: E402

raise SystemExit(main(signals=signals))

"""`kvstore serve`: an OpenAI-compatible HTTP front door over the conductor and its engines.

    command.py   the CLI's flags (light: no torch for --help)
    server.py    start-up: model, store, engines, conductor, then uvicorn
    api.py       the HTTP API (FastAPI): completions, chat, models, health, metrics
    backend.py   one request's text as it is produced, stop strings, cancellation
    metrics.py   Prometheus metrics
"""

"""The wire between `kvstored` and its clients, shared by both sides (docs/PROTOCOL.md).

- `frames`: the 16-byte header, the msgpack meta, encoding and validating a frame.
- `ops`: the operations a request may name and the fields each needs (`check_request`).
- `error_codes`: the codes of a failed answer and the exception each becomes.
- `doorbell`: the 32-byte commit messages of the same-host doorbell.
- `ucx`: frames carried as UCX tag messages (`UcxStream`, the optional ucxx extra).
"""

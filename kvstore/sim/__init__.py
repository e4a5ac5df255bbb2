"""The hit-rate simulator: request traces (`traces`) replayed through the placement core
with no bytes stored, beside Belady's and the infinite-capacity bounds (`replay`)."""

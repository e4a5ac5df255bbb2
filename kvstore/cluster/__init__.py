"""Many kvstored nodes as one pool on Redis (issue 17; being built): the pool's block index
(`index`). Nodes and their liveness are the daemon's registry (`daemon.registry`)."""

"""kvstored: the standalone daemon serving one kvstore.Store to many processes and hosts."""

"""KV-cache bookkeeping: block hashes, the block pool with its prefix-cache index, and per-request
block tables. Pure Python: no torch."""

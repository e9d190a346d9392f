"""The worker role: one engine (model + paged KV cache) fed from its own queue."""

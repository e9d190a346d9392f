"""The engine core (model, KV cache, batcher and runner, stepped synchronously), its asyncio
wrapper with its one output path (the step sink, and per-request streams built on it), the
simulated core, and what a core reports (capacity, counters)."""

"""The engine core (model, KV cache, batcher and runner, stepped synchronously), its asyncio
wrapper, the simulated core, and the client protocol front ends use."""

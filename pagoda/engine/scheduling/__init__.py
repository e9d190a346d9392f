"""Step scheduling: the batcher that picks which requests run each step and how many tokens each
computes, and the engine's request (counters, not phases)."""

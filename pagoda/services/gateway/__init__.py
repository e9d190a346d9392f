"""The gateway role: the OpenAI HTTP API (FastAPI), validation, auth, limits, SSE streaming, and
its side of the bus (requests out to the tokenizer tier, token deltas back)."""

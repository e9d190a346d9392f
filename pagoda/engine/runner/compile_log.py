"""What a server's log says of its compiled decode graphs (compile_cache.py writes these lines),
read back by `pagoda bench serve --launch`, which waits for a first start's background compile so
that it measures the steps every later start serves. No torch here: the bench imports it."""

EAGER_UNTIL_COMPILED = "decode steps: eager until a background compile"
COMPILED_NOW = "compiled graphs now"
STAYS_EAGER = "decode steps stay eager"

"""Request fields pagoda cannot honour yet. Each is refused with a 400 that names it: ignored, a
client that asked for a function call would get prose. Unknown fields that change nothing stay
accepted, as OpenAI does. (Structured outputs: gateway/structured.py.)"""

from __future__ import annotations

from pagoda.services.gateway.protocol import ChatCompletionRequest, CompletionRequest

_OTHERS = ("functions", "function_call", "prompt_logprobs")
# every top-level field that may be refused (with some values)
FIELDS = ("tools", "tool_choice", *_OTHERS, "best_of", "suffix")


def refused_field(req: ChatCompletionRequest | CompletionRequest) -> tuple[str, str] | None:
    """(field, why) for the first field `req` sets that pagoda cannot honour yet, else None."""
    if isinstance(req, CompletionRequest):
        if req.best_of is not None and req.best_of != req.n:
            return "best_of", f"best_of {req.best_of} (other than n) is not supported yet"
        if req.suffix:
            return "suffix", "suffix (insertion) is not supported"
        if req.tools:  # chat completions take them (gateway/tools.py)
            return "tools", "tools are not supported in text completions; use chat completions"
        if req.tool_choice not in (None, "none"):
            return "tool_choice", "tool_choice is not supported in text completions; use chat completions"
    for name in _OTHERS:
        if getattr(req, name) is not None:
            return name, f"{name} is not supported yet"
    return None

"""Request fields pagoda cannot honour yet. Each is refused with a 400 that names it: ignored, a
client that asked for a tool call would get prose. Unknown fields that change nothing stay
accepted, as OpenAI does. (Structured outputs: gateway/structured.py.)"""

from __future__ import annotations

from pagoda.services.gateway.protocol import ChatCompletionRequest, CompletionRequest

_OTHERS = ("functions", "function_call", "prompt_logprobs")
# every top-level field that may be refused (with some values); messages may carry tool_calls
FIELDS = ("tools", "tool_choice", *_OTHERS, "best_of", "suffix")


def refused_field(req: ChatCompletionRequest | CompletionRequest) -> tuple[str, str] | None:
    """(field, why) for the first field `req` sets that pagoda cannot honour yet, else None."""
    if isinstance(req, ChatCompletionRequest) and any(m.tool_calls for m in req.messages):
        return "messages", "assistant messages with tool_calls are not supported yet"
    if isinstance(req, CompletionRequest):
        if req.best_of is not None and req.best_of != req.n:
            return "best_of", f"best_of {req.best_of} (other than n) is not supported yet"
        if req.suffix:
            return "suffix", "suffix (insertion) is not supported"
    if req.tools:
        return "tools", "tools (function calling) are not supported yet"
    if req.tool_choice not in (None, "none"):
        return "tool_choice", "tool_choice is not supported yet (only 'none')"
    for name in _OTHERS:
        if getattr(req, name) is not None:
            return name, f"{name} is not supported yet"
    return None

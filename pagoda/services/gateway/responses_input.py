"""A Responses API request as the chat completion that runs it.

/v1/responses has no generation path of its own: its `input` items become chat messages, its
flat function tools the chat API's nested ones, `text.format` a `response_format`, and the chat
path (tool plan, chat template, structured outputs, limits, admission) does the rest. What that
path cannot honour is refused here with a 400 naming the field: built-in tools, image and file
inputs, background runs, `include`, reasoning effort, and the like.

A conversation kept for `previous_response_id` is stored as chat messages (gateway/responses.py)
and goes before the new input; the previous response's `instructions` do not carry over, as in
OpenAI's API.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from pagoda.services.gateway.protocol import ChatCompletionRequest
from pagoda.services.gateway.responses_protocol import ResponsesRequest
from pagoda.services.transport.errors import APIError, bad_request, validation_message

# The chat request's field names in its 400s, as the Responses request names them.
PARAMS = {
    "max_tokens": "max_output_tokens",
    "max_completion_tokens": "max_output_tokens",
    "response_format": "text.format",
    "messages": "input",
}
_ROLES = ("user", "system", "developer", "assistant")
_TEXT_PARTS = ("input_text", "output_text", "text", "refusal")


def refused_field(req: ResponsesRequest) -> tuple[str, str] | None:
    """(field, why) for the first field `req` sets that pagoda cannot honour, else None."""
    effort = (req.reasoning or {}).get("effort")
    checks = [
        (req.background, "background", "background responses are not supported; stream the response instead"),
        (
            req.include,
            "include",
            "include is not supported (no logprobs, encrypted reasoning or tool sources)",
        ),
        (effort is not None, "reasoning.effort", "reasoning.effort cannot be honoured by pagoda's models"),
        ((req.reasoning or {}).get("summary"), "reasoning.summary", "reasoning summaries are not supported"),
        (req.truncation not in (None, "disabled"), "truncation", "truncation 'auto' is not supported"),
        (
            req.conversation is not None,
            "conversation",
            "conversations are not supported; use previous_response_id",
        ),
        (req.prompt is not None, "prompt", "prompt templates are not supported"),
        (req.max_tool_calls is not None, "max_tool_calls", "max_tool_calls is not supported"),
        (req.top_logprobs, "top_logprobs", "logprobs are not supported in the Responses API yet"),
    ]
    for asked, name, why in checks:
        if asked:
            return name, why
    return None


def chat_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Responses' flat function tools (`{type, name, description, parameters, strict}`) in the
    chat API's shape; a built-in tool (web_search, file_search, ...) is a 400."""
    out = []
    for i, tool in enumerate(tools):
        kind = tool.get("type")
        if kind != "function":
            raise bad_request(
                f"tools[{i}] is of type {kind!r}: pagoda runs no built-in tools; only function tools "
                "({'type': 'function', 'name': ..., 'parameters': ...}) are supported.",
                "tools",
            )
        if not isinstance(tool.get("name"), str):
            raise bad_request(f"tools[{i}] needs a string name.", "tools")
        fn = {k: tool[k] for k in ("name", "description", "parameters", "strict") if tool.get(k) is not None}
        out.append({"type": "function", "function": fn})
    return out


def chat_tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    """`{"type": "function", "name": ...}` as the chat API's `{"type": "function", "function":
    {"name": ...}}`; other objects (built-in tools, allowed_tools) are 400s."""
    if choice is None or isinstance(choice, str):
        return choice
    if choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise bad_request(
        "tool_choice must be 'none', 'auto', 'required' or {\"type\": \"function\", \"name\": ...}.",
        "tool_choice",
    )


def response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    """`text.format` as the chat API's `response_format` (None: free text)."""
    fmt = (text or {}).get("format")
    if fmt is not None and not isinstance(fmt, dict):
        raise bad_request("text.format must be an object with a type.", "text.format")
    if fmt is None or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_object":
        return {"type": "json_object"}
    if fmt.get("type") == "json_schema":
        if "schema" not in fmt:
            raise bad_request("text.format json_schema needs a schema.", "text.format")
        spec = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        return {"type": "json_schema", "json_schema": spec}
    raise bad_request(
        f"text.format type {fmt.get('type')!r} is not supported (text, json_object or json_schema).",
        "text.format",
    )


def input_messages(items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chat messages of `input`: a string is one user message; message items keep their
    role; a `function_call` joins the assistant message before it (or starts one) as a tool
    call, and a `function_call_output` is the tool's message. Reasoning items passed back are
    dropped, as chat templates drop earlier turns' reasoning."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in _ROLES:
                raise bad_request(
                    f"input[{i}].role must be one of {', '.join(_ROLES)}, got {role!r}.", "input"
                )
            messages.append({"role": role, "content": _text(item.get("content"), f"input[{i}].content")})
        elif kind == "function_call":
            call = {
                "id": _field(item, "call_id", i),
                "type": "function",
                "function": {"name": _field(item, "name", i), "arguments": _field(item, "arguments", i)},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = _text(item.get("output"), f"input[{i}].output")
            messages.append({"role": "tool", "tool_call_id": _field(item, "call_id", i), "content": output})
        elif kind != "reasoning":
            raise bad_request(
                f"input[{i}] is of type {kind!r}; pagoda takes message, function_call, function_call_output "
                "and reasoning items.",
                "input",
            )
    return messages


def _field(item: dict[str, Any], name: str, i: int) -> str:
    value = item.get(name)
    if not isinstance(value, str):
        raise bad_request(f"input[{i}] ({item.get('type')}) needs a string {name}.", "input")
    return value


def _text(content: Any, where: str) -> str:
    """A message's content as one string: a string, or text parts joined by newlines. An image,
    file or audio part is a 400 (pagoda serves text-only models)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"{where} must be a string or a list of content parts.", "input")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        text = part.get(kind) if kind == "refusal" else part.get("text") if isinstance(part, dict) else None
        if kind not in _TEXT_PARTS or not isinstance(text, str):
            raise bad_request(
                f"{where}[{j}] is of type {kind!r}: only text parts (input_text, output_text) are supported; "
                "pagoda serves text-only models.",
                "input",
            )
        texts.append(text)
    return "\n".join(texts)


def chat_request(req: ResponsesRequest, messages: list[dict[str, Any]]) -> ChatCompletionRequest:
    """The chat completion that runs `req` on `messages` (the stored conversation of
    `previous_response_id`, then `input_messages(req.input)`), its instructions first."""
    refused = refused_field(req)
    if refused is not None:
        param, why = refused
        raise bad_request(f"{why}; remove {param} from the request.", param)
    system = [{"role": "system", "content": req.instructions}] if req.instructions else []
    body = {
        "model": req.model,
        "messages": [*system, *messages],
        "max_completion_tokens": req.max_output_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "seed": req.seed,
        "user": req.user,
        "priority": req.priority,
        "cache_salt": req.cache_salt,
        "tools": chat_tools(req.tools) if req.tools else None,
        "tool_choice": chat_tool_choice(req.tool_choice),
        "parallel_tool_calls": req.parallel_tool_calls,
        "response_format": response_format(req.text),
    }
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as err:
        message, field = validation_message([dict(e) for e in err.errors()])
        raise bad_request(message, renamed(field)) from None


def renamed(param: str | None) -> str | None:
    """A chat request's field (`messages.2.content`) as the Responses request names it (`input`)."""
    if param is None:
        return None
    head = param.split(".", 1)[0]
    return PARAMS.get(head, param)


# chat fields a 400's message may name, as the Responses request names them (longest first)
_IN_MESSAGES = {
    "response_format.json_schema.schema": "text.format.schema",
    "response_format": "text.format",
    "max_completion_tokens": "max_output_tokens",
    "max_tokens": "max_output_tokens",
}


def rename_param(err: APIError) -> APIError:
    """`err` naming the Responses request's field, in `param` and in its message."""
    if err.param is not None and err.param.split(".", 1)[0] in PARAMS:
        for chat, ours in _IN_MESSAGES.items():
            err.message = err.message.replace(chat, ours)
        err.param = renamed(err.param)
    return err


def assistant_message(content: str | None, calls: list[dict[str, Any]]) -> dict[str, Any]:
    """The chat message of an answer, as a stored conversation keeps it (reasoning left out)."""
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = calls
    return message


def arguments_text(args: Any) -> str:
    return args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)

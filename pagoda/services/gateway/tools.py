"""Tool calling in chat completions: `tools` with `tool_choice` `required`, a named function, or
`auto` (with `--enable-auto-tool-choice --tool-call-parser hermes`).

- A named function constrains the answer to its arguments (a JSON object of its `parameters`, with
  structured outputs, so they always parse against it); the response carries one tool call and
  finishes with "stop", as OpenAI's does.
- `required` constrains it to a JSON array of calls, `[{"name": ..., "arguments": {...}}, ...]`,
  one of `anyOf` the tools each (one call only with `parallel_tool_calls: false`); the response
  carries them and finishes with "tool_calls".
- `auto` leaves the answer free and reads the calls the model writes in it, as `<tool_call>{...}
  </tool_call>` blocks (the Hermes format); text around them is the content. Without a parser it
  is a 400 that says how to start the server. `none` leaves the answer free.

Messages of a tool round trip (assistant `tool_calls`, `tool` results) go through the chat
template. A template that knows tools gets them as they are (and `tools=`); for one that does not
(the demo model's renders role and content only) pagoda writes them into the messages in the
Hermes format, which `auto` then reads back.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pagoda.engine import StructuredOutputsParams
from pagoda.services.gateway.protocol import ChatCompletionRequest, ChatMessage
from pagoda.services.gateway.tool_parsers import get_parser
from pagoda.services.transport.errors import bad_request

TOOLS_PROMPT = (
    "You can call functions. Their definitions, one JSON object a line:\n<tools>\n{tools}\n</tools>\n"
    "To call one, answer with a JSON object of its name and arguments between tags:\n"
    '<tool_call>\n{{"name": <function name>, "arguments": <arguments as a JSON object>}}\n</tool_call>'
)


@dataclass(frozen=True)
class ToolPlan:
    """How a request's answer becomes tool calls."""

    mode: Literal["named", "required", "auto"]
    functions: dict[str, dict[str, Any]]  # name -> its parameters' JSON schema
    tools: list[dict[str, Any]]  # the request's tool definitions, as sent
    name: str | None = None  # the named function
    parallel: bool = True
    parser: str = "hermes"  # auto: how the model writes its calls (gateway/tool_parsers.py)

    @property
    def finish_reason(self) -> str:
        return "stop" if self.mode == "named" else "tool_calls"

    def held_from(self, text: str) -> int:
        """Where streamed content must stop for now (auto): where a call starts or may start."""
        return get_parser(self.parser).held_from(text)

    def constraint(self) -> StructuredOutputsParams | None:
        """What the answer must match (None for auto: free text the parser reads)."""
        if self.mode == "auto":
            return None
        if self.mode == "named":
            assert self.name is not None
            return StructuredOutputsParams(json=self.functions[self.name])
        calls = [
            {
                "type": "object",
                "properties": {"name": {"const": name}, "arguments": params},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for name, params in self.functions.items()
        ]
        schema: dict[str, Any] = {"type": "array", "items": {"anyOf": calls}, "minItems": 1}
        if not self.parallel:
            schema["maxItems"] = 1
        return StructuredOutputsParams(json=schema)

    def answer(self, text: str, reasoning: str = "") -> tuple[str | None, list[dict[str, Any]] | None]:
        """(content, OpenAI's `tool_calls`) of a finished answer. An answer that does not parse
        (cut short by max_tokens or a stop string; for auto, one without calls) is content.
        `reasoning`: the answer's reasoning (--reasoning-parser), whose calls are taken when the
        content has none (a model that calls from inside its thinking), so none is lost."""
        if self.mode == "auto":
            parser = get_parser(self.parser)
            content, pairs = parser.calls(text, self.functions)
            if not pairs and reasoning:
                pairs = parser.calls(reasoning, self.functions)[1]
                content = text
            return (content or None, _openai_calls(pairs)) if pairs else (text, None)
        try:
            value = json.loads(text)
        except ValueError:
            return text, None
        if self.mode == "named":
            return None, _openai_calls([(self.name or "", value)])
        if isinstance(value, list) and all(isinstance(v, dict) and "name" in v for v in value):
            return None, _openai_calls([(v["name"], v.get("arguments", {})) for v in value])
        return text, None


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _openai_calls(pairs: list[tuple[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "id": new_call_id(),
            "type": "function",
            "function": {
                "name": name,
                "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False),
            },
        }
        for name, args in pairs
    ]


def tool_plan(req: ChatCompletionRequest, parser: str | None = None) -> ToolPlan | None:
    """The request's plan for tool calls (None: a free answer); 400s naming the field. `parser`:
    the server's --tool-call-parser (with --enable-auto-tool-choice), which `auto` needs; one whose
    markers are special tokens turns the request's `skip_special_tokens` off (as vLLM does)."""
    functions = _functions(req.tools or [])
    choice = req.tool_choice
    if not functions:
        if choice not in (None, "none"):
            raise bad_request("tool_choice needs tools.", "tool_choice")
        return None
    if choice == "none":
        return None
    if req.logprobs:
        raise bad_request("logprobs with tool calls are not supported yet.", "logprobs")
    parallel = req.parallel_tool_calls is not False
    tools = list(req.tools or [])
    if choice is None or choice == "auto":
        if parser is None:
            raise bad_request(
                "tool_choice 'auto' (the default with tools) needs a server started with "
                "--enable-auto-tool-choice --tool-call-parser hermes; or use tool_choice 'required', "
                "name a function, or 'none'.",
                "tool_choice",
            )
        if get_parser(parser).keeps_special_tokens:
            req.skip_special_tokens = False
        return ToolPlan("auto", functions, tools, parallel=parallel, parser=parser)
    if choice == "required":
        return ToolPlan("required", functions, tools, parallel=parallel)
    fn = choice.get("function") if isinstance(choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(name, str):
        raise bad_request(
            "tool_choice must be 'none', 'auto', 'required' or {\"type\": \"function\", "
            '"function": {"name": ...}}.',
            "tool_choice",
        )
    if name not in functions:
        raise bad_request(f"tool_choice names {name!r}, which is not among the tools.", "tool_choice")
    return ToolPlan("named", functions, tools, name=name, parallel=parallel)


def _functions(tools: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    import jsonschema  # here: a gateway needs it only once tools come (startup and --help stay fast)
    from jsonschema.exceptions import SchemaError

    functions: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or tool.get("type") != "function" or not isinstance(fn.get("name"), str):
            raise bad_request(
                f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ...}}}}.", "tools"
            )
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise bad_request(f"tools[{i}].function.parameters must be a JSON Schema object.", "tools")
        try:
            jsonschema.validators.validator_for(params).check_schema(params)
        except SchemaError as err:
            why = f"tools[{i}].function.parameters is not a valid JSON Schema: {err.message}"
            raise bad_request(why, "tools") from None
        functions[fn["name"]] = params
    return functions


def template_messages(
    req: ChatCompletionRequest, plan: ToolPlan | None, template_knows_tools: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The messages for the chat template, and the `tools` it is given (None: written into the
    messages, or no tools)."""
    _check_calls(req)
    if template_knows_tools:
        messages = [_as_is(m) for m in req.messages]
        return messages, (plan.tools if plan else None)
    messages = [_written(m) for m in req.messages]
    if plan is not None:
        lines = "\n".join(json.dumps(t, ensure_ascii=False) for t in plan.tools)
        prompt = TOOLS_PROMPT.format(tools=lines)
        if messages and messages[0]["role"] == "system":
            messages[0] = {"role": "system", "content": f"{messages[0]['content']}\n\n{prompt}"}
        else:
            messages.insert(0, {"role": "system", "content": prompt})
    return messages, None


def _check_calls(req: ChatCompletionRequest) -> None:
    """An assistant message's `tool_calls` are OpenAI-shaped: each a `function` with a string name."""
    for i, m in enumerate(req.messages):
        for call in m.tool_calls or []:
            fn = call.get("function")
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise bad_request(
                    'each tool call needs a "function" object with a "name" string and "arguments".',
                    f"messages[{i}].tool_calls",
                )


def _role(role: str) -> str:
    return "system" if role == "developer" else role  # templates rarely know "developer"


def _as_is(m: ChatMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"role": _role(m.role), "content": m.text()}
    if m.tool_calls:
        out["tool_calls"] = m.tool_calls
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    return out


def _written(m: ChatMessage) -> dict[str, Any]:
    """A message of a tool round trip in the default format, for a template without tools."""
    if m.role == "tool":
        return {"role": "user", "content": f"<tool_response>\n{m.text()}\n</tool_response>"}
    text = m.text()
    for call in m.tool_calls or []:
        fn = call["function"]  # checked by _check_calls
        args = fn.get("arguments", "{}")
        try:
            args = json.loads(args) if isinstance(args, str) else args
        except ValueError:
            pass  # shown as the string it is
        body = json.dumps({"name": fn.get("name"), "arguments": args}, ensure_ascii=False)
        text = f"{text}\n<tool_call>\n{body}\n</tool_call>".lstrip("\n")
    return {"role": _role(m.role), "content": text}

"""Reading tool calls out of a model's free text (`tool_choice: auto`, `--tool-call-parser`).

Each model family writes its calls its own way; a parser knows one way:

- `hermes`: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks among the text
  (Hermes, Qwen 2.5/3, and what pagoda writes for chat templates without tools);
- `llama3_json`: the whole answer is `{"name": ..., "parameters": {...}}`, several joined by `; `,
  after an optional `<|python_tag|>` (Llama 3.1-3.3);
- `mistral`: `[TOOL_CALLS]` then a JSON list of `{"name", "arguments"}`, or `name[ARGS]{...}` per
  call (newer tokenizers);
- `granite`: `<|tool_call|>` (or `<tool_call>`) then a JSON list of `{"name", "arguments"}`;
- `qwen3_xml`: `<tool_call><function=NAME><parameter=KEY>value</parameter>...</function>
  </tool_call>` (Qwen3-Coder); values are read as the tool's schema types them;
- `pythonic`: the whole answer is a Python list of calls, `[get_weather(city="Paris"), ...]`
  (Llama 3.2/4 pythonic templates).

`calls(text)` gives the text without its calls (the content) and the calls as (name, arguments);
text that does not parse stays content, so nothing is lost. `held_from(text)` says where content
must stop while an answer streams: where a call starts, or may be starting, is held back until
the answer ends (calls go out whole, at the end). Parsers whose markers are special tokens
(`keeps_special_tokens`) need them left in the text: a request with such a parser detokenizes
with `skip_special_tokens` off, as vLLM does.
"""

from __future__ import annotations

import ast
import json
import re
from abc import ABC, abstractmethod
from typing import Any, ClassVar

Calls = list[tuple[str, Any]]  # (function name, arguments: a JSON value or a JSON string)
_DECODER = json.JSONDecoder()


def partial_tag_at(text: str, tag: str, start: int = 0) -> int:
    """Where a tail of `text[start:]` that may still grow into `tag` begins; len(text) if none does
    (a stream holds such a tail back until more text comes)."""
    for n in range(min(len(tag) - 1, len(text) - start), 0, -1):
        if tag.startswith(text[-n:]):
            return len(text) - n
    return len(text)


def held_at_tag(text: str, tag: str) -> int:
    """Where streamed content stops for a call that starts with `tag`: at the tag, or at a tail
    that may become it."""
    start = text.find(tag)
    return start if start >= 0 else partial_tag_at(text, tag)


class ToolCallParser(ABC):
    name: ClassVar[str]
    keeps_special_tokens: ClassVar[bool] = False

    @abstractmethod
    def calls(self, text: str, functions: dict[str, dict[str, Any]]) -> tuple[str, Calls]:
        """(content, calls) of a finished answer; `functions`: name -> parameters' JSON schema."""

    @abstractmethod
    def held_from(self, text: str) -> int:
        """Where the content streamed so far must stop for now."""


_PARSERS: dict[str, type[ToolCallParser]] = {}


def _register(cls: type[ToolCallParser]) -> type[ToolCallParser]:
    _PARSERS[cls.name] = cls
    return cls


def get_parser(name: str) -> ToolCallParser:
    return _PARSERS[name]()


def _named(value: Any, args_key: str = "arguments") -> tuple[str, Any] | None:
    """(name, arguments) of a call object, or None when it is not one."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    args = value.get(args_key, value.get("arguments", {}))
    return value["name"], {} if args is None else args


def _json_list(text: str, args_key: str = "arguments") -> Calls | None:
    """The calls of a JSON list (or one object) of call objects; None if `text` is not one."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    items = value if isinstance(value, list) else [value]
    calls = [_named(v, args_key) for v in items]
    return None if not calls or any(c is None for c in calls) else [c for c in calls if c is not None]


@_register
class HermesParser(ToolCallParser):
    name = "hermes"
    BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)

    def calls(self, text: str, functions: dict[str, dict[str, Any]]) -> tuple[str, Calls]:
        calls: Calls = []

        def take(match: re.Match[str]) -> str:
            try:
                call = _named(json.loads(match.group(1)))
            except ValueError:
                call = None
            if call is None:
                return match.group(0)  # a block that does not parse stays in the text
            calls.append(call)
            return ""

        return self.BLOCK.sub(take, text).rstrip(), calls  # the start kept: what streamed stays a prefix

    def held_from(self, text: str) -> int:
        return held_at_tag(text, "<tool_call>")


class _WholeAnswerParser(ToolCallParser):
    """Formats whose calls are the whole answer: content streams once the answer's start shows
    it cannot be one (it does not open with `openers`)."""

    openers: ClassVar[tuple[str, ...]]

    def held_from(self, text: str) -> int:
        head = text.lstrip()
        if not head or any(head.startswith(o) or o.startswith(head) for o in self.openers):
            return 0
        return len(text)


@_register
class Llama3JsonParser(_WholeAnswerParser):
    name = "llama3_json"
    keeps_special_tokens = True
    TAG = "<|python_tag|>"
    openers = (TAG, "{")

    def calls(self, text: str, functions: dict[str, dict[str, Any]]) -> tuple[str, Calls]:
        body = text.strip().removeprefix(self.TAG).lstrip()
        calls: Calls = []
        pos = 0
        while pos < len(body):
            try:
                value, pos = _DECODER.raw_decode(body, pos)
            except ValueError:
                return text, []
            call = _named(value, "parameters")
            if call is None:
                return text, []
            calls.append(call)
            while pos < len(body) and body[pos] in "; \n\t":
                pos += 1
        return ("", calls) if calls else (text, [])


@_register
class MistralParser(ToolCallParser):
    name = "mistral"
    keeps_special_tokens = True
    TAG, ARGS = "[TOOL_CALLS]", "[ARGS]"

    def calls(self, text: str, functions: dict[str, dict[str, Any]]) -> tuple[str, Calls]:
        start = text.find(self.TAG)
        if start < 0:
            return text, []
        calls: Calls = []
        for part in text[start:].split(self.TAG)[1:]:
            part = part.strip()
            if self.ARGS in part:  # name[ARGS]{...}
                name, _, args = part.partition(self.ARGS)
                try:
                    calls.append((name.strip(), json.loads(args)))
                except ValueError:
                    return text, []
            else:
                listed = _json_list(part)
                if listed is None:
                    return text, []
                calls += listed
        return text[:start].rstrip(), calls

    def held_from(self, text: str) -> int:
        return held_at_tag(text, self.TAG)


@_register
class GraniteParser(_WholeAnswerParser):
    name = "granite"
    keeps_special_tokens = True
    TAGS = ("<|tool_call|>", "<tool_call>")
    openers = (*TAGS, "[")

    def calls(self, text: str, functions: dict[str, dict[str, Any]]) -> tuple[str, Calls]:
        body = text.strip()
        for tag in self.TAGS:
            body = body.removeprefix(tag).lstrip()
        listed = _json_list(body) if body.startswith("[") else None
        return ("", listed) if listed else (text, [])


@_register
class Qwen3XmlParser(ToolCallParser):
    name = "qwen3_xml"
    BLOCK = re.compile(r"<tool_call>\s*<function=([^>\s]+)>(.*?)</function>\s*</tool_call>", re.DOTALL)
    PARAM = re.compile(r"<parameter=([^>\s]+)>\n?(.*?)\n?</parameter>", re.DOTALL)

    def calls(self, text: str, functions: dict[str, dict[str, Any]]) -> tuple[str, Calls]:
        calls: Calls = []

        def take(match: re.Match[str]) -> str:
            name = match.group(1)
            props = functions.get(name, {}).get("properties", {})
            args = {k: _typed(v, props.get(k, {})) for k, v in self.PARAM.findall(match.group(2))}
            calls.append((name, args))
            return ""

        return self.BLOCK.sub(take, text).rstrip(), calls

    def held_from(self, text: str) -> int:
        return held_at_tag(text, "<tool_call>")


def _typed(value: str, schema: dict[str, Any]) -> Any:
    """A qwen3_xml parameter's text as its schema's type: strings stay text; numbers, booleans,
    objects and arrays are read as JSON (text that does not read so stays text)."""
    kind = schema.get("type")
    if kind == "string" or (kind is None and "enum" not in schema):
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


@_register
class PythonicParser(_WholeAnswerParser):
    name = "pythonic"
    openers = ("[",)

    def calls(self, text: str, functions: dict[str, dict[str, Any]]) -> tuple[str, Calls]:
        body = text.strip().removeprefix("<|python_start|>").removesuffix("<|python_end|>").strip()
        try:
            tree = ast.parse(body, mode="eval").body
        except SyntaxError:
            return text, []
        if not isinstance(tree, ast.List) or not tree.elts:
            return text, []
        calls: Calls = []
        for node in tree.elts:
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
                return text, []
            try:
                args = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg is not None}
            except ValueError:
                return text, []
            calls.append((node.func.id, args))
        return "", calls


PARSERS: tuple[str, ...] = tuple(_PARSERS)  # --tool-call-parser

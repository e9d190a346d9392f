"""Tool calling at the gateway: what it refuses (400s naming the field), the constraint it asks
the engine for, how a round trip's messages reach a chat template with or without tools, and how
an answer becomes OpenAI's tool_calls."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jsonschema
import pytest

from pagoda.services.gateway.protocol import ChatCompletionRequest
from pagoda.services.gateway.server import build_app
from pagoda.services.gateway.tools import template_messages, tool_plan
from tests.fakes import FakeEngine, local_frontend

PARAMS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [
    {"type": "function", "function": {"name": "weather", "parameters": PARAMS}},
    {"type": "function", "function": {"name": "time"}},
]
ASK = [{"role": "user", "content": "hi"}]


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    app = build_app(local_frontend(FakeEngine()))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        yield c


@pytest.mark.parametrize(
    ("extra", "param", "words"),
    [
        ({"tools": TOOLS}, "tool_choice", "'auto'"),
        ({"tools": TOOLS, "tool_choice": "auto"}, "tool_choice", "--tool-call-parser"),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        ({"tools": [{"type": "function"}], "tool_choice": "required"}, "tools", "tools[0]"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]},
            "tools",
            "JSON Schema",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": 5}}]},
            "tools",
            "JSON Schema object",
        ),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            "'nope'",
        ),
        ({"tools": TOOLS, "tool_choice": "required", "logprobs": True}, "logprobs", "logprobs"),
        (
            {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
            "response_format",
            "cannot be combined",
        ),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": True}}, "tool_choice", "'none'"),
        (  # the fuzzer's find: a call whose function is not an object was a 500
            {"messages": [*ASK, {"role": "assistant", "tool_calls": [{"function": True}]}]},
            "messages[1].tool_calls",
            '"function" object',
        ),
    ],
)
async def test_tool_mistakes_are_400s_naming_the_field(
    client: httpx.AsyncClient, extra: dict[str, Any], param: str, words: str
) -> None:
    resp = await client.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 2} | extra)
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == param and words in err["message"], err


async def test_text_completions_refuse_tools(client: httpx.AsyncClient) -> None:
    resp = await client.post("/v1/completions", json={"prompt": "hi", "tools": TOOLS, "max_tokens": 2})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "tools"


def _req(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": ASK} | fields)


def test_required_and_named_constraints_admit_only_the_tools_calls() -> None:
    required = tool_plan(_req(tools=TOOLS, tool_choice="required", parallel_tool_calls=False))
    assert required is not None and required.finish_reason == "tool_calls"
    schema = json.loads(required.constraint().spec)
    jsonschema.validate([{"name": "weather", "arguments": {"city": "Oslo"}}], schema)
    jsonschema.validate([{"name": "time", "arguments": {}}], schema)
    for bad in (
        [],
        [{"name": "weather", "arguments": {}}],
        [{"name": "x", "arguments": {}}],
        [{"name": "time", "arguments": {}}] * 2,
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    content, calls = required.answer('[{"name": "weather", "arguments": {"city": "Oslo"}}]')
    assert (
        content is None
        and calls
        and calls[0]["function"] == {"name": "weather", "arguments": '{"city": "Oslo"}'}
    )
    assert calls[0]["id"].startswith("call_") and calls[0]["type"] == "function"
    assert required.answer('[{"name": "weather", "argu') == ('[{"name": "weather", "argu', None)  # cut short
    named = tool_plan(_req(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "weather"}}))
    assert named is not None and named.finish_reason == "stop"
    assert json.loads(named.constraint().spec) == PARAMS
    assert named.answer('{"city": "Oslo"}')[1][0]["function"]["name"] == "weather"  # type: ignore[index]
    assert tool_plan(_req(tools=TOOLS, tool_choice="none")) is None


def test_a_round_trip_reaches_the_template_as_it_can_take_it() -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "weather", "arguments": '{"city": "Oslo"}'},
    }
    req = _req(
        messages=[
            {"role": "system", "content": "Be brief."},
            *ASK,
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
        ],
        tools=TOOLS,
        tool_choice="required",
    )
    plan = tool_plan(req)
    written, tools = template_messages(req, plan, template_knows_tools=False)
    assert tools is None and [m["role"] for m in written] == ["system", "user", "assistant", "user"]
    assert written[0]["content"].startswith("Be brief.\n\n") and '"name": "weather"' in written[0]["content"]
    assert (
        written[2]["content"]
        == '<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    )
    assert written[3]["content"] == "<tool_response>\n18C\n</tool_response>"
    as_is, tools = template_messages(req, plan, template_knows_tools=True)
    assert tools == TOOLS and as_is[2]["tool_calls"] == [call] and as_is[3]["tool_call_id"] == "call_1"
    assert as_is[3]["role"] == "tool"


CALL_TEXT = '<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n</tool_call>'


def _events(body: str) -> list[dict[str, Any]]:
    lines = [ln[6:] for ln in body.splitlines() if ln.startswith("data: ") and ln != "data: [DONE]"]
    return [json.loads(ln) for ln in lines]


@pytest.mark.parametrize(
    ("choice", "script", "content", "finish"),
    [
        ("auto", f"Sure.{CALL_TEXT}", "Sure.", "tool_calls"),
        ("required", '[{"name": "weather", "arguments": {"city": "Oslo"}}]', None, "tool_calls"),
        ({"type": "function", "function": {"name": "weather"}}, '{"city": "Oslo"}', None, "stop"),
    ],
)
async def test_answers_become_tool_calls_streamed_and_not(
    choice: Any, script: str, content: str | None, finish: str
) -> None:
    engine = FakeEngine(script=script)
    engine.max_model_len = 2048  # the tools' definitions are written into the prompt
    app = build_app(local_frontend(engine), tool_call_parser="hermes")
    body = {"messages": ASK, "tools": TOOLS, "tool_choice": choice, "max_tokens": 200}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        whole = (await c.post("/v1/chat/completions", json=body)).json()["choices"][0]
        streamed = _events((await c.post("/v1/chat/completions", json=body | {"stream": True})).text)
    constraint = engine.requests[0][2].structured_outputs
    assert (constraint is None) == (choice == "auto")  # auto samples freely; the others are held to JSON
    message = whole["message"]
    assert whole["finish_reason"] == finish and message["content"] == content
    [call] = message["tool_calls"]
    assert call["function"] == {"name": "weather", "arguments": '{"city": "Oslo"}'}
    deltas = [e["choices"][0] for e in streamed if e["choices"]]
    text = "".join(d["delta"].get("content") or "" for d in deltas)
    calls = [t for d in deltas for t in d["delta"].get("tool_calls") or []]
    assert text == (content or "") and "<tool" not in text
    head, *fragments = calls  # OpenAI's shape: id and name first, then argument fragments that join
    assert head["id"].startswith("call_") and head["function"] == {"name": "weather", "arguments": ""}
    assert all(t["index"] == 0 and set(t) == {"index", "function"} for t in fragments)
    assert "".join(t["function"]["arguments"] for t in fragments) == call["function"]["arguments"]
    assert deltas[-1]["finish_reason"] == finish


def test_auto_tool_choice_needs_a_parser_flag() -> None:
    from pagoda.services.cli.config import gateway_config
    from pagoda.services.cli.parser import build_parser

    args = build_parser().parse_args(["serve", "--enable-auto-tool-choice", "--tool-call-parser", "hermes"])
    assert gateway_config(args).tool_call_parser == "hermes"
    assert (
        gateway_config(build_parser().parse_args(["serve", "--tool-call-parser", "hermes"])).tool_call_parser
        is None
    )
    with pytest.raises(ValueError, match="needs --tool-call-parser"):
        gateway_config(build_parser().parse_args(["serve", "--enable-auto-tool-choice"]))

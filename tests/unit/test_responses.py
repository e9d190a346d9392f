"""The Responses API at the gateway: how a request becomes a chat completion (input items, tools,
text.format, instructions), what it refuses (400s naming the Responses field), the event
sequence of a stream (from a fake engine and from scripted deltas, reasoning and tool calls
included), and stored responses (GET, DELETE, previous_response_id, store: false)."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import httpx
import openai
import pytest

from pagoda.engine.outputs import RequestOutput
from pagoda.services.gateway.responses_input import chat_request, input_messages
from pagoda.services.gateway.responses_output import Answer, ItemIds
from pagoda.services.gateway.responses_protocol import ResponsesRequest
from pagoda.services.gateway.responses_stream import Events, ItemStream
from pagoda.services.gateway.server import build_app
from pagoda.services.gateway.tools import ToolPlan
from tests.fakes import MODEL, SCRIPT, FakeEngine, local_frontend

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOL = {"type": "function", "name": "weather", "description": "Weather now", "parameters": WEATHER}


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
async def client(engine: FakeEngine) -> AsyncIterator[httpx.AsyncClient]:
    app = build_app(local_frontend(engine))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        yield c


@pytest.fixture
async def sdk(client: httpx.AsyncClient) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url="http://t/v1", api_key="x", http_client=client) as c:  # type: ignore[arg-type]
        yield c


# -------------------------------------------------------------------------------- translation


def test_input_items_become_chat_messages() -> None:
    assert input_messages("Hi") == [{"role": "user", "content": "Hi"}]
    parts = [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}]
    items: list[dict[str, Any]] = [
        {"role": "developer", "content": "Be brief."},
        {"type": "message", "role": "user", "content": parts},
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "Let me look."}],
        },
        {"type": "function_call", "call_id": "call_1", "name": "weather", "arguments": '{"city": "Oslo"}'},
        {"type": "function_call", "call_id": "call_2", "name": "weather", "arguments": '{"city": "Rome"}'},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": "function_call_output", "call_id": "call_1", "output": "12C"},
        {
            "type": "function_call_output",
            "call_id": "call_2",
            "output": [{"type": "input_text", "text": "20"}],
        },
    ]
    messages = input_messages(items)
    assert [m["role"] for m in messages] == ["developer", "user", "assistant", "tool", "tool"]
    assert messages[1]["content"] == "a\nb"
    said = messages[2]
    assert said["content"] == "Let me look." and [c["id"] for c in said["tool_calls"]] == ["call_1", "call_2"]
    assert said["tool_calls"][1]["function"] == {"name": "weather", "arguments": '{"city": "Rome"}'}
    assert messages[3] == {"role": "tool", "tool_call_id": "call_1", "content": "12C"}
    assert messages[4]["content"] == "20"
    lone = input_messages([{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}])
    assert lone[0]["role"] == "assistant" and lone[0]["content"] is None


def test_request_becomes_a_chat_request() -> None:
    req = ResponsesRequest.model_validate(
        {
            "input": "Weather?", "instructions": "You are terse.", "max_output_tokens": 7, "temperature": 0,
            "top_p": 0.5, "seed": 3, "tools": [TOOL], "tool_choice": {"type": "function", "name": "weather"},
            "parallel_tool_calls": False, "user": "u1",
        }
    )  # fmt: skip
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    chat = chat_request(req, [*history, *input_messages(req.input)])
    assert [(m.role, m.content) for m in chat.messages] == [
        ("system", "You are terse."), ("user", "Hi"), ("assistant", "Hello"), ("user", "Weather?"),
    ]  # fmt: skip
    assert chat.requested_max_tokens() == 7 and chat.temperature == 0 and chat.top_p == 0.5 and chat.seed == 3
    assert chat.tools == [
        {
            "type": "function",
            "function": {"name": "weather", "description": "Weather now", "parameters": WEATHER},
        }
    ]
    assert chat.tool_choice == {"type": "function", "function": {"name": "weather"}}
    assert chat.parallel_tool_calls is False and chat.user == "u1"
    fmt = {"type": "json_schema", "name": "w", "schema": WEATHER, "strict": True}
    structured = chat_request(ResponsesRequest(input="x", text={"format": fmt}), input_messages("x"))
    assert structured.response_format == {
        "type": "json_schema",
        "json_schema": {"name": "w", "schema": WEATHER, "strict": True},
    }


@pytest.mark.parametrize(
    ("extra", "param", "words"),
    [
        ({"tools": [{"type": "web_search"}]}, "tools", "'web_search'"),
        ({"tools": [{"type": "function"}]}, "tools", "name"),
        ({"tools": [TOOL], "tool_choice": {"type": "file_search"}}, "tool_choice", "tool_choice"),
        ({"tools": [TOOL], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice", "'nope'"),
        ({"background": True}, "background", "background"),
        ({"include": ["message.output_text.logprobs"]}, "include", "include"),
        ({"reasoning": {"effort": "high"}}, "reasoning.effort", "effort"),
        ({"truncation": "auto"}, "truncation", "truncation"),
        ({"text": {"format": {"type": "grammar"}}}, "text.format", "'grammar'"),
        (
            {"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": 5}}}},
            "text.format",
            "Schema",
        ),
        ({"max_output_tokens": 100000}, "max_output_tokens", "max_output_tokens 100000 exceeds"),
        ({"max_output_tokens": 0}, "max_output_tokens", "max_output_tokens must be at least 1"),
        ({"temperature": -1}, "temperature", "temperature"),
        ({"model": "other"}, "model", "other"),
        (
            {
                "input": [
                    {"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}
                ]
            },
            "input",
            "input_image",
        ),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input", "item_reference"),
        ({"input": [{"role": "tool", "content": "x"}]}, "input", "role"),
    ],
)
async def test_refusals_name_the_field(
    client: httpx.AsyncClient, engine: FakeEngine, extra: dict[str, Any], param: str, words: str
) -> None:
    resp = await client.post("/v1/responses", json={"model": MODEL, "input": "Hi"} | extra)
    assert resp.status_code in (400, 404), resp.text
    err = resp.json()["error"]
    assert err["param"] == param and words in err["message"], err
    assert not engine.requests  # refused before anything ran


# ------------------------------------------------------------------------- whole and streamed


async def test_create_stream_get_delete(sdk: openai.AsyncOpenAI, engine: FakeEngine) -> None:
    whole = await sdk.responses.create(model=MODEL, input="Hi", instructions="Be kind.", metadata={"k": "v"})
    assert whole.id.startswith("resp_") and whole.status == "completed" and whole.output_text == SCRIPT
    assert whole.instructions == "Be kind." and whole.metadata == {"k": "v"} and whole.to_dict()["store"]
    usage = whole.usage
    assert usage is not None and usage.output_tokens == len(SCRIPT.encode()) + 1  # and EOS
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    prompt = engine.tokenizer.decode(engine.requests[0][1])
    assert prompt.startswith("<system>Be kind.\n<user>Hi\n")

    async with sdk.responses.stream(model=MODEL, input="Hi", max_output_tokens=5) as stream:
        events = [e async for e in stream]
        final = await stream.get_final_response()
    kinds = [e.type for e in events]
    opening = ["created", "in_progress", "output_item.added", "content_part.added"]
    closing = ["output_text.done", "content_part.done", "output_item.done", "completed"]
    assert kinds[:4] == [f"response.{k}" for k in opening]
    assert kinds[-4:] == [f"response.{k}" for k in closing]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == final.output_text == SCRIPT[:5]
    assert final.status == "incomplete" and final.incomplete_details is not None
    assert final.incomplete_details.reason == "max_output_tokens"

    got: Any = await sdk.responses.retrieve(final.id)
    streamed: Any = final.output[0]
    assert got.output_text == SCRIPT[:5] and got.output[0].id == streamed.id and got.status == "incomplete"
    await sdk.responses.delete(final.id)
    with pytest.raises(openai.NotFoundError):
        await sdk.responses.retrieve(final.id)


async def test_previous_response_id_continues_and_store_false_keeps_nothing(
    sdk: openai.AsyncOpenAI, engine: FakeEngine
) -> None:
    first = await sdk.responses.create(
        model=MODEL, input="One", instructions="Old rules.", max_output_tokens=3
    )
    second = await sdk.responses.create(
        model=MODEL,
        input="Two",
        previous_response_id=first.id,
        instructions="New rules.",
        max_output_tokens=3,
    )
    prompt = engine.tokenizer.decode(engine.requests[1][1])
    assert prompt == f"<system>New rules.\n<user>One\n<assistant>{SCRIPT[:3]}\n<user>Two\n<assistant>"
    assert second.previous_response_id == first.id
    unstored = await sdk.responses.create(model=MODEL, input="Three", store=False, max_output_tokens=2)
    with pytest.raises(openai.NotFoundError):
        await sdk.responses.retrieve(unstored.id)
    with pytest.raises(openai.BadRequestError) as gone:
        await sdk.responses.create(model=MODEL, input="Four", previous_response_id=unstored.id)
    body: Any = gone.value.body
    assert body["param"] == "previous_response_id" and "Previous response with id" in body["message"]


async def test_engine_error_is_a_500_whole_and_an_error_event_streamed(
    client: httpx.AsyncClient, engine: FakeEngine, caplog: pytest.LogCaptureFixture
) -> None:
    async def boom(*args: Any, **kwargs: Any) -> AsyncIterator[RequestOutput]:
        raise RuntimeError("engine fell over")
        yield  # pragma: no cover

    engine.add_request = boom  # type: ignore[method-assign]
    with caplog.at_level(logging.INFO, logger="pagoda.services.gateway.server"):
        whole = await client.post("/v1/responses", json={"model": MODEL, "input": "Hi"})
        streamed = await client.post("/v1/responses", json={"model": MODEL, "input": "Hi", "stream": True})
    assert whole.status_code == 500 and whole.json()["error"]["code"] == 500
    blocks = [b for b in streamed.text.split("\n\n") if b]
    events = [json.loads(b.split("data: ", 1)[1]) for b in blocks]
    assert [e["type"] for e in events] == ["response.created", "response.in_progress", "error"]
    assert events[-1]["sequence_number"] == 2 and blocks[-1].startswith("event: error\n")
    lines = [
        r.getMessage() for r in caplog.records if r.levelno == logging.INFO and "resp_" in r.getMessage()
    ]
    assert len(lines) == 2 and all("status=500" in line for line in lines), lines


# ------------------------------------------------------------------------------ item streams


def _replay(
    parser: str | None, plan: ToolPlan | None, texts: list[str], answer: Answer
) -> list[dict[str, Any]]:
    """The events ItemStream writes for an answer whose text grew as `texts`."""
    pending: Any = SimpleNamespace(call=SimpleNamespace(reasoning=parser, tools=plan), ids=ItemIds())
    items = ItemStream(pending, Events())
    data = b"".join([*(items.delta(t) for t in texts), items.finish(answer)]).decode()
    return [json.loads(block.split("\ndata: ", 1)[1]) for block in data.split("\n\n") if block]


def _text_of(events: list[dict[str, Any]], kind: str, index: int) -> str:
    return "".join(
        e["delta"] for e in events if e["type"] == f"response.{kind}.delta" and e["output_index"] == index
    )


def test_reasoning_streams_then_closes_before_the_message() -> None:
    texts = ["Let", "Let me think</th", "Let me think</think>Hel", "Let me think</think>Hello"]
    events = _replay("deepseek_r1", None, texts, Answer("Let me think", "Hello", [], "stop"))
    kinds = [e["type"] for e in events]
    assert kinds.index("response.output_item.done") < kinds.index("response.output_text.delta")
    assert _text_of(events, "reasoning_text", 0) == "Let me think"
    assert _text_of(events, "output_text", 1) == "Hello"
    done = [e["item"] for e in events if e["type"] == "response.output_item.done"]
    assert [(d["type"], d["status"]) for d in done] == [("reasoning", "completed"), ("message", "completed")]
    assert done[0]["content"] == [{"type": "reasoning_text", "text": "Let me think"}]
    assert all(e["type"] != "response.reasoning_text.delta" or "</" not in e["delta"] for e in events)


def test_auto_tool_calls_stream_text_first_then_whole_calls() -> None:
    plan = ToolPlan("auto", {"weather": WEATHER}, [TOOL])
    call = '<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    texts = ["Sure.", "Sure.\n<tool", f"Sure.\n{call}"]
    content, calls = plan.answer(texts[-1])
    assert calls is not None
    events = _replay(None, plan, texts, Answer("", content, calls, "stop"))
    assert _text_of(events, "output_text", 0) == "Sure."
    added = [e["item"] for e in events if e["type"] == "response.output_item.added"]
    assert [a["type"] for a in added] == ["message", "function_call"] and added[1]["arguments"] == ""
    args = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert json.loads(args[0]["arguments"]) == {"city": "Oslo"} and args[0]["output_index"] == 1
    done = [e["item"] for e in events if e["type"] == "response.output_item.done"]
    assert done[1]["call_id"] == calls[0]["id"] and done[1]["name"] == "weather"


def test_required_tool_calls_send_no_text_and_an_empty_answer_is_one_empty_message() -> None:
    plan = ToolPlan("required", {"weather": WEATHER}, [TOOL])
    text = '[{"name": "weather", "arguments": {"city": "Oslo"}}]'
    content, calls = plan.answer(text)
    events = _replay(None, plan, [text[:5], text], Answer("", content, calls or [], "tool_calls"))
    assert not _text_of(events, "output_text", 0)
    assert [e["item"]["type"] for e in events if e["type"] == "response.output_item.added"] == [
        "function_call"
    ]
    empty = _replay(None, None, [], Answer("", "", [], "stop"))
    assert [e["type"] for e in empty] == [
        "response.output_item.added", "response.content_part.added", "response.output_text.done",
        "response.content_part.done", "response.output_item.done",
    ]  # fmt: skip

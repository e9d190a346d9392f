"""The --tool-call-parser formats (gateway/tool_parsers.py): each reads its family's calls out of
an answer, keeps text it cannot read as content, and holds streamed content back from where a
call starts or may start; through the server, a parser whose markers are special tokens sees them
(and not the stop token), and calls written inside the reasoning are kept."""

from __future__ import annotations

import httpx
import pytest

from pagoda.services.gateway.server import build_app
from pagoda.services.gateway.tool_parsers import PARSERS, get_parser
from pagoda.services.gateway.tools import ToolPlan
from tests.fakes import FakeEngine, local_frontend

FUNCTIONS = {
    "weather": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}
}
OSLO = ("weather", {"city": "Oslo", "days": 2})
ROME = ("weather", {"city": "Rome", "days": 2})
OSLO_ARGS, ROME_ARGS = '{"city": "Oslo", "days": 2}', '{"city": "Rome", "days": 2}'
HERMES = '<tool_call>\n{"name": "weather", "arguments": ' + OSLO_ARGS + "}\n</tool_call>"
LLAMA = '{"name": "weather", "parameters": %s}'
LISTED = '[{"name": "weather", "arguments": ' + OSLO_ARGS + "}]"
XML = "<tool_call>\n<function=weather>\n<parameter=city>\n%s\n</parameter>\n<parameter=days>\n2\n</parameter>"
XML += "\n</function>\n</tool_call>"
CASES = [
    ("hermes", f"Let me look.\n{HERMES}", "Let me look.", [OSLO]),
    ("llama3_json", f"<|python_tag|>{LLAMA % OSLO_ARGS}; {LLAMA % ROME_ARGS}", "", [OSLO, ROME]),
    ("mistral", f"Let me look.[TOOL_CALLS]{LISTED}", "Let me look.", [OSLO]),
    (
        "mistral",
        f"[TOOL_CALLS]weather[ARGS]{OSLO_ARGS}[TOOL_CALLS]weather[ARGS]{ROME_ARGS}",
        "",
        [OSLO, ROME],
    ),
    ("granite", f"<|tool_call|>{LISTED}", "", [OSLO]),
    ("qwen3_xml", f"Let me look.\n{XML % 'Oslo'}\n{XML % 'Rome'}", "Let me look.", [OSLO, ROME]),
    ("pythonic", '[weather(city="Oslo", days=2), weather(city="Rome", days=2)]', "", [OSLO, ROME]),
]


@pytest.mark.parametrize(("name", "text", "content", "calls"), CASES)
def test_each_parser_reads_its_calls_and_streams_only_content(
    name: str, text: str, content: str, calls: list[tuple[str, object]]
) -> None:
    parser = get_parser(name)
    assert parser.calls(text, FUNCTIONS) == (content, calls)
    for end in range(len(text) + 1):  # as it streams: no part of a call leaves as content
        prefix = text[:end]
        assert content.startswith(prefix[: parser.held_from(prefix)].rstrip()), (name, prefix)


@pytest.mark.parametrize("name", PARSERS)
def test_text_that_is_no_call_stays_content(name: str) -> None:
    parser = get_parser(name)
    for text in ("It is sunny in Oslo.", '{"name": 3}', "[not a call", "<tool_call>{broken</tool_call>"):
        assert parser.calls(text, FUNCTIONS) == (text, [])
    assert parser.held_from("It is sunny.") == len("It is sunny.")  # plain text streams at once


async def test_special_token_markers_reach_the_parser_and_the_stop_token_does_not() -> None:
    async def answer(script: str, parser: str, template_tools: bool) -> dict[str, object]:
        engine = FakeEngine(script=script)
        engine.max_model_len = 2048
        if template_tools:
            engine.tokenizer.chat_template = "{{ tools }}"  # a template that renders tools
        app = build_app(local_frontend(engine), tool_call_parser=parser)
        body = {
            "messages": [{"role": "user", "content": "hi"}],
            "tools": [
                {"type": "function", "function": {"name": "weather", "parameters": FUNCTIONS["weather"]}}
            ],
        }
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            resp = await c.post("/v1/chat/completions", json=body | {"max_tokens": 300})
        assert engine.requests[0][2].structured_outputs is None  # auto: a free answer
        return resp.json()["choices"][0]  # type: ignore[no-any-return]

    mistral = CASES[2][1]
    called = await answer(mistral, "mistral", template_tools=True)
    assert called["finish_reason"] == "tool_calls" and called["message"]["content"] == "Let me look."
    assert called["message"]["tool_calls"][0]["function"]["arguments"] == '{"city": "Oslo", "days": 2}'
    plain = await answer("It is sunny.", "mistral", template_tools=True)  # skip_special_tokens off
    assert plain["message"]["content"] == "It is sunny." and plain["finish_reason"] == "stop"
    # a template without tools gets pagoda's Hermes format written in, and is read back in it
    hermes = await answer(CASES[0][1], "mistral", template_tools=False)
    assert hermes["message"]["tool_calls"][0]["function"]["name"] == "weather"


def test_calls_written_inside_the_reasoning_are_kept() -> None:
    plan = ToolPlan("auto", FUNCTIONS, [], parser="hermes")
    content, calls = plan.answer("Done.", reasoning=f"I should call it. {CASES[0][1]}")
    assert content == "Done." and calls is not None and calls[0]["function"]["name"] == "weather"
    assert plan.answer("Done.", reasoning="no calls here") == ("Done.", None)

"""Reasoning models (--reasoning-parser): <think> text as reasoning_content, apart from content,
whole and streamed, with tool calls read from the content."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from pagoda.services.cli.config import gateway_config
from pagoda.services.cli.parser import build_parser
from pagoda.services.gateway.reasoning import split_reasoning
from pagoda.services.gateway.server import build_app
from tests.fakes import FakeEngine, local_frontend

ASK = [{"role": "user", "content": "2 + 2?"}]


def test_split_by_parser_and_held_tails() -> None:
    assert split_reasoning("<think>hmm</think>4", "qwen3") == ("hmm", "4")
    assert split_reasoning("4", "qwen3") == ("", "4")  # thinking off: all content
    assert split_reasoning("hmm</think>4", "deepseek_r1") == ("hmm", "4")  # opened by the template
    assert split_reasoning("<think>hmm</think>4", "deepseek_r1") == ("hmm", "4")
    assert split_reasoning("hmm, still", "deepseek_r1") == ("hmm, still", "")  # cut short: reasoning
    # mid-stream, a tail that may become a tag is held back, so both parts only grow
    assert split_reasoning("<thi", "qwen3", final=False) == ("", "")
    assert split_reasoning("<think>hm</thi", "qwen3", final=False) == ("hm", "")
    assert split_reasoning("hm</", "deepseek_r1", final=False) == ("hm", "")
    assert split_reasoning("hm</", "deepseek_r1") == ("hm</", "")


def _events(body: str) -> list[dict[str, Any]]:
    lines = [ln[6:] for ln in body.splitlines() if ln.startswith("data: ") and ln != "data: [DONE]"]
    return [json.loads(ln) for ln in lines]


TOOL = {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}
CALL = '<tool_call>{"name": "add", "arguments": {"a": 2}}</tool_call>'


@pytest.mark.parametrize(
    ("parser", "script", "extra", "reasoning", "content"),
    [
        ("qwen3", "<think>Two and two.</think>It is 4.", {}, "Two and two.", "It is 4."),
        ("qwen3", "It is 4.", {}, None, "It is 4."),
        ("deepseek_r1", "Two and two.</think>It is 4.", {}, "Two and two.", "It is 4."),
        (
            "qwen3",
            f"<think>Use the tool.</think>{CALL}",
            {"tools": [TOOL], "tool_choice": "auto"},
            "Use the tool.",
            None,
        ),
    ],
)
async def test_reasoning_comes_apart_from_content_whole_and_streamed(
    parser: str, script: str, extra: dict[str, Any], reasoning: str | None, content: str | None
) -> None:
    engine = FakeEngine(script=script)
    engine.max_model_len = 2048
    app = build_app(local_frontend(engine), reasoning_parser=parser, tool_call_parser="hermes")
    body = {"messages": ASK, "max_tokens": 200, "logprobs": not extra} | extra
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        whole = (await c.post("/v1/chat/completions", json=body)).json()["choices"][0]
        streamed = _events((await c.post("/v1/chat/completions", json=body | {"stream": True})).text)
    message = whole["message"]
    assert message["reasoning_content"] == reasoning and message["content"] == content, message
    deltas = [e["choices"][0] for e in streamed if e["choices"]]
    got_reasoning = "".join(d["delta"].get("reasoning_content") or "" for d in deltas)
    got_content = "".join(d["delta"].get("content") or "" for d in deltas)
    assert got_reasoning == (reasoning or "") and got_content == (content or "")
    if extra:  # the call is read from the content, after the reasoning
        assert (
            message["tool_calls"][0]["function"]["name"] == "add" and whole["finish_reason"] == "tool_calls"
        )
        assert [t["function"].get("name") for d in deltas for t in d["delta"].get("tool_calls") or []] == [
            "add",
            None,
        ]
    else:  # every token's logprob, once
        assert sum(len((d.get("logprobs") or {}).get("content") or []) for d in deltas) == len(script) + 1


def test_the_flag() -> None:
    args = build_parser().parse_args(["serve", "--reasoning-parser", "deepseek_r1"])
    assert gateway_config(args).reasoning_parser == "deepseek_r1"
    assert gateway_config(build_parser().parse_args(["serve"])).reasoning_parser is None

"""Hostile input: each gets a clear 4xx with an OpenAI-style body, and the server keeps serving."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagoda.services.gateway.limits import RequestLimits, json_depth
from pagoda.services.gateway.server import build_app
from tests.fakes import BOS, EOS, EOT, FakeEngine, local_frontend

LIMITS = RequestLimits(max_body_bytes=4096, max_json_depth=8, max_n=4, max_stop=3, max_logit_bias=5)


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    app = build_app(local_frontend(FakeEngine()), limits=LIMITS)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        yield c


def _error(resp: httpx.Response, status: int, param: str | None = None) -> str:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
    assert "Traceback" not in err["message"]
    if param is not None:
        assert err["param"] == param, err
    return str(err["message"])


async def _still_serves(client: httpx.AsyncClient) -> None:
    resp = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert resp.status_code == 200 and resp.json()["choices"][0]["text"] == "He"


async def test_body_over_the_limit_is_413_by_length_and_when_chunked(client: httpx.AsyncClient) -> None:
    big = json.dumps({"prompt": "x" * 5000, "max_tokens": 1}).encode()
    assert "4096 bytes" in _error(await client.post("/v1/completions", content=big), 413)

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it arrives
        for i in range(0, len(big), 1000):
            yield big[i : i + 1000]

    _error(await client.post("/v1/completions", content=chunks()), 413)
    await _still_serves(client)


async def test_invalid_utf8_deep_json_and_lone_surrogates_are_400(client: httpx.AsyncClient) -> None:
    headers = {"content-type": "application/json"}
    bad = b'{"prompt": "\xff\xfe", "max_tokens": 2}'
    assert "UTF-8" in _error(await client.post("/v1/completions", content=bad, headers=headers), 400)
    deep = b'{"prompt": ' + b"[" * 1500 + b"]" * 1500 + b"}"
    msg = _error(await client.post("/v1/completions", content=deep, headers=headers), 400)
    assert "1501 levels" in msg and "limit is 8" in msg
    surrogate = b'{"prompt": "ok \\ud800", "max_tokens": 2}'
    msg = _error(await client.post("/v1/completions", content=surrogate, headers=headers), 400, "prompt")
    assert "surrogate" in msg
    nan = b'{"prompt": "x", "temperature": NaN}'
    _error(await client.post("/v1/completions", content=nan, headers=headers), 400, "temperature")
    await _still_serves(client)


@pytest.mark.parametrize(
    ("field", "value", "param", "words"),
    [
        ("n", 5, "n", "limit of 4"),
        ("max_tokens", 10**12, "max_tokens", "limit of 256"),  # the fake's context length
        ("stop", ["a", "b", "c", "d"], "stop", "limit is 3"),
        ("stop", ["s" * 2000], "stop", "1024 characters"),
        ("logit_bias", {str(i): 1.0 for i in range(6)}, "logit_bias", "limit is 5"),
        ("seed", 2**70, "seed", "64-bit"),
        ("prompt", [1, 2, 10**30], "prompt", f"token id {10**30} is out of vocabulary"),
        ("prompt", [5, 259], "prompt", "token id 259 is out of vocabulary"),
    ],
)
async def test_request_over_a_limit_is_400_naming_it(
    client: httpx.AsyncClient, field: str, value: Any, param: str, words: str
) -> None:
    body = {"prompt": "hi", "max_tokens": 2, field: value}
    assert words in _error(await client.post("/v1/completions", json=body), 400, param)
    await _still_serves(client)


async def test_chat_max_completion_tokens_is_named(client: httpx.AsyncClient) -> None:
    body = {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 999}
    _error(await client.post("/v1/chat/completions", json=body), 400, "max_completion_tokens")


async def test_a_prompt_of_only_special_tokens_is_answered(client: httpx.AsyncClient) -> None:
    resp = await client.post("/v1/completions", json={"prompt": [BOS, EOS, EOT], "max_tokens": 3})
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["prompt_tokens"] == 3


async def test_limits_are_configurable() -> None:
    app = build_app(local_frontend(FakeEngine()), limits=RequestLimits(max_tokens=8))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        _error(await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 9}), 400, "max_tokens")
        assert (await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 8})).status_code == 200
    with pytest.raises(ValueError, match="max_n must be at least 1"):
        RequestLimits(max_n=0)


def _depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    return 0


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='[]{}"\\ab\n'),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(alphabet='[]{"\\a'), inner, max_size=3)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(_JSON)
def test_json_depth_matches_the_parsed_value(value: Any) -> None:
    """Brackets inside strings (escaped quotes included) do not count."""
    assert json_depth(json.dumps(value).encode()) == _depth(value)


def test_flags_build_the_limits() -> None:
    from pagoda.services.cli.config import admission_limits, launch_config, request_limits
    from pagoda.services.cli.parser import build_parser
    from pagoda.services.scheduler.admission import AdmissionLimits

    args = build_parser().parse_args(
        ["serve", "--max-request-body-bytes", "1MiB", "--max-n", "3", "--max-tokens-limit", "100",
         "--max-stop-strings", "2", "--max-logit-bias", "7", "--max-json-depth", "9",
         "--max-waiting-requests", "-1", "--priority-reserve", "2", "--rate-limit-requests", "5"]
    )  # fmt: skip
    assert request_limits(args) == RequestLimits(
        max_body_bytes=2**20, max_json_depth=9, max_n=3, max_tokens=100, max_stop=2, max_logit_bias=7
    )
    assert admission_limits(args) == AdmissionLimits(max_waiting=None, priority_reserve=2)
    assert args.rate_limit_requests == 5 and args.rate_limit_tokens is None and args.queue_timeout == 300
    for role in ("gateway", "scheduler", "worker"):
        flags = [role, "--bus", "amqp://x", "--store", "redis://x", "--max-waiting-requests", "3"]
        role_args = build_parser().parse_args(flags)
        assert admission_limits(role_args).max_waiting == 3
    tokenizer = build_parser().parse_args(["tokenizer", "--bus", "amqp://x"])
    assert launch_config(tokenizer, ("tokenizer",)).admission == AdmissionLimits()  # it has no such flags


_TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


@pytest.mark.parametrize(
    ("path", "field", "value", "param"),
    [
        ("/v1/completions", "tools", [_TOOL], "tools"),
        ("/v1/completions", "tool_choice", "required", "tool_choice"),
        ("/v1/chat/completions", "functions", [_TOOL["function"]], "functions"),
        ("/v1/completions", "best_of", 3, "best_of"),
        ("/v1/completions", "suffix", "tail", "suffix"),
        ("/v1/completions", "prompt_logprobs", 1, "prompt_logprobs"),
    ],
)
async def test_fields_pagoda_cannot_honour_are_refused_by_name(
    client: httpx.AsyncClient, path: str, field: str, value: Any, param: str
) -> None:
    """Ignored, a client asking for a tool call would get prose: a 400 naming the field."""
    base: dict[str, Any] = {"max_tokens": 2}
    base |= {"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "hi"}
    msg = _error(await client.post(path, json=base | {field: value}), 400, param)
    assert "not supported" in msg and f"remove {param}" in msg
    # what changes nothing stays accepted: text format, no tools, tool_choice none, best_of = n
    same = (
        {"response_format": {"type": "text"}, "tools": [], "tool_choice": "none"}
        if "chat" in path
        else {"best_of": 1, "suffix": ""}
    )
    assert (await client.post(path, json=base | same)).status_code == 200
    await _still_serves(client)


async def test_a_tool_round_trip_is_accepted(client: httpx.AsyncClient) -> None:
    """Assistant tool_calls and tool results are messages like any other now (gateway/tools.py)."""
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "1"},
    ]
    resp = await client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 2})
    assert resp.status_code == 200, resp.text


@pytest.mark.parametrize(
    ("field", "value", "param", "words"),
    [
        ("response_format", {"type": "xml"}, "response_format", "not supported"),
        ("response_format", {"type": "json_schema"}, "response_format", "json_schema object"),
        (
            "response_format",
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}},
            "response_format.json_schema.schema",
            "not a valid JSON Schema",
        ),
        ("structured_outputs", {"regex": "a("}, "structured_outputs", "invalid regex"),
        ("structured_outputs", {"grammar": "root ::= nowhere"}, "structured_outputs", "invalid grammar"),
        ("structured_outputs", {"regex": "a", "choice": ["b"]}, "structured_outputs", "exactly one"),
        (
            "structured_outputs",
            {"regex": "a", "whitespace_pattern": " "},
            "structured_outputs.whitespace_pattern",
            "not",
        ),
        ("guided_choice", [], "guided_choice", "non-empty list"),
    ],
)
async def test_structured_output_mistakes_are_400s_naming_the_field(
    client: httpx.AsyncClient, field: str, value: Any, param: str, words: str
) -> None:
    """Shapes and schemas are checked at the gateway (jsonschema); regexes and grammars against
    the model's tokenizer (llguidance), still before any worker sees the request."""
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, field: value}
    assert words in _error(await client.post("/v1/chat/completions", json=body), 400, param)
    await _still_serves(client)


async def test_one_structured_output_constraint_per_request(client: httpx.AsyncClient) -> None:
    body = {
        "prompt": "hi",
        "max_tokens": 2,
        "structured_outputs": {"json_object": True},
        "response_format": {"type": "json_object"},
    }
    assert "sets response_format and structured_outputs" in _error(
        await client.post("/v1/completions", json=body), 400, "structured_outputs"
    )
    ok = {"prompt": "hi", "max_tokens": 2, "structured_outputs": {"choice": ["yes", "no"]}}
    assert (await client.post("/v1/completions", json=ok)).status_code == 200

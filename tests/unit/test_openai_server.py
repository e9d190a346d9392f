"""The OpenAI server over a fake engine: raw HTTP through httpx.ASGITransport, and the openai SDK."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, cast

import httpx
import openai
import pytest

from pagoda.engine.outputs import RequestOutput
from pagoda.engine.sampling.params import SamplingParams
from pagoda.services.gateway.frontend import Submitted
from pagoda.services.gateway.server import build_app
from pagoda.services.transport.errors import APIError
from pagoda.services.transport.messages import PromptInput

if TYPE_CHECKING:
    from fastapi import FastAPI
    from starlette.types import Message

    from pagoda.services.gateway.frontend import Frontend

from tests.fakes import BOS, MODEL, SCRIPT, FakeEngine, FakeTokenizer, local_frontend


def _app(engine: FakeEngine, **kwargs: Any) -> FastAPI:
    return build_app(local_frontend(engine), **kwargs)


def _sdk(app: FastAPI, api_key: str = "x") -> openai.AsyncOpenAI:
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app))
    return openai.AsyncOpenAI(base_url="http://test/v1", api_key=api_key, http_client=http)  # type: ignore[arg-type]


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
async def client(engine: FakeEngine) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=_app(engine))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


@pytest.fixture
async def sdk(engine: FakeEngine) -> AsyncIterator[openai.AsyncOpenAI]:
    async with _sdk(_app(engine)) as c:
        yield c


def _chat(**kw: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], **kw}


def _events(body: str) -> list[Any]:
    chunks = [line[len("data: ") :] for line in body.split("\n\n") if line]
    assert chunks[-1] == "[DONE]"
    return [json.loads(c) for c in chunks[:-1]]


def _error(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert "Traceback" not in err["message"]
    return err


# ------------------------------------------------------------------------------------------- chat


async def test_chat_non_streaming(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    resp = await client.post("/v1/chat/completions", json=_chat(max_tokens=5))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "Hello"}
    assert choice["finish_reason"] == "length"
    prompt_ids = engine.requests[0][1]
    assert prompt_ids == list(b"<user>Hi\n<assistant>")  # template, no BOS added
    assert body["usage"] == {
        "prompt_tokens": len(prompt_ids),
        "completion_tokens": 5,
        "total_tokens": len(prompt_ids) + 5,
        "prompt_tokens_details": {"cached_tokens": 4},
    }


async def test_chat_runs_to_eos_by_default(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    body = (await client.post("/v1/chat/completions", json=_chat())).json()
    assert body["choices"][0]["message"]["content"] == SCRIPT
    assert body["choices"][0]["finish_reason"] == "stop"
    params = engine.requests[0][2]
    assert params.max_tokens is None  # the engine stops at max_model_len itself


async def test_omitted_max_tokens_runs_to_context_length(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    body = (await client.post("/v1/chat/completions", json=_chat(ignore_eos=True))).json()
    prompt_len = len(engine.requests[0][1])
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == engine.max_model_len - prompt_len


async def test_chat_streaming_matches_non_streaming(client: httpx.AsyncClient) -> None:
    resp = await client.post("/v1/chat/completions", json=_chat(stream=True, n=2))
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    events = _events(resp.text)
    assert all(e["object"] == "chat.completion.chunk" and e["usage"] is None for e in events)
    texts: dict[int, str] = {0: "", 1: ""}
    finish: dict[int, str] = {}
    for e in events:
        for c in e["choices"]:
            texts[c["index"]] += c["delta"].get("content") or ""
            if c["finish_reason"]:
                finish[c["index"]] = c["finish_reason"]
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert texts == {0: SCRIPT, 1: "B" + SCRIPT[1:]}
    assert finish == {0: "stop", 1: "stop"}


async def test_chat_stream_include_usage(client: httpx.AsyncClient) -> None:
    body = _chat(stream=True, max_tokens=3, stream_options={"include_usage": True})
    events = _events((await client.post("/v1/chat/completions", json=body)).text)
    assert events[-1]["choices"] == []
    assert events[-1]["usage"]["completion_tokens"] == 3


async def test_chat_n2_and_content_parts(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
    ]
    resp = await client.post("/v1/chat/completions", json=_chat(messages=messages, n=2, max_tokens=2))
    body = resp.json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert [c["message"]["content"] for c in body["choices"]] == ["He", "Be"]
    assert body["usage"]["completion_tokens"] == 4
    assert bytes(engine.requests[0][1]).decode() == "<system>Be brief.\n<user>a\nb\n<assistant>"


async def test_chat_stop_string_finishes_and_aborts(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    body = (await client.post("/v1/chat/completions", json=_chat(stop=["world"]))).json()
    assert body["choices"][0]["message"]["content"] == "Hello "
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["choices"][0]["stop_reason"] == "world"
    rid = engine.requests[0][0]
    assert rid in engine.closed_early and rid in engine.aborted
    assert body["usage"]["completion_tokens"] == len("Hello world")


async def test_chat_stop_string_streaming_with_include(client: httpx.AsyncClient) -> None:
    body = _chat(stop="va?", include_stop_str_in_output=True, stream=True)
    events = _events((await client.post("/v1/chat/completions", json=body)).text)
    text = "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])
    assert text == "Hello world! Ça va?"
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


async def test_chat_logprobs_shape(client: httpx.AsyncClient) -> None:
    req = _chat(max_tokens=3, logprobs=True, top_logprobs=2)
    body = (await client.post("/v1/chat/completions", json=req)).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == ["H", "e", "l"]
    assert content[0]["logprob"] == -0.5 and content[0]["bytes"] == [72]
    assert [t["token"] for t in content[0]["top_logprobs"]] == ["H", "I"]
    stream = _chat(max_tokens=2, logprobs=True, top_logprobs=1, stream=True)
    events = _events((await client.post("/v1/chat/completions", json=stream)).text)
    entries = [c["logprobs"]["content"] for e in events for c in e["choices"] if c["logprobs"]]
    assert len(entries) == 2 and len(entries[0][0]["top_logprobs"]) == 1


async def test_unknown_fields_ignored(client: httpx.AsyncClient) -> None:
    body = _chat(max_tokens=2, tools=[], frobnicate={"x": 1}, parallel_tool_calls=False)
    body["messages"][0]["weird"] = True
    assert (await client.post("/v1/chat/completions", json=body)).status_code == 200


async def test_sampling_fields_reach_engine(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    body = _chat(
        max_completion_tokens=4,
        temperature=0.3,
        top_p=0.9,
        top_k=5,
        min_p=0.1,
        seed=7,
        min_tokens=1,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        repetition_penalty=1.1,
        logit_bias={"42": 3.0},
        stop_token_ids=[33],
        ignore_eos=True,
        priority=2,
        cache_salt="salt",
        user="u",
    )
    assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
    _, _, params, priority, salt = engine.requests[0]
    assert params == SamplingParams(
        max_tokens=4,
        temperature=0.3,
        top_p=0.9,
        top_k=5,
        min_p=0.1,
        seed=7,
        min_tokens=1,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        repetition_penalty=1.1,
        logit_bias={42: 3.0},
        stop_token_ids=(33,),
        ignore_eos=True,
    )
    assert (priority, salt) == (2, "salt")


# ------------------------------------------------------------------------------------ completions


async def test_completion_non_streaming_and_echo(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    req = {"model": MODEL, "prompt": "Say:", "max_tokens": 5}
    body = (await client.post("/v1/completions", json=req)).json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "Hello"
    assert engine.requests[0][1] == [BOS, *b"Say:"]  # completions add special tokens
    assert body["usage"]["prompt_tokens"] == 5
    echo = {"model": MODEL, "prompt": "Say:", "max_tokens": 5, "echo": True}
    assert (await client.post("/v1/completions", json=echo)).json()["choices"][0]["text"] == "Say:Hello"


async def test_completion_default_max_tokens_is_16(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    await client.post("/v1/completions", json={"prompt": "x"})
    assert engine.requests[0][2].max_tokens == 16


async def test_completion_list_prompts(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    body = {"model": MODEL, "prompt": ["a", "bb"], "n": 2, "max_tokens": 2}
    out = (await client.post("/v1/completions", json=body)).json()
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in out["choices"]] == ["He", "Be", "He", "Be"]
    assert out["usage"]["prompt_tokens"] == 2 + 3 and out["usage"]["completion_tokens"] == 8
    ids = sorted(r[0] for r in engine.requests)
    assert ids[0].endswith("-0") and ids[1].endswith("-1")


async def test_completion_token_prompts_streaming(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    body = {
        "prompt": [[BOS, 65], [66]],
        "max_tokens": 3,
        "stream": True,
        "echo": True,
        "stream_options": {"include_usage": True},
    }
    events = _events((await client.post("/v1/completions", json=body)).text)
    texts: dict[int, str] = {}
    for e in events:
        for c in e["choices"]:
            texts[c["index"]] = texts.get(c["index"], "") + c["text"]
    assert texts == {0: "AHel", 1: "BHel"}
    assert events[-1]["usage"]["prompt_tokens"] == 3 and events[-1]["usage"]["completion_tokens"] == 6
    assert sorted(r[1] for r in engine.requests) == [[66], [BOS, 65]]


async def test_completion_logprobs_shape(client: httpx.AsyncClient) -> None:
    body = {"prompt": "Q", "max_tokens": 3, "logprobs": 2, "echo": True}
    lp = (await client.post("/v1/completions", json=body)).json()["choices"][0]["logprobs"]
    assert lp["tokens"] == ["H", "e", "l"]
    assert lp["token_logprobs"] == [-0.5, -0.5, -0.5]
    assert lp["text_offset"] == [1, 2, 3]  # after the echoed "Q"
    assert lp["top_logprobs"][0] == {"H": -0.5, "I": -1.0}


async def test_completion_stop_string_streaming(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    body = {"prompt": "x", "stop": ["!"], "stream": True, "max_tokens": 50}
    events = _events((await client.post("/v1/completions", json=body)).text)
    assert "".join(c["text"] for e in events for c in e["choices"]) == "Hello world"
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    assert engine.requests[0][0] in engine.aborted


# ------------------------------------------------------------------------ tokenize, models, health


async def test_tokenize_detokenize(client: httpx.AsyncClient) -> None:
    out = (await client.post("/tokenize", json={"model": MODEL, "prompt": "hé"})).json()
    assert out == {"count": 4, "max_model_len": 256, "tokens": [BOS, 104, 195, 169], "token_strs": None}
    chat = {"messages": [{"role": "user", "content": "a"}], "return_token_strs": True}
    out = (await client.post("/tokenize", json=chat)).json()
    assert out["tokens"] == list(b"<user>a\n<assistant>") and len(out["token_strs"]) == out["count"]
    back = (await client.post("/detokenize", json={"model": MODEL, "tokens": [BOS, 104, 195, 169]})).json()
    assert back == {"prompt": "hé"}
    _error(await client.post("/detokenize", json={"tokens": [999]}), 400)
    _error(await client.post("/tokenize", json={}), 400)


async def test_models_health_version(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    models = (await client.get("/v1/models")).json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [MODEL]
    assert models["data"][0]["max_model_len"] == 256
    assert (await client.get("/health")).status_code == 200
    assert (await client.get("/health/ready")).status_code == 200
    engine.ready = False
    _error(await client.get("/health/ready"), 503)
    assert "version" in (await client.get("/version")).json()


async def test_served_model_names() -> None:
    app = _app(FakeEngine(), served_model_names=["alias", "other"])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        assert [m["id"] for m in (await c.get("/v1/models")).json()["data"]] == ["alias", "other"]
        ok = await c.post("/v1/chat/completions", json=_chat(model="other", max_tokens=1))
        assert ok.json()["model"] == "other"
        _error(await c.post("/v1/chat/completions", json=_chat(max_tokens=1)), 404)  # MODEL not served


# ----------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": "hot"}, "temperature"),
        ({"messages": "hi"}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "image_url"),
        ({"n": 0}, "n must be"),
        ({"logprobs": False, "top_logprobs": 2}, "top_logprobs"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"9999": 1}}, "out of vocabulary"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"messages": [{"role": "assistant", "content": "x"}]}, "chat template"),
    ],
)
async def test_chat_400(client: httpx.AsyncClient, body: dict[str, Any], needle: str) -> None:
    err = _error(await client.post("/v1/chat/completions", json={**_chat(), **body}), 400)
    assert needle in err["message"]
    assert err["type"] == "BadRequestError" and err["code"] == 400


async def test_param_names_field(client: httpx.AsyncClient) -> None:
    err = _error(await client.post("/v1/chat/completions", json=_chat(top_p=1.5)), 400)
    assert err["param"] == "top_p"
    err = _error(await client.post("/v1/chat/completions", json=_chat(temperature="hot")), 400)
    assert err["param"] == "temperature" and "'hot'" in err["message"]


async def test_prompt_too_long(client: httpx.AsyncClient) -> None:
    err = _error(await client.post("/v1/completions", json={"prompt": "x" * 200, "max_tokens": 100}), 400)
    assert "maximum context length is 256 tokens" in err["message"]
    assert "301 tokens (201 in the messages, 100 in the completion)" in err["message"]
    err = _error(await client.post("/v1/completions", json={"prompt": "x" * 300, "max_tokens": None}), 400)
    assert "256" in err["message"] and "301 input tokens" in err["message"]


async def test_completion_400s(client: httpx.AsyncClient) -> None:
    for body in [
        {"prompt": []},
        {"prompt": [[]]},
        {"prompt": [1, "a"]},
        {"prompt": "x", "logprobs": 50},
        {"prompt": [300]},
        {},
        {"prompt": "x", "stop": 5},
    ]:
        _error(await client.post("/v1/completions", json=body), 400)


async def test_malformed_json(client: httpx.AsyncClient) -> None:
    resp = await client.post(
        "/v1/chat/completions", content=b'{"model": "x", ', headers={"content-type": "application/json"}
    )
    assert "Malformed JSON" in _error(resp, 400)["message"]
    assert _error(await client.post("/v1/completions", content=b"[1, 2]"), 400)


async def test_unknown_model_and_route(client: httpx.AsyncClient) -> None:
    err = _error(await client.post("/v1/chat/completions", json=_chat(model="gpt-9")), 404)
    assert err["message"] == "The model `gpt-9` does not exist."
    assert err["type"] == "NotFoundError"
    _error(await client.post("/v1/completions", json={"model": "gpt-9", "prompt": "x"}), 404)
    _error(await client.get("/v1/nothing"), 404)


async def test_api_keys() -> None:
    app = _app(FakeEngine(), api_keys=["k1", "sekret"])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        assert (await c.get("/health")).status_code == 200
        _error(await c.get("/v1/models"), 401)
        _error(await c.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        _error(await c.get("/v1/models", headers={"Authorization": "Basic sekret"}), 401)
        _error(await c.post("/tokenize", json={"prompt": "x"}), 401)
        ok = await c.get("/v1/models", headers={"Authorization": "Bearer sekret"})
        assert ok.status_code == 200


async def test_engine_error_midway_is_reported(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    async def boom(*args: Any, **kwargs: Any) -> AsyncIterator[RequestOutput]:
        raise RuntimeError("engine fell over")
        yield  # pragma: no cover

    engine.add_request = boom  # type: ignore[method-assign]
    _error(await client.post("/v1/chat/completions", json=_chat()), 500)
    events = _events((await client.post("/v1/chat/completions", json=_chat(stream=True))).text)
    assert events[-1]["error"]["code"] == 500


async def test_one_log_line_per_request(client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="pagoda.services.gateway.server"):
        await client.post("/v1/chat/completions", json=_chat(max_tokens=2))
        await client.post("/v1/chat/completions", json=_chat(top_p=5))
    lines = [r.getMessage() for r in caplog.records if r.name == "pagoda.services.gateway.server"]
    assert len(lines) == 2
    assert "chatcmpl-" in lines[0] and "status=200" in lines[0] and "completion_tokens=2" in lines[0]
    assert "status=400" in lines[1]


# ------------------------------------------------------------------------------ client disconnect


@pytest.mark.parametrize("spec_version", ["2.3", "2.4"])
async def test_client_disconnect_while_streaming_aborts(spec_version: str) -> None:
    """ASGI < 2.4: the server sees http.disconnect; >= 2.4: send() raises OSError."""
    engine = FakeEngine(step_delay=0.01)
    app = _app(engine)
    body = json.dumps(_chat(stream=True, max_tokens=200)).encode()
    sent: list[bytes] = []
    disconnected = asyncio.Event()
    body_given = False

    async def receive() -> Message:
        nonlocal body_given
        if not body_given:
            body_given = True
            return {"type": "http.request", "body": body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            if disconnected.is_set() and spec_version == "2.4":
                raise OSError("connection reset")
            sent.append(message["body"])
            if len(sent) >= 3:
                disconnected.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": spec_version},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1),
        "server": ("test", 80),
    }
    await asyncio.wait_for(app(scope, receive, send), timeout=5)
    for _ in range(50):
        if engine.requests and engine.requests[0][0] in engine.aborted:
            break
        await asyncio.sleep(0.01)
    rid = engine.requests[0][0]
    assert rid in engine.aborted and rid in engine.closed_early
    assert len(sent) < 20  # stopped well before 200 tokens


async def test_client_disconnect_non_streaming_aborts() -> None:
    engine = FakeEngine(step_delay=0.01)
    body = json.dumps(_chat(max_tokens=200)).encode()
    messages: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> Message:
        if messages:
            return messages.pop()
        await asyncio.sleep(0.05)  # a few tokens in, the client goes away
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        pass

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1),
        "server": ("test", 80),
    }
    await asyncio.wait_for(_app(engine)(scope, receive, send), timeout=2)
    await asyncio.sleep(0.02)
    rid = engine.requests[0][0]
    assert rid in engine.aborted and rid in engine.closed_early


# ---------------------------------------------------------------------------------------- openai SDK


async def test_sdk_chat(sdk: openai.AsyncOpenAI) -> None:
    resp = await sdk.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=5,
        n=2,
        logprobs=True,
        top_logprobs=1,
    )
    assert [c.message.content for c in resp.choices] == ["Hello", "Bello"]
    assert resp.usage is not None and resp.usage.completion_tokens == 10
    assert resp.usage.prompt_tokens_details is not None
    assert resp.usage.prompt_tokens_details.cached_tokens == 4
    assert resp.choices[0].logprobs is not None and resp.choices[0].logprobs.content is not None
    assert resp.choices[0].logprobs.content[0].top_logprobs[0].token == "H"

    stream = await sdk.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        stream=True,
        stop=["world"],
        stream_options={"include_usage": True},
    )
    text, usage = "", None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        usage = chunk.usage or usage
    assert text == "Hello " and usage is not None and usage.total_tokens > 0


async def test_sdk_completions(sdk: openai.AsyncOpenAI) -> None:
    resp = await sdk.completions.create(model=MODEL, prompt=["a", "b"], max_tokens=3, echo=True, logprobs=1)
    assert [c.text for c in resp.choices] == ["aHel", "bHel"]
    assert resp.choices[0].logprobs is not None and resp.choices[0].logprobs.tokens == ["H", "e", "l"]
    stream = await sdk.completions.create(model=MODEL, prompt="a", max_tokens=4, stream=True)
    assert "".join([c.choices[0].text async for c in stream if c.choices]) == "Hell"


async def test_sdk_models_and_errors(sdk: openai.AsyncOpenAI) -> None:
    assert [m.id async for m in sdk.models.list()] == [MODEL]
    with pytest.raises(openai.BadRequestError) as bad:
        await sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], top_p=2)
    assert "top_p" in str(bad.value)
    with pytest.raises(openai.NotFoundError):
        await sdk.completions.create(model="nope", prompt="x")


async def test_sdk_auth() -> None:
    async with _sdk(_app(FakeEngine(), api_keys=["k"]), api_key="bad") as c:
        with pytest.raises(openai.AuthenticationError):
            await c.models.list()
    async with _sdk(_app(FakeEngine(), api_keys=["k"]), api_key="k") as c:
        assert [m.id async for m in c.models.list()] == [MODEL]


# ---------------------------------------------------------------------------------- -inf logprobs


async def test_minus_inf_logprobs_serialize_as_minus_9999(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    engine.inf_logprobs = True
    resp = await client.post("/v1/chat/completions", json=_chat(max_tokens=2, logprobs=True, top_logprobs=3))
    assert resp.status_code == 200 and "Infinity" not in resp.text
    tops = resp.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    assert [t["logprob"] for t in tops] == [-0.5, -1.5, -9999.0]
    stream = await client.post(
        "/v1/completions", json={"prompt": "x", "max_tokens": 2, "logprobs": 3, "stream": True}
    )
    events = _events(stream.text)  # every event is valid JSON
    top = next(c["logprobs"]["top_logprobs"][0] for e in events for c in e["choices"] if c["logprobs"])
    assert top["I"] == -9999.0


# ------------------------------------------------------------------------------ a Frontend directly


class FakeFrontend:
    """A Frontend that does not tokenize like the server's tokenizer: every prompt becomes
    `prompt_ids`, so usage and detokenization must come from Submitted. `reject` may refuse a
    prompt with an APIError. Outputs come from a FakeEngine."""

    model_name = MODEL
    max_model_len = 256
    pooler = None  # it generates

    def __init__(self, prompt_ids: list[int] | None = None, reject: Any = None) -> None:
        self.tokenizer = FakeTokenizer()
        self.default_sampling: dict[str, float] = {"temperature": 0.25}
        self.engine = FakeEngine()
        self.prompt_ids = prompt_ids or list(b"0123456789")
        self.reject = reject
        self.submits: list[tuple[str, PromptInput, SamplingParams, dict[str, Any]]] = []
        self.aborted: list[str] = []

    async def submit(
        self,
        request_id: str,
        prompt: PromptInput,
        params: SamplingParams,
        *,
        priority: int = 0,
        cache_salt: str | None = None,
        session_id: str | None = None,
        lora: object = None,
    ) -> Submitted:
        await asyncio.sleep(0)
        assert lora is None, "no adapters here"
        extra = {"priority": priority, "cache_salt": cache_salt, "session_id": session_id}
        self.submits.append((request_id, prompt, params, extra))
        error = self.reject(prompt) if self.reject else None
        if error is not None:
            raise error
        return Submitted(list(self.prompt_ids), self.engine.add_request(request_id, self.prompt_ids, params))

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        await self.engine.abort(request_id)

    def is_ready(self) -> bool:
        return True


def _front_client(frontend: FakeFrontend) -> httpx.AsyncClient:
    app = build_app(cast("Frontend", frontend))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


async def test_frontend_prompt_ids_are_used() -> None:
    front = FakeFrontend(prompt_ids=[BOS, *b"tokenized elsewhere"])
    async with _front_client(front) as c:
        body = (await c.post("/v1/chat/completions", json=_chat(max_tokens=3))).json()
        assert body["usage"]["prompt_tokens"] == 20 and body["choices"][0]["message"]["content"] == "Hel"
        req = {"prompt": [5, 6], "max_tokens": 2, "echo": True}
        out = (await c.post("/v1/completions", json=req)).json()
        assert out["choices"][0]["text"] == "tokenized elsewhereHe"  # echo decodes the accepted ids
        out = (await c.post("/v1/completions", json={**req, "prompt": "given"})).json()
        assert out["choices"][0]["text"] == "givenHe"  # ... or repeats the given text
    request_id, prompt, params, _ = front.submits[0]
    assert request_id.startswith("chatcmpl-")
    assert prompt.messages == [{"role": "user", "content": "Hi"}] and prompt.add_generation_prompt
    assert params.temperature == 0.25  # the frontend's generation defaults
    assert front.submits[1][1].token_ids == [5, 6]
    assert front.submits[2][1].text == "given" and front.submits[2][1].add_special_tokens


async def test_frontend_gets_session_priority_and_salt() -> None:
    front = FakeFrontend()
    async with _front_client(front) as c:
        await c.post("/v1/chat/completions", json=_chat(max_tokens=1, user="u1", priority=3, cache_salt="s"))
        await c.post(
            "/v1/chat/completions", json=_chat(max_tokens=1, user="u1"), headers={"x-session-id": "sess"}
        )
        await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
    assert [s[3] for s in front.submits] == [
        {"priority": 3, "cache_salt": "s", "session_id": "u1"},
        {"priority": 0, "cache_salt": None, "session_id": "sess"},
        {"priority": 0, "cache_salt": None, "session_id": None},
    ]


@pytest.mark.parametrize("status", [400, 503])
@pytest.mark.parametrize("stream", [False, True])
async def test_frontend_refusal_is_a_plain_http_error(status: int, stream: bool) -> None:
    def reject(prompt: PromptInput) -> APIError:
        return APIError(status, "no thanks", param="messages" if status == 400 else None)

    async with _front_client(FakeFrontend(reject=reject)) as c:
        resp = await c.post("/v1/chat/completions", json=_chat(stream=stream))
        err = _error(resp, status)
        assert resp.headers["content-type"].startswith("application/json")
        assert err["message"] == "no thanks" and err["code"] == status
        assert err["type"] == ("BadRequestError" if status == 400 else "ServiceUnavailableError")
        resp = await c.post("/v1/completions", json={"prompt": "x", "stream": stream})
        _error(resp, status)


async def test_frontend_refusal_of_one_prompt_releases_the_others() -> None:
    def reject(prompt: PromptInput) -> APIError | None:
        return APIError(400, "bad prompt", param="prompt") if prompt.text == "bad" else None

    front = FakeFrontend(reject=reject)
    async with _front_client(front) as c:
        resp = await c.post("/v1/completions", json={"prompt": ["ok", "bad", "fine"], "max_tokens": 5})
        assert _error(resp, 400)["message"] == "bad prompt"
    ids = sorted(s[0] for s in front.submits)
    assert [i[-2:] for i in ids] == ["-0", "-1", "-2"]
    accepted = {i for i in ids if not i.endswith("-1")}
    assert set(front.aborted) == accepted
    assert accepted <= front.engine.aborted


async def test_frontend_streaming_stop_string_aborts() -> None:
    front = FakeFrontend()
    async with _front_client(front) as c:
        resp = await c.post("/v1/chat/completions", json=_chat(stream=True, stop=["world"]))
        text = "".join(c["delta"].get("content") or "" for e in _events(resp.text) for c in e["choices"])
    assert text == "Hello "
    assert front.aborted == [front.submits[0][0]]


async def test_local_frontend_maps_engine_errors(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    def refuse(*args: Any, **kwargs: Any) -> AsyncIterator[RequestOutput]:
        raise ValueError("prompt is too long for the KV cache")

    engine.add_request = refuse  # type: ignore[method-assign]
    err = _error(await client.post("/v1/chat/completions", json=_chat(stream=True)), 400)
    assert "KV cache" in err["message"]

    def dead(*args: Any, **kwargs: Any) -> AsyncIterator[RequestOutput]:
        raise RuntimeError("the engine stopped after an error")

    engine.add_request = dead  # type: ignore[method-assign]
    engine.ready = False
    _error(await client.post("/v1/chat/completions", json=_chat()), 503)

"""The lean path of a plain streamed call (plain_stream.py) writes exactly the body messages the
general path (streams.py) writes: the same bytes, split into the same ASGI sends, for chat and
completions, tokens read one by one or waiting together, a stop string, a length cut, an error
mid-stream, outputs that end early (an abort, a lost request). It is taken only for plain
calls, and its body skips the middlewares' send wrappers. The one-reader Mailbox that carries a
request's outputs keeps them in order and loses none."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, MutableMapping
from typing import Any, cast

import pytest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pagoda.engine.outputs import RequestOutput
from pagoda.engine.sampling.params import SamplingParams
from pagoda.services.gateway import plain_stream, routes
from pagoda.services.gateway.frontend import Frontend, Submitted
from pagoda.services.gateway.mailbox import Mailbox
from pagoda.services.gateway.server import build_app
from pagoda.services.transport.errors import APIError
from pagoda.services.transport.messages import PromptInput
from tests.unit.test_stream_coalescing import BacklogFrontend

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
HI = [{"role": "user", "content": "Hi"}]


class _SendSpy:
    """A middleware (inside Starlette's own) that records the message types passing its send."""

    def __init__(self, app: ASGIApp, seen: list[str]) -> None:
        self.app, self.seen = app, seen

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def spy(message: Message) -> None:
            self.seen.append(message["type"])
            await send(message)

        await self.app(scope, receive, spy)


async def _run(front: BacklogFrontend, path: str, body: dict[str, Any]) -> tuple[list[Message], list[str]]:
    """The body messages the server got, and the message types the app's middlewares saw (a spy
    declared to watch only the response start)."""
    app = build_app(cast("Frontend", front))
    seen: list[str] = []
    app.add_middleware(_SendSpy, seen=seen)
    assert isinstance(app, plain_stream.GatewayApp)
    app.start_only |= {_SendSpy}
    return await _run_app(app, path, body), seen


async def _run_app(app: ASGIApp, path: str, body: dict[str, Any]) -> list[Message]:
    """The body messages the server got for one request."""
    sent: list[Message] = []
    requested = False

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
        await asyncio.Event().wait()  # the client stays
        raise AssertionError("unreachable")

    async def send(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.body":
            sent.append(dict(message))

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"host", b"test")],
        "client": ("127.0.0.1", 1), "server": ("test", 80),
    }  # fmt: skip
    await asyncio.wait_for(app(scope, receive, send), 10)
    return sent


@pytest.fixture
def fixed_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every call gets the same id and creation time, so two runs can be compared byte for byte."""
    monkeypatch.setattr(uuid, "uuid4", lambda: uuid.UUID(int=7))
    monkeypatch.setattr(time, "time", lambda: 1_700_000_000.0)


async def _both(
    monkeypatch: pytest.MonkeyPatch, path: str, body: dict[str, Any], make: Callable[[], BacklogFrontend]
) -> tuple[list[Message], list[Message]]:
    """(lean path's body messages, general path's), each run with a frontend from `make`; the lean
    path ran once, for its own run only, and its body skipped the middleware's send."""
    loops = [0]
    events = plain_stream.PlainSSEResponse._events

    async def counted(self: plain_stream.PlainSSEResponse, *args: Any) -> None:
        loops[0] += 1
        await events(self, *args)

    monkeypatch.setattr(plain_stream.PlainSSEResponse, "_events", counted)
    lean, lean_seen = await _run(make(), path, body)
    with monkeypatch.context() as m:
        m.setattr(routes, "is_plain", lambda call, req: False)
        general, general_seen = await _run(make(), path, body)
    assert loops[0] == 1
    assert general_seen.count("http.response.body") == len(general) >= 1
    assert lean_seen == ["http.response.start"]
    return lean, general


@pytest.mark.usefixtures("fixed_ids")
@pytest.mark.parametrize("backlog", [False, True])
@pytest.mark.parametrize(
    ("path", "body"),
    [
        (CHAT, {"messages": HI}),
        (CHAT, {"messages": HI, "stream_options": {"include_usage": True}, "stop": ["va?"]}),
        (COMPLETIONS, {"prompt": "Hi", "max_tokens": 9}),
        (COMPLETIONS, {"prompt": "Hi", "stream_options": {"include_usage": True}}),
    ],
)
async def test_lean_path_writes_what_the_general_path_writes(
    monkeypatch: pytest.MonkeyPatch, path: str, body: dict[str, Any], backlog: bool
) -> None:
    lean, general = await _both(monkeypatch, path, {**body, "stream": True}, lambda: BacklogFrontend(backlog))
    assert lean == general
    data = b"".join(m["body"] for m in lean)
    assert data.endswith(b"data: [DONE]\n\n") and data.count(b"data: ") >= 6
    assert lean[-1]["more_body"] is False and all(m["more_body"] for m in lean[:-1])
    if backlog:  # what waited went out together: role (chat), content, then the end
        assert len(lean) <= 3
    else:  # one send per event, the last token's with the end
        assert len(lean) >= data.count(b"data: ") - 3
    if "stop" in body:
        assert b'"finish_reason":"stop","stop_reason":"va?"' in data and "🙂" not in data.decode()


@pytest.mark.usefixtures("fixed_ids")
@pytest.mark.parametrize("backlog", [False, True])
async def test_an_error_mid_stream_is_the_same_error_event(
    monkeypatch: pytest.MonkeyPatch, backlog: bool
) -> None:
    body = {"messages": HI, "stream": True}
    lean, general = await _both(monkeypatch, CHAT, body, lambda: BacklogFrontend(backlog, fail_after=5))
    assert lean == general
    data = b"".join(m["body"] for m in lean)
    assert b'"content":"Hello"' in data or b'"content":"o"' in data
    assert b'"error"' in data and b"RuntimeError" in data and data.endswith(b"data: [DONE]\n\n")


class _EndsEarly(BacklogFrontend):
    """The outputs stop after five without finishing: silently (the engine let the request go),
    or with an APIError (as a lost worker's request ends)."""

    def __init__(self, backlog: bool, error: bool) -> None:
        super().__init__(backlog)
        self.error = error

    async def submit(
        self, request_id: str, prompt: PromptInput, params: SamplingParams, **kw: Any
    ) -> Submitted:
        submitted = await super().submit(request_id, prompt, params, **kw)
        outputs, error = submitted.outputs, self.error

        async def five() -> AsyncIterator[RequestOutput]:
            for _ in range(5):
                yield await anext(outputs)
            if error:
                raise APIError(503, "The request was lost: worker w1 stopped sending heartbeats.")

        return Submitted(submitted.prompt_token_ids, five(), backlog=submitted.backlog)


@pytest.mark.usefixtures("fixed_ids")
@pytest.mark.parametrize("backlog", [False, True])
@pytest.mark.parametrize("error", [False, True])
async def test_outputs_that_end_early_end_the_same_way(
    monkeypatch: pytest.MonkeyPatch, backlog: bool, error: bool
) -> None:
    body = {"prompt": "Hi", "stream": True}
    lean, general = await _both(monkeypatch, COMPLETIONS, body, lambda: _EndsEarly(backlog, error))
    assert lean == general
    data = b"".join(m["body"] for m in lean)
    assert data.endswith(b"data: [DONE]\n\n")
    if error:
        assert b'"code": 503' in data and b"heartbeats" in data
    else:
        assert b'"finish_reason":"abort"' in data


@pytest.mark.usefixtures("fixed_ids")
@pytest.mark.parametrize(
    "body",
    [
        {"messages": HI, "n": 2},
        {"messages": HI, "logprobs": True},
        {"prompt": "Hi", "echo": True},
        {"prompt": ["Hi", "Ho"]},
    ],
)
async def test_other_calls_take_the_general_path(
    monkeypatch: pytest.MonkeyPatch, body: dict[str, Any]
) -> None:
    calls: list[bool] = []
    is_plain = plain_stream.is_plain

    def spy(call: Any, req: Any) -> bool:
        calls.append(is_plain(call, req))
        return calls[-1]

    monkeypatch.setattr(routes, "is_plain", spy)
    path = CHAT if "messages" in body else COMPLETIONS
    sent, seen = await _run(BacklogFrontend(False), path, {**body, "stream": True})
    assert calls == [False]
    assert seen.count("http.response.body") == len(sent) and b"".join(m["body"] for m in sent).endswith(
        b"data: [DONE]\n\n"
    )


async def test_a_middleware_that_may_read_bodies_sees_every_body() -> None:
    app = build_app(cast("Frontend", BacklogFrontend(False)))
    seen: list[str] = []
    app.add_middleware(_SendSpy, seen=seen)  # not declared start-only
    sent = await _run_app(app, CHAT, {"messages": HI, "stream": True})
    assert seen.count("http.response.body") == len(sent) >= 2


async def test_mailbox_keeps_order_and_an_item_put_while_a_get_is_cancelled() -> None:
    box: Mailbox[int] = Mailbox()
    getter = asyncio.create_task(box.get())
    await asyncio.sleep(0)
    box.put_nowait(1)
    box.put_nowait(2)
    assert await getter == 1 and not box.empty()
    assert await box.get() == 2 and box.empty()
    waiting = asyncio.create_task(box.get())
    await asyncio.sleep(0)
    box.put_nowait(3)
    waiting.cancel()  # the item arrived, but the reader gave up: the item stays
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert box.qsize() == 1
    assert await asyncio.wait_for(box.get(), 1) == 3
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(box.get(), 0.01)
    box.put_nowait(4)
    assert await box.get() == 4

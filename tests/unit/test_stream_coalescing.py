"""A stream whose outputs had already arrived (the gateway fell behind) writes them in one send:
the same SSE events, one per token, in fewer ASGI body messages; an error still follows the
events read before it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, MutableMapping
from typing import Any, cast

import pytest

from pagoda.engine.outputs import RequestOutput
from pagoda.engine.sampling.params import SamplingParams
from pagoda.services.gateway.frontend import Frontend, Submitted
from pagoda.services.gateway.server import build_app
from pagoda.services.transport.messages import PromptInput
from tests.fakes import SCRIPT
from tests.unit.test_openai_server import FakeFrontend


class BacklogFrontend(FakeFrontend):
    """All of a request's outputs arrive before the stream reads the first (`backlog` says so);
    `fail_after` ends them with an error instead of the finishing output."""

    def __init__(self, backlog: bool, fail_after: int | None = None) -> None:
        super().__init__()
        self.backlog, self.fail_after = backlog, fail_after

    async def submit(
        self, request_id: str, prompt: PromptInput, params: SamplingParams, **kw: Any
    ) -> Submitted:
        outs = [o async for o in self.engine.add_request(request_id, self.prompt_ids, params)]
        if self.fail_after is not None:
            outs = outs[: self.fail_after]
        left = [len(outs)]

        async def read() -> AsyncIterator[RequestOutput]:
            for out in outs:
                left[0] -= 1
                yield out
            if self.fail_after is not None:
                raise RuntimeError("the worker went away")

        backlog = (lambda: left[0] > 0 or self.fail_after is not None) if self.backlog else None
        return Submitted(list(self.prompt_ids), read(), backlog=backlog)


async def _bodies(front: FakeFrontend, path: str, body: dict[str, Any]) -> list[bytes]:
    """The http.response.body messages of one request, driven through the ASGI app directly."""
    app = build_app(cast("Frontend", front))
    sent: list[bytes] = []
    requested = asyncio.Event()

    async def receive() -> dict[str, Any]:
        if not requested.is_set():
            requested.set()
            return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
        await asyncio.Event().wait()  # the client stays
        raise AssertionError("unreachable")

    async def send(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            sent.append(message["body"])

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"host", b"test")],
        "client": ("127.0.0.1", 1), "server": ("test", 80),
    }  # fmt: skip
    await asyncio.wait_for(app(scope, receive, send), 10)
    return sent


def _events(bodies: list[bytes]) -> list[Any]:
    text = b"".join(bodies).decode()
    return [json.loads(e[6:]) if e != "data: [DONE]" else "[DONE]" for e in text.split("\n\n") if e]


def _strip(events: list[Any]) -> list[Any]:
    return [
        {k: v for k, v in e.items() if k not in ("id", "created")} if isinstance(e, dict) else e
        for e in events
    ]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "stream": True}),
        ("/v1/completions", {"prompt": "Hi", "stream": True, "stream_options": {"include_usage": True}}),
    ],
)
async def test_backlog_goes_out_in_one_write(path: str, body: dict[str, Any]) -> None:
    body = {**body, "max_tokens": 64}
    one_by_one = await _bodies(BacklogFrontend(backlog=False), path, body)
    together = await _bodies(BacklogFrontend(backlog=True), path, body)
    assert _strip(_events(together)) == _strip(_events(one_by_one))  # the same events
    tokens = len(SCRIPT.encode())
    content = [e for e in _events(one_by_one) if isinstance(e, dict) and e["choices"]]
    assert len(content) >= tokens // 2  # one event per token (or per complete character)
    assert len(one_by_one) >= len(content) and len(together) <= 4  # role, all content, usage, DONE


async def test_error_after_backlog_keeps_the_events_before_it() -> None:
    body = {"messages": [{"role": "user", "content": "Hi"}], "stream": True, "max_tokens": 64}
    events = _events(await _bodies(BacklogFrontend(backlog=True, fail_after=5), "/v1/chat/completions", body))
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-2] if isinstance(e, dict))
    assert text == "Hello" and "error" in events[-2] and events[-1] == "[DONE]"

"""A plain stream over the bus writes each token from the reply consumer (`BusFrontend`'s sink,
plain_stream's `_direct_sink`) without waking its task: the body messages are byte for byte what
the stream's own loop writes, token by token; it is taken for every token but the last, and only
while it is safe (uvicorn's flow control not paused, no stop string, the stream waiting with
nothing queued); a send that waits anyway ends that stream with an error event, not the others."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
import uuid
from types import SimpleNamespace
from typing import Any, cast

import pytest
from starlette.types import Message
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from pagoda.engine import Tokenizer
from pagoda.services.gateway import plain_stream
from pagoda.services.gateway.bus_frontend import BusFrontend
from pagoda.services.gateway.plain_stream import ChunkWriter
from pagoda.services.gateway.server import build_app
from pagoda.services.transport.bus import Bus, Delivery
from pagoda.services.transport.messages import (
    Assigned,
    StepOutputs,
    TokenDelta,
    TokenizeRequest,
    decode,
    encode,
)
from tests.fakes import MODEL, SCRIPT, FakeTokenizer

TOKENS = list(SCRIPT.encode())  # byte-level: multi-byte characters span several tokens
PROMPT = list(b"Hi there")
WORKER = "w0"


class _Cycle:
    """What the plain path needs of uvicorn's HTTP cycle: a bound `send` whose owner has a `flow`
    with `write_paused` (its send waits while writing is paused)."""

    def __init__(self) -> None:
        self.flow = SimpleNamespace(write_paused=False)
        self.writable = asyncio.Event()
        self.writable.set()
        self.bodies: list[Message] = []

    async def send(self, message: Message) -> None:
        if self.flow.write_paused:
            await self.writable.wait()
        if message["type"] == "http.response.body":
            self.bodies.append(dict(message))


class _Bus:
    """The broker, as far as a gateway needs one here: each request is taken at once (the
    scheduler's first `Assigned`, with the prompt ids)."""

    def __init__(self) -> None:
        self.front: BusFrontend | None = None

    async def publish(self, queue: str, body: bytes, headers: dict[str, str] | None = None) -> None:
        msg = decode(body)
        if isinstance(msg, TokenizeRequest):
            assert self.front is not None
            accepted = Assigned(request_id=msg.request_id, worker_id=WORKER, prompt_token_ids=PROMPT)
            asyncio.get_running_loop().call_soon(
                lambda: asyncio.ensure_future(self.front._on_reply(Delivery(encode(accepted))))  # type: ignore[union-attr]
            )

    async def declare_work_queue(self, name: str) -> None:
        pass

    async def declare_reply_queue(self, name: str) -> str:
        return name

    def on_connection_lost(self, callback: Any) -> None:
        pass


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def _delta(request_id: str, token: int, num_output: int, last: bool) -> TokenDelta:
    return TokenDelta(
        request_id=request_id, index=0, new_token_ids=[token], num_prompt_tokens=len(PROMPT),
        num_cached_tokens=0, num_output_tokens=num_output, finished=last,
        finish_reason="length" if last else None,
    )  # fmt: skip


async def _serve(
    body: dict[str, Any], streams: int = 2, pause_at: int | None = None
) -> tuple[list[list[Message]], list[bool]]:
    """Each stream's body messages, and what the sink answered, one token per stream per step
    (the steps as a worker sends them); `pause_at`: the first stream's writing is paused from
    that step until three steps later."""
    bus = _Bus()
    tokenizer = cast("Tokenizer", FakeTokenizer())
    front = BusFrontend(cast("Bus", bus), tokenizer, model_name=MODEL, max_model_len=256)
    bus.front = front
    taken: list[bool] = []
    app = build_app(front)
    cycles = [_Cycle() for _ in range(streams)]
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"

    async def one(cycle: _Cycle) -> None:
        requested = False

        async def receive() -> dict[str, Any]:
            nonlocal requested
            if not requested:
                requested = True
                return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
            await asyncio.Event().wait()  # the client stays
            raise AssertionError("unreachable")

        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
            "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
            "headers": [(b"content-type", b"application/json"), (b"host", b"test")],
            "client": ("127.0.0.1", 1), "server": ("test", 80),
        }  # fmt: skip
        await app(scope, receive, cycle.send)

    tasks = [asyncio.create_task(one(c)) for c in cycles]
    for _ in range(1000):
        if len(front._pending) == streams and all(p.accepted.done() for p in front._pending.values()):
            break
        assert not any(t.done() for t in tasks), [c.bodies for c in cycles]
        await asyncio.sleep(0.001)
    await _settle()
    for pending in front._pending.values():  # record what each sink answers
        sink = pending.sink
        if sink is not None:

            def spy(*out: Any, sink: Any = sink) -> bool:
                taken.append(sink(*out))
                return taken[-1]

            pending.sink = spy
    ids = list(front._pending)
    for step, token in enumerate(TOKENS):
        if step == pause_at:
            cycles[0].flow.write_paused = True
            cycles[0].writable.clear()
        if pause_at is not None and step == pause_at + 3:
            cycles[0].flow.write_paused = False
            cycles[0].writable.set()
        last = step == len(TOKENS) - 1
        deltas = [_delta(rid, token, step + 1, last) for rid in ids]
        await front._on_reply(Delivery(encode(StepOutputs(worker_id=WORKER, deltas=deltas))))
        await _settle()
    await asyncio.wait_for(asyncio.gather(*tasks), 10)
    return [c.bodies for c in cycles], taken


def _same_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    count = itertools.count(1)
    monkeypatch.setattr(uuid, "uuid4", lambda: uuid.UUID(int=next(count)))


async def _both(body: dict[str, Any], monkeypatch: pytest.MonkeyPatch, **kw: Any) -> Any:
    """(direct run, loop-only run): the second with no flow control to read, so no sink. Both
    runs give their requests the same ids and creation time."""
    monkeypatch.setattr(time, "time", lambda: 1_700_000_000.0)
    _same_ids(monkeypatch)
    direct = await _serve(body, **kw)
    _same_ids(monkeypatch)
    with monkeypatch.context() as m:
        m.setattr(plain_stream, "server_flow", lambda send: None)
        loop_only = await _serve(body, **kw)
    assert loop_only[1] == []  # no sink was installed
    return direct, loop_only


@pytest.mark.parametrize(
    "body",
    [
        {"messages": [{"role": "user", "content": "Hi"}], "stream": True},
        {"prompt": "Hi", "stream": True, "stream_options": {"include_usage": True}},
    ],
)
async def test_the_consumer_writes_each_token_as_the_loop_would(
    monkeypatch: pytest.MonkeyPatch, body: dict[str, Any]
) -> None:
    (direct, taken), (loop_only, _) = await _both({**body, "max_tokens": len(TOKENS)}, monkeypatch)
    assert direct == loop_only
    assert all(taken) and len(taken) == 2 * (len(TOKENS) - 1)  # all but each stream's last token
    data = b"".join(m["body"] for m in direct[0])
    text = "".join(
        json.loads(line[6:])["choices"][0].get("delta", {}).get("content") or ""
        if "messages" in body
        else json.loads(line[6:])["choices"][0]["text"]
        for line in data.decode().split("\n\n")
        if line.startswith("data: {") and json.loads(line[6:])["choices"]
    )
    assert text == SCRIPT and data.endswith(b"data: [DONE]\n\n")
    # one send per token that completes text (a multi-byte character's first bytes complete none)
    assert len(direct[0]) < len(TOKENS) and direct[0][-1]["more_body"] is False


async def test_paused_writing_queues_the_tokens_for_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    body = {"messages": [{"role": "user", "content": "Hi"}], "stream": True}
    (direct, taken), (loop_only, _) = await _both(body, monkeypatch, pause_at=4)
    assert direct == loop_only
    assert taken.count(False) >= 1 and taken.count(True) > len(TOKENS)  # the other stream: all taken
    assert len(direct[0]) < len(direct[1])  # what waited went out in fewer sends


async def test_a_stop_string_keeps_the_stream_on_its_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    body = {"messages": [{"role": "user", "content": "Hi"}], "stream": True, "stop": ["va?"]}
    (direct, taken), (loop_only, _) = await _both(body, monkeypatch)
    assert direct == loop_only and taken == []
    assert b'"finish_reason":"stop","stop_reason":"va?"' in b"".join(m["body"] for m in direct[0])


async def test_a_send_that_waits_anyway_ends_only_its_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    """A server whose send waits although its flow control says it would not: that stream ends
    with an error event; the other stream's tokens all arrive."""
    original = _Cycle.send
    calls = [0]

    async def odd(self: _Cycle, message: Message) -> None:
        calls[0] += 1
        if calls[0] == 12:  # some stream's body, mid-stream
            await asyncio.sleep(0)
        await original(self, message)

    monkeypatch.setattr(_Cycle, "send", odd)
    (first, second), taken = await _serve({"prompt": "Hi", "stream": True})
    ends = [b"".join(m["body"] for m in bodies) for bodies in (first, second)]
    broken = [d for d in ends if b'"error"' in d]
    assert len(broken) == 1 and b"RuntimeError" in broken[0] and broken[0].endswith(b"data: [DONE]\n\n")
    whole = next(d for d in ends if b'"error"' not in d)
    text = "".join(
        json.loads(line[6:])["choices"][0]["text"]
        for line in whole.decode().split("\n\n")
        if line.startswith("data: {") and json.loads(line[6:])["choices"]
    )
    assert text == SCRIPT and any(taken)


class _Transport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return False


def _uvicorn_cycle(method: str = "POST") -> tuple[RequestResponseCycle, _Transport]:
    transport = _Transport()
    scope: Any = {"type": "http", "method": method, "http_version": "1.1", "path": "/", "query_string": b""}
    cycle = RequestResponseCycle(
        scope, cast("Any", transport), FlowControl(cast("Any", transport)), logging.getLogger("t"),
        logging.getLogger("t"), False, [], asyncio.Event(), False, True, lambda: None,
    )  # fmt: skip
    return cycle, transport


async def test_the_chunk_writer_writes_what_uvicorns_own_send_writes() -> None:
    """The consumer's direct write (ChunkWriter) puts on the wire exactly what uvicorn's httptools
    `send` puts there for the same body messages; it is offered only for that `send` with a
    chunked response started, and says `closed` once the client has gone or the response ended."""
    start: Message = {
        "type": "http.response.start",
        "status": 200,
        "headers": [(b"content-type", b"text/event-stream")],
    }
    chunks = [b"data: {}\n\n", "data: \u00e9\u4e2d\n\n".encode(), b"x" * 300]
    by_send, wire = _uvicorn_cycle()
    assert ChunkWriter.of(by_send.send) is None  # no response started yet
    await by_send.send(start)
    for chunk in chunks:
        await by_send.send({"type": "http.response.body", "body": chunk, "more_body": True})
    direct, direct_wire = _uvicorn_cycle()
    await direct.send(start)
    writer = ChunkWriter.of(direct.send)
    assert writer is not None and not writer.closed()
    for chunk in chunks:
        writer.write(chunk)
    assert direct_wire.writes == wire.writes and len(wire.writes) == 1 + len(chunks)
    direct.disconnected = True
    assert writer.closed()
    await direct.send({"type": "http.response.body", "body": b"", "more_body": False})

    sized, _ = _uvicorn_cycle()  # a response with a length is not chunked: its send frames nothing
    await sized.send({**start, "headers": [(b"content-length", b"3")]})
    assert ChunkWriter.of(sized.send) is None
    head, _ = _uvicorn_cycle("HEAD")
    await head.send(start)
    assert ChunkWriter.of(head.send) is None
    assert ChunkWriter.of(_Cycle().send) is None  # not uvicorn's

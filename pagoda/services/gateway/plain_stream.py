"""The lean SSE path of a plain streamed call: one prompt, n = 1, no logprobs, tools, reasoning
or echo (the case most clients send).

The general path (streams.py) passes each token through five async generators (the reply
generator, `Call.deltas`, `coalesced`, the call's events, `stream_errors`) and Starlette's send
wrappers. Here one loop reads the request's outputs, detokenizes them (`SubRequest.process`),
builds each chunk from the call's `ChunkTemplate` and writes it with the server's own `send`
(`RAW_SEND`: the middlewares between only watch the response start, which still goes through
them). While the loop waits with nothing queued, the reply consumer writes a token's chunk itself
through the stream's sink (`_direct_sink`), straight to the transport of uvicorn's httptools cycle
(`ChunkWriter`). Every event, and the HTTP chunk framing, is what the general path writes: tokens that
arrived together go out in one send, the last token goes out with the usage chunk and [DONE],
an error after the first byte becomes an error event, and a client that goes away cancels the
loop, which aborts the request (`SSEResponse`). tests/unit/test_plain_stream.py holds the two
paths to the same bytes.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Callable, Coroutine
from typing import Any, cast

import anyio
from fastapi import FastAPI
from starlette.types import Message, Receive, Scope, Send

from pagoda.services.gateway.calls import Call, logger
from pagoda.services.gateway.choices import SubRequest
from pagoda.services.gateway.frontend import Sink
from pagoda.services.gateway.protocol import (
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionRequest,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    UsageInfo,
)
from pagoda.services.gateway.sse_chunks import DONE, ChunkTemplate, model_event
from pagoda.services.gateway.streams import SSEResponse, error_chunk
from pagoda.services.transport.errors import APIError

RAW_SEND = "pagoda.raw_send"  # the scope's key for the ASGI server's own `send`


class GatewayApp(FastAPI):
    """FastAPI that notes the server's `send` in each HTTP scope (`RAW_SEND`), so a stream's body
    can skip the middlewares' send wrappers once the response has started through them. Only
    while every middleware added to the app is one of `start_only` (those whose send wrapper
    looks at nothing but `http.response.start`; Starlette's own two are of that kind): one that
    reads or changes bodies (compression, say) keeps every body going through it."""

    def __init__(self, *, start_only: frozenset[type] = frozenset(), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.start_only = start_only

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and all(m.cls in self.start_only for m in self.user_middleware):
            scope[RAW_SEND] = send
        await super().__call__(scope, receive, send)


def is_plain(call: Call, req: ChatCompletionRequest | CompletionRequest) -> bool:
    """The call streams one choice of one prompt as plain content chunks."""
    if len(call.subs) != 1 or len(call.subs[0].choices) != 1:
        return False
    if isinstance(req, ChatCompletionRequest):
        return not req.logprobs and call.tools is None and not call.reasoning
    return req.logprobs is None and not req.echo


class PlainSSEResponse(SSEResponse):
    """The stream of a plain call (`is_plain`), written by one loop."""

    def __init__(self, call: Call, req: ChatCompletionRequest | CompletionRequest) -> None:
        super().__init__(_never(), call)
        self.req = req
        self.chat = isinstance(req, ChatCompletionRequest)
        self.raw_send: Send | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.raw_send = scope.get(RAW_SEND)
        await super().__call__(scope, receive, send)

    async def stream_response(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        raw = self.raw_send or send
        call, sub = self.call, self.call.subs[0]
        status: int | str = "disconnected"
        try:
            await self._events(raw, call, sub)
            status = 200
        except APIError as err:
            status = err.status
            await raw(_body(error_chunk(err), more=False))
        except Exception as err:
            logger.exception("request %s failed while streaming", call.request_id)
            status = 500
            await raw(
                _body(error_chunk(APIError(500, f"Internal server error ({type(err).__name__}).")), False)
            )
        finally:
            with anyio.CancelScope(shield=True):
                await call.release(sub)
            call.log(status)

    async def _events(self, send: Send, call: Call, sub: SubRequest) -> None:
        """The role chunk (chat), each delta's chunk (those already waiting joined in one send),
        then the last delta's chunk with the end. Held chunks go out before an error propagates."""
        created = int(time.time())
        template = ChunkTemplate(self.chat, call.request_id, created, call.model)
        choice = sub.choices[0]
        if self.chat:
            role = ChatCompletionChunkChoice(
                index=choice.index, delta=DeltaMessage(role="assistant", content="")
            )
            await send(_body(self._chunk(created, [role]), more=True))
        backlog: Callable[[], bool] = sub.backlog or _no_backlog
        held: list[bytes] = []
        direct = self._direct_sink(send, call, sub, template, held)
        try:
            try:
                if direct is not None and sub.set_sink is not None:
                    sub.set_sink(direct)
                async for out in sub.outputs:
                    d = sub.process(out)
                    if d is None:
                        if choice.done:
                            break
                        continue
                    if out.new_token_ids:
                        call.token_seen(choice)
                    if d.text or d.logprobs or d.finish_reason is not None:
                        stop_reason = choice.stop_reason if d.finish_reason else None
                        held.append(template.content(choice.index, d.text, d.finish_reason, stop_reason))
                    if d.finish_reason is not None:
                        break  # the last delta: it goes out with the end
                    if held and not backlog():
                        await send(_body(held[0] if len(held) == 1 else b"".join(held), more=True))
                        held.clear()
                else:  # the engine stopped without finishing the choice
                    if not choice.done:
                        choice.finish_reason = "abort"
                        text = choice.stop.flush()
                        held.append(template.content(choice.index, text, "abort", choice.stop_reason))
            finally:
                if direct is not None and sub.set_sink is not None:
                    sub.set_sink(None)
                with anyio.CancelScope(shield=True):
                    await call.release(sub)
        except Exception:
            if held:
                await send(_body(b"".join(held), more=True))
            raise
        usage = self.req.include_usage_in_stream
        held.append(self._chunk(created, [], usage=call.usage()) + DONE if usage else DONE)
        await send(_body(b"".join(held), more=False))

    def _direct_sink(
        self, send: Send, call: Call, sub: SubRequest, template: ChunkTemplate, held: list[bytes]
    ) -> Sink | None:
        """What the reply consumer calls with an unfinished output while this stream waits for
        one: it does what the loop in `_events` does with it (detokenize, a chunk, one send)
        without waking this task, one token per stream per step being the common case. Only
        with uvicorn's own `send` (its flow control says when a send would wait: then the output
        is queued for the loop, which waits) and a choice without stop strings (a stop string
        ends the stream, which is the loop's to do). With uvicorn's httptools cycle the chunk
        goes straight to its transport (`ChunkWriter`)."""
        flow = server_flow(send)
        choice = sub.choices[0]
        if flow is None or choice.stop.stop or sub.set_sink is None:
            return None
        writer = ChunkWriter.of(send)
        index = choice.index

        def sink(ids: list[int], num_output_tokens: int, num_cached_tokens: int) -> bool:
            if flow.write_paused or held or choice.done or (writer is not None and writer.closed()):
                return False
            text = sub.add_plain(choice, ids, num_output_tokens, num_cached_tokens)
            if ids:
                call.token_seen(choice)
            if text:
                chunk = template.content(index, text, None, None)
                if writer is None:
                    send_now(send, _body(chunk, more=True))
                else:
                    writer.write(chunk)
            return True

        return sink

    def _chunk(
        self, created: int, choices: list[ChatCompletionChunkChoice], usage: UsageInfo | None = None
    ) -> bytes:
        call = self.call
        if self.chat:
            return model_event(
                ChatCompletionChunk(
                    id=call.request_id, created=created, model=call.model, choices=choices, usage=usage
                )
            )
        assert not choices
        body = CompletionResponse(
            id=call.request_id, created=created, model=call.model, choices=[], usage=usage
        )
        return model_event(body)


def server_flow(send: Send) -> Any:
    """The flow control of the connection behind `send` when `send` is uvicorn's own (an HTTP
    cycle's, with a `flow` whose `write_paused` is True while the socket's buffer is full), else
    None: with any other server, a send may wait at any time."""
    flow = getattr(getattr(send, "__self__", None), "flow", None)
    return flow if isinstance(getattr(flow, "write_paused", None), bool) else None


class ChunkWriter:
    """Body chunks of a started chunked response written straight to the transport of uvicorn's
    httptools cycle, framed with their length as its `send` frames them (more to come). It spares
    the coroutine, the message and the checks of a `send` per token (~1.5 of the reply consumer's
    ~8 us per token, docs/perf-history.md). Like `send_now`, for a caller that checked the flow
    control; and one that checks `closed` first: that `send` writes nothing once the client has
    gone."""

    __slots__ = ("_cycle", "_transport")

    def __init__(self, cycle: Any) -> None:
        self._cycle = cycle
        self._transport = cycle.transport

    @classmethod
    def of(cls, send: Send) -> ChunkWriter | None:
        """The writer behind `send` when it is that cycle's own and its response is started and
        chunked; else None (write through `send`)."""
        cycle: Any = getattr(send, "__self__", None)
        if type(cycle).__module__ != "uvicorn.protocols.http.httptools_impl":
            return None
        if not (
            cycle.response_started and cycle.chunked_encoding is True and cycle.scope["method"] != "HEAD"
        ):
            return None
        return cls(cycle)

    def closed(self) -> bool:
        return bool(self._cycle.disconnected or self._cycle.response_complete)

    def write(self, body: bytes) -> None:
        self._transport.write(b"%x\r\n%b\r\n" % (len(body), body))


def send_now(send: Send, message: Message) -> None:
    """Run the server's `send` to its end without yielding to the event loop. uvicorn's waits
    only while its flow control has paused writing, which the caller checked; were it to wait
    anyway, the message is not sent and this raises (the stream ends with an error event)."""
    coro = cast("Coroutine[Any, Any, None]", send(message))
    try:
        coro.send(None)
    except StopIteration:
        return
    coro.close()
    raise RuntimeError("the server's send waited although writing was not paused")


def _body(data: bytes, more: bool) -> Message:
    return {"type": "http.response.body", "body": data, "more_body": more}


def _no_backlog() -> bool:
    return False


async def _never() -> AsyncGenerator[bytes, None]:
    """The body iterator Starlette's constructor wants; the plain path never reads it."""
    return
    yield b""  # pragma: no cover

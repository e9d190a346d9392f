"""The SSE side of an OpenAI API call (pagoda.services.gateway.calls runs its requests): chat and
completion chunk streams, tokens that arrived together written in one send, errors after the
first byte as an error event, and the stream's end (usage, [DONE]).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable

import anyio
from fastapi.responses import StreamingResponse
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from pagoda.services.gateway.calls import Call, logger
from pagoda.services.gateway.choices import ChoiceDelta
from pagoda.services.gateway.protocol import (
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionRequest,
    ChatLogprobs,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ReasoningDelta,
    ToolCallsDelta,
    UsageInfo,
)
from pagoda.services.gateway.reasoning import split_reasoning
from pagoda.services.gateway.sse_chunks import DONE, ChunkTemplate, event, model_event
from pagoda.services.gateway.tools import ToolPlan, new_call_id
from pagoda.services.transport.errors import APIError


class SSEResponse(StreamingResponse):
    """An event stream that releases its call's requests however streaming ends (starlette
    otherwise leaves closing the body to garbage collection when the client disconnects, and
    never starts the body at all if the client left before the headers went out)."""

    def __init__(self, content: AsyncIterator[bytes], call: Call) -> None:
        super().__init__(content, media_type="text/event-stream")
        self.call = call

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            with contextlib.suppress(ClientDisconnect):  # the client went away: nothing left to answer
                await super().__call__(scope, receive, send)
        finally:
            await self.call.release_all()
            self.call.log("disconnected")  # only if the stream never got to log its end

    async def stream_response(self, send: Send) -> None:
        """Starlette's loop, except that a body ending with the stream's last event ([DONE])
        closes the response in the same write (uvicorn appends the chunked terminator to it)."""
        try:
            start = {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
            await send(start)
            ended = False
            async for chunk in self.body_iterator:
                data = chunk if isinstance(chunk, bytes | memoryview) else chunk.encode(self.charset)
                ended = data[-len(DONE) :] == DONE
                await send({"type": "http.response.body", "body": data, "more_body": not ended})
            if not ended:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()


def error_chunk(err: APIError) -> bytes:
    return event(json.dumps(err.body())) + DONE


async def stream_errors(
    events: AsyncGenerator[bytes, None], call: Call, error_event: Callable[[APIError], bytes] = error_chunk
) -> AsyncIterator[bytes]:
    """Wraps a stream: an error mid-stream becomes `error_event(err)` (a chat or completion
    stream's error chunk and [DONE] by default; any other failure as a 500); logs one line at
    the end."""
    status: int | str = "disconnected"
    try:
        async for data in events:
            yield data
        status = 200
    except APIError as err:
        status = err.status
        yield error_event(err)
    except Exception as err:
        logger.exception("request %s failed while streaming", call.request_id)
        status = 500
        yield error_event(APIError(500, f"Internal server error ({type(err).__name__})."))
    finally:
        with contextlib.suppress(Exception):
            await events.aclose()
        call.log(status)


async def coalesced(
    call: Call, content: Callable[[ChoiceDelta], bytes], end: Callable[[], bytes] | None = None
) -> AsyncGenerator[bytes, None]:
    """The call's chunks (`content` of each delta; b"": none), one SSE event per delta as before,
    but the events of deltas that were already waiting go out in one write: a gateway that fell
    behind catches up with one send per stream instead of one per token. `end()`: the events
    after the last delta (usage, [DONE]), written with it. An error still sends the events
    before it (and not `end`)."""
    held: list[bytes] = []
    try:
        async with contextlib.aclosing(call.deltas()) as deltas:
            async for d in deltas:
                data = content(d)
                if data:
                    held.append(data)
                if not held or call.backlog():
                    continue
                if end is not None and d.finish_reason is not None and call.finished:
                    continue  # the last delta: it goes out with the end
                yield held[0] if len(held) == 1 else b"".join(held)
                held.clear()
    except Exception:
        if held:
            yield b"".join(held)
        raise
    if end is not None:
        held.append(end())
    if held:
        yield b"".join(held)


def chat_stream(call: Call, req: ChatCompletionRequest) -> SSEResponse:
    async def events() -> AsyncGenerator[bytes, None]:
        created = int(time.time())
        template = ChunkTemplate(True, call.request_id, created, call.model)

        def chunk(choices: list[ChatCompletionChunkChoice], usage: UsageInfo | None = None) -> bytes:
            return model_event(
                ChatCompletionChunk(
                    id=call.request_id, created=created, model=call.model, choices=choices, usage=usage
                )
            )

        for c in call.subs[0].choices:
            yield chunk(
                [ChatCompletionChunkChoice(index=c.index, delta=DeltaMessage(role="assistant", content=""))]
            )
        k = req.top_logprobs or 0
        tool_calls = _ToolCallChunks(call.tools, template, chunk) if call.tools is not None else None
        reasoning = _ReasoningChunks(call.reasoning, template, chunk, tool_calls) if call.reasoning else None

        def content(d: ChoiceDelta) -> bytes:
            if not d.text and not d.logprobs and d.finish_reason is None:
                return b""
            stop_reason = d.choice.stop_reason if d.finish_reason else None
            if reasoning is not None:
                return reasoning(
                    d, stop_reason, call.chat_logprobs(d.logprobs, k) if req.logprobs and d.logprobs else None
                )
            if tool_calls is not None:
                return tool_calls(d, stop_reason)
            if not (req.logprobs and d.logprobs):
                return template.content(d.choice.index, d.text, d.finish_reason, stop_reason)
            choice = ChatCompletionChunkChoice(
                index=d.choice.index,
                delta=DeltaMessage(content=d.text or None),
                logprobs=call.chat_logprobs(d.logprobs, k),
                finish_reason=d.finish_reason,
                stop_reason=stop_reason,
            )
            return chunk([choice])

        def end() -> bytes:
            return chunk([], usage=call.usage()) + DONE if req.include_usage_in_stream else DONE

        async for data in coalesced(call, content, end):
            yield data

    return SSEResponse(stream_errors(events(), call), call)


class _ToolCallChunks:
    """A chat stream's chunks when its answers are tool calls, in OpenAI's shape: a call's id and
    name first (arguments ""), then its arguments as fragments that join into its JSON. A named
    function's arguments stream as they are generated (the answer is them); `required` and `auto`
    calls go out when the answer ends (`auto` streams the content before a call starts), then the
    finish. An answer of those that does not parse (cut by max_tokens) is content."""

    def __init__(
        self,
        plan: ToolPlan,
        template: ChunkTemplate,
        chunk: Callable[[list[ChatCompletionChunkChoice]], bytes],
    ) -> None:
        self.plan, self.template, self.chunk = plan, template, chunk
        self.sent: dict[int, int] = {}  # auto: characters of each choice's text sent

    def __call__(
        self, d: ChoiceDelta, stop_reason: int | str | None, text: str | None = None, reasoning: str = ""
    ) -> bytes:
        """`text`: the answer so far (default: the choice's text; with reasoning, its content, and
        `reasoning` its reasoning, whose calls count when the content has none)."""
        plan, i = self.plan, d.choice.index
        text = d.choice.text if text is None else text
        sent = self.sent.get(i, 0)
        if plan.mode == "named":
            return self._named(i, text, sent, d.finish_reason)
        if d.finish_reason is None:
            if plan.mode != "auto":
                return b""
            end = plan.held_from(text)
            self.sent[i] = max(sent, end)
            return self.template.content(i, text[sent:end], None, None) if end > sent else b""
        content, calls = plan.answer(text, reasoning) if d.finish_reason == "stop" else (text, None)
        if calls is None:
            return self.template.content(i, text[sent:], d.finish_reason, stop_reason)
        rest = (content or "")[sent:] if plan.mode == "auto" else ""
        out = [self.template.content(i, rest, None, None)] if rest else []
        for n, c in enumerate(calls):
            out.append(self._head(i, n, c["id"], c["function"]["name"]))
            out.append(self._arguments(i, n, c["function"]["arguments"]))
        finish = ChatCompletionChunkChoice(index=i, delta=DeltaMessage(), finish_reason=plan.finish_reason)
        return b"".join([*out, self.chunk([finish])])

    def _named(self, i: int, text: str, sent: int, finish: str | None) -> bytes:
        """A named function's call: its head on the first text, then each delta's arguments (a
        call cut by max_tokens ends with what it has, and finish_reason "length")."""
        out = []
        if text and i not in self.sent:
            out.append(self._head(i, 0, new_call_id(), self.plan.name or ""))
        if len(text) > sent:
            out.append(self._arguments(i, 0, text[sent:]))
        self.sent[i] = len(text)
        if finish is not None:
            done = ChatCompletionChunkChoice(index=i, delta=DeltaMessage(), finish_reason=finish)
            out.append(self.chunk([done]))
        return b"".join(out)

    def _head(self, i: int, n: int, call_id: str, name: str) -> bytes:
        call = {"index": n, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}
        return self.chunk([ChatCompletionChunkChoice(index=i, delta=ToolCallsDelta(tool_calls=[call]))])

    def _arguments(self, i: int, n: int, fragment: str) -> bytes:
        call = {"index": n, "function": {"arguments": fragment}}
        return self.chunk([ChatCompletionChunkChoice(index=i, delta=ToolCallsDelta(tool_calls=[call]))])


class _ReasoningChunks:
    """A chat stream's chunks on a server with --reasoning-parser: each delta's reasoning goes out
    as `reasoning_content`, its content as content (or to the tool calls' chunks). A tail that
    may still become a tag waits for the next delta; logprobs ride on the delta's first chunk."""

    def __init__(
        self,
        parser: str,
        template: ChunkTemplate,
        chunk: Callable[[list[ChatCompletionChunkChoice]], bytes],
        tools: _ToolCallChunks | None,
    ) -> None:
        self.parser, self.template, self.chunk, self.tools = parser, template, chunk, tools
        self.sent: dict[int, tuple[int, int]] = {}  # per choice: (reasoning, content) characters sent

    def __call__(self, d: ChoiceDelta, stop_reason: int | str | None, logprobs: ChatLogprobs | None) -> bytes:
        i, done = d.choice.index, d.finish_reason is not None
        reasoning, content = split_reasoning(d.choice.text, self.parser, final=done)
        sent_r, sent_c = self.sent.get(i, (0, 0))
        self.sent[i] = (len(reasoning), len(content))
        out = []
        if len(reasoning) > sent_r or logprobs is not None:
            delta = ReasoningDelta(reasoning_content=reasoning[sent_r:] or None)
            out.append(self.chunk([ChatCompletionChunkChoice(index=i, delta=delta, logprobs=logprobs)]))
        if self.tools is not None:
            out.append(self.tools(d, stop_reason, content, reasoning))
        elif len(content) > sent_c or done:
            out.append(self.template.content(i, content[sent_c:], d.finish_reason, stop_reason))
        return b"".join(out)


def completion_stream(call: Call, req: CompletionRequest) -> SSEResponse:
    async def events() -> AsyncGenerator[bytes, None]:
        created = int(time.time())
        template = ChunkTemplate(False, call.request_id, created, call.model)
        offsets: dict[int, int] = {}  # choice index -> characters streamed so far

        def chunk(choices: list[CompletionChoice], usage: UsageInfo | None = None) -> bytes:
            return model_event(
                CompletionResponse(
                    id=call.request_id, created=created, model=call.model, choices=choices, usage=usage
                )
            )

        for sub in call.subs:
            for c in sub.choices:
                offsets[c.index] = len(sub.prompt_text) if req.echo else 0
                if req.echo:
                    yield chunk([CompletionChoice(index=c.index, text=sub.prompt_text)])

        def content(d: ChoiceDelta) -> bytes:
            if not d.text and not d.logprobs and d.finish_reason is None:
                return b""
            stop_reason = d.choice.stop_reason if d.finish_reason else None
            if req.logprobs is None:
                return template.content(d.choice.index, d.text, d.finish_reason, stop_reason)
            logprobs = call.completion_logprobs(d.logprobs, req.logprobs, offsets[d.choice.index])
            offsets[d.choice.index] += len(d.text)
            choice = CompletionChoice(
                index=d.choice.index,
                text=d.text,
                logprobs=logprobs,
                finish_reason=d.finish_reason,
                stop_reason=stop_reason,
            )
            return chunk([choice])

        def end() -> bytes:
            return chunk([], usage=call.usage()) + DONE if req.include_usage_in_stream else DONE

        async for data in coalesced(call, content, end):
            yield data

    return SSEResponse(stream_errors(events(), call), call)

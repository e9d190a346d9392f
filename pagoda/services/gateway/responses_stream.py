"""The SSE side of a Responses API call: OpenAI's typed events, each with the next
`sequence_number`, over the same deltas a chat stream reads (calls.py).

    response.created, response.in_progress
    per item, in output order: response.output_item.added, then
      reasoning:     content_part.added, reasoning_text.delta..., reasoning_text.done, content_part.done
      message:       content_part.added, output_text.delta..., output_text.done, content_part.done
      function_call: function_call_arguments.delta, function_call_arguments.done
    response.output_item.done
    response.completed

Reasoning and text stream as they come (a tail that may still become a tag is held, as in chat
streams). Tool calls go out whole when the answer ends, as in chat streams: with `auto` the text
before a `<tool_call>` streams, and a named or required call's arguments are constrained JSON that
only parses at the end. The stream always ends with `response.completed`, as vLLM's does, also for
a response cut short by max_output_tokens (its `status` is "incomplete"): the openai SDK's
`get_final_response()` reads only that event. An error after the first event is an `error` event.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from typing import Any

from pydantic import BaseModel

from pagoda.services.gateway.choices import ChoiceDelta
from pagoda.services.gateway.reasoning import split_reasoning
from pagoda.services.gateway.responses_output import Answer, Pending, output_items
from pagoda.services.gateway.responses_protocol import (
    FunctionCallItem,
    MessageItem,
    OutputItem,
    OutputText,
    ReasoningItem,
    ReasoningText,
)
from pagoda.services.gateway.streams import SSEResponse, coalesced, stream_errors
from pagoda.services.transport.errors import APIError


class Events:
    """Serializes events, numbering them in the order they are written."""

    def __init__(self) -> None:
        self.sequence_number = 0

    def __call__(self, kind: str, **fields: Any) -> bytes:
        body = {"type": kind, "sequence_number": self.sequence_number, **fields}
        self.sequence_number += 1
        data = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
        return f"event: {kind}\ndata: {data}\n\n".encode()


class ItemStream:
    """The item events of one streamed answer. `delta` is called with the answer's text so far,
    `finish` once with the finished answer; each returns the events to send. Items open as
    their text starts and close in order: reasoning when the message's text starts (it is whole
    by then), the rest when the answer ends."""

    def __init__(self, pending: Pending, events: Events) -> None:
        self.pending, self.emit = pending, events
        self.parser, self.plan = pending.call.reasoning, pending.call.tools
        self.opened: list[str] = []  # kinds of the items added so far, in output order
        self.closed: set[str] = set()
        self.sent = {"reasoning": 0, "message": 0}  # characters of each streamed so far

    def delta(self, text: str) -> bytes:
        reasoning, content = split_reasoning(text, self.parser, final=False) if self.parser else ("", text)
        if self.plan is not None:  # calls go out at the end; `auto` streams the text before one
            content = content[: self.plan.held_from(content)].rstrip() if self.plan.mode == "auto" else ""
        out = [self._text("reasoning", reasoning)]
        if len(content) > self.sent["message"]:
            if "reasoning" in self.opened and "reasoning" not in self.closed:
                item = ReasoningItem(id=self.pending.ids.reasoning, content=[ReasoningText(text=reasoning)])
                out.append(self._close("reasoning", item))
            out.append(self._text("message", content))
        return b"".join(out)

    def finish(self, answer: Answer) -> bytes:
        """Every item of the finished answer not closed yet, in output order: the rest of the
        ones streamed so far, then the ones added only now."""
        out = []
        for index, item in enumerate(output_items(answer, self.pending.ids)):
            if isinstance(item, FunctionCallItem):
                out.append(self._function_call(index, item))
                continue
            kind = "reasoning" if isinstance(item, ReasoningItem) else "message"
            if kind not in self.opened:
                out.append(self._open(kind))
            assert self.opened.index(kind) == index, (self.opened, index, kind)
            if kind not in self.closed:
                out.append(self._close(kind, item))
        return b"".join(out)

    def _text(self, kind: str, text: str) -> bytes:
        """Stream `text`, all of the `kind` item's text so far: its new part as a delta."""
        sent = self.sent[kind]
        if len(text) <= sent:
            return b""
        opened = b"" if kind in self.opened else self._open(kind)
        self.sent[kind] = len(text)
        return opened + self.emit(
            _EVENT[kind] + ".delta", **self._where(kind), delta=text[sent:], **_lp(kind)
        )

    def _where(self, kind: str) -> dict[str, Any]:
        ids = self.pending.ids
        return {
            "item_id": ids.reasoning if kind == "reasoning" else ids.message,
            "output_index": self.opened.index(kind),
            "content_index": 0,
        }

    def _open(self, kind: str) -> bytes:
        self.opened.append(kind)
        ids = self.pending.ids
        item: OutputItem = (
            ReasoningItem(id=ids.reasoning, status="in_progress")
            if kind == "reasoning"
            else MessageItem(id=ids.message, status="in_progress")
        )
        part = (ReasoningText(text="") if kind == "reasoning" else OutputText(text="")).model_dump(
            mode="json"
        )
        added = self.emit("response.output_item.added", output_index=len(self.opened) - 1, item=_json(item))
        return added + self.emit("response.content_part.added", **self._where(kind), part=part)

    def _close(self, kind: str, item: ReasoningItem | MessageItem) -> bytes:
        """The rest of an open item's text, then its done events."""
        self.closed.add(kind)
        part = item.content[0]
        rest, where = part.text[self.sent[kind] :], self._where(kind)
        self.sent[kind] = len(part.text)
        out = [self.emit(_EVENT[kind] + ".delta", **where, delta=rest, **_lp(kind))] if rest else []
        out.append(self.emit(_EVENT[kind] + ".done", **where, text=part.text, **_lp(kind)))
        out.append(self.emit("response.content_part.done", **where, part=_json(part)))
        out.append(self._item_done(where["output_index"], item))
        return b"".join(out)

    def _function_call(self, index: int, item: FunctionCallItem) -> bytes:
        added = item.model_copy(update={"arguments": "", "status": "in_progress"})
        where = {"item_id": item.id, "output_index": index}
        return b"".join(
            [
                self.emit("response.output_item.added", output_index=index, item=_json(added)),
                self.emit("response.function_call_arguments.delta", **where, delta=item.arguments),
                self.emit("response.function_call_arguments.done", **where, arguments=item.arguments),
                self._item_done(index, item),
            ]
        )

    def _item_done(self, index: int, item: OutputItem) -> bytes:
        return self.emit("response.output_item.done", output_index=index, item=_json(item))


_EVENT = {"reasoning": "response.reasoning_text", "message": "response.output_text"}  # + .delta, .done


def _lp(kind: str) -> dict[str, Any]:
    """Text events carry `logprobs` (none: pagoda's Responses API has no logprobs yet)."""
    return {"logprobs": []} if kind == "message" else {}


def _json(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="json")


def response_stream(pending: Pending) -> SSEResponse:
    """The SSE response of a submitted call; it stores the response (with `store`) before
    `response.completed` goes out."""
    call = pending.call
    emit = Events()

    async def events() -> AsyncGenerator[bytes, None]:
        head = pending.head.model_dump(mode="json")
        yield emit("response.created", response=head) + emit("response.in_progress", response=head)
        items = ItemStream(pending, emit)
        answer: Answer | None = None

        def content(d: ChoiceDelta) -> bytes:
            nonlocal answer
            if d.finish_reason is None:
                return items.delta(d.choice.text) if d.text else b""
            answer = Answer.of(call)
            return items.finish(answer)

        async for data in coalesced(call, content):
            yield data
        if answer is None:  # not expected: a call's deltas end with a finished one
            answer = Answer.of(call)
            yield items.finish(answer)
        response = await pending.finish(answer)
        yield emit("response.completed", response=response.model_dump(mode="json"))

    def error_event(err: APIError) -> bytes:
        code = "server_error" if err.status == 500 else str(err.code)
        return emit("error", code=code, message=err.message, param=err.param)

    return SSEResponse(stream_errors(events(), call, error_event), call)

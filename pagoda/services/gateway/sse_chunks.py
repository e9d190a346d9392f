"""Server-sent events of the OpenAI streaming API, built from pre-serialized byte templates.

A streamed call writes one chunk per token per choice; building each one as a pydantic model and
serializing it cost ~10 us, most of the gateway's per-token work besides the socket. The fields
that never change within a call (id, object, created, model) are serialized once, and a content
chunk is the template around the JSON of its text, finish reason and stop reason. The bytes are
exactly what `ChatCompletionChunk(...).model_dump_json()` / `CompletionResponse(...)` would give
(same keys, same order, nulls included); tests/unit/test_sse_chunks.py holds them to that.
Chunks with logprobs or usage still go through the pydantic models (`event`).
"""

from __future__ import annotations

from json.encoder import encode_basestring  # type: ignore[attr-defined]

from pydantic import BaseModel

DONE = b"data: [DONE]\n\n"


def event(payload: str | bytes) -> bytes:
    """One SSE event around a JSON payload (or [DONE])."""
    data = payload.encode() if isinstance(payload, str) else payload
    return b"data: " + data + b"\n\n"


def model_event(body: BaseModel) -> bytes:
    return event(body.model_dump_json())


def json_value(value: str | int | None) -> bytes:
    """`value` as pydantic writes it in JSON: UTF-8, not ASCII-escaped; control characters escaped.
    (`encode_basestring` is the C escaper behind `json.dumps(..., ensure_ascii=False)`, without
    building an encoder per call.)"""
    if value is None:
        return b"null"
    if isinstance(value, str):
        return encode_basestring(value).encode()
    return str(int(value)).encode()


class ChunkTemplate:
    """Content chunks of one streamed call: chat (`chat.completion.chunk`, text in
    `delta.content`) or completion (`text_completion`, text in `text`)."""

    def __init__(self, chat: bool, request_id: str, created: int, model: str) -> None:
        self.chat = chat
        obj = "chat.completion.chunk" if chat else "text_completion"
        self._head = (
            b'data: {"id":' + json_value(request_id) + b',"object":"' + obj.encode() + b'","created":'
            + str(int(created)).encode() + b',"model":' + json_value(model) + b',"choices":[{"index":'
        )  # fmt: skip
        self._text = b',"delta":{"role":null,"content":' if chat else b',"text":'
        self._after_text = (
            b'},"logprobs":null,"finish_reason":' if chat else b',"logprobs":null,"finish_reason":'
        )
        self._tail = b'}],"usage":null}\n\n'

    def content(
        self, index: int, text: str | None, finish_reason: str | None, stop_reason: int | str | None
    ) -> bytes:
        """A chunk of one choice with no logprobs. Chat sends "" content as null; completions as ""."""
        if self.chat and not text:
            text = None
        elif not self.chat and text is None:
            text = ""
        return b"".join(
            (
                self._head, str(index).encode(), self._text, json_value(text), self._after_text,
                json_value(finish_reason), b',"stop_reason":', json_value(stop_reason), self._tail,
            )
        )  # fmt: skip

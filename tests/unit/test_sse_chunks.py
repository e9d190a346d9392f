"""The byte templates of streamed chunks give exactly the bytes the pydantic models would."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pagoda.services.gateway.protocol import (
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    CompletionChoice,
    CompletionResponse,
    DeltaMessage,
)
from pagoda.services.gateway.sse_chunks import DONE, ChunkTemplate, event, model_event

TEXTS = ["", " the", 'a "quoted" \\ back', "line\nbreak\ttab\r\x00\x1f\x7f", "é 漢字 😀 \u2028 \ufffd"]
FINISH = [(None, None), ("stop", None), ("stop", 2), ("stop", "</s>"), ("length", None), ("abort", None)]


def _chat(
    rid: str, created: int, model: str, index: int, text: str, fin: str | None, stop: int | str | None
) -> bytes:
    choice = ChatCompletionChunkChoice(
        index=index, delta=DeltaMessage(content=text or None), finish_reason=fin, stop_reason=stop
    )
    return model_event(ChatCompletionChunk(id=rid, created=created, model=model, choices=[choice]))


def _completion(
    rid: str, created: int, model: str, index: int, text: str, fin: str | None, stop: int | str | None
) -> bytes:
    choice = CompletionChoice(index=index, text=text, finish_reason=fin, stop_reason=stop)
    return model_event(CompletionResponse(id=rid, created=created, model=model, choices=[choice]))


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize(("finish", "stop"), FINISH)
@pytest.mark.parametrize("chat", [True, False])
def test_template_matches_the_models(
    chat: bool, text: str, finish: str | None, stop: int | str | None
) -> None:
    rid, model = "chatcmpl-0123abcd", 'my/"model"-é'
    template = ChunkTemplate(chat, rid, 1764111111, model)
    want = (_chat if chat else _completion)(rid, 1764111111, model, 3, text, finish, stop)
    assert template.content(3, text, finish, stop) == want


@given(text=st.text(), index=st.integers(0, 10_000), chat=st.booleans())
def test_any_text_matches(text: str, index: int, chat: bool) -> None:
    template = ChunkTemplate(chat, "cmpl-x", 0, "m")
    want = (_chat if chat else _completion)("cmpl-x", 0, "m", index, text, None, None)
    assert template.content(index, text, None, None) == want


def test_events() -> None:
    assert event('{"a":1}') == b'data: {"a":1}\n\n'
    assert DONE == b"data: [DONE]\n\n"

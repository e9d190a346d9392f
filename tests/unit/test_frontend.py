"""PromptProcessor (chat template, tokenization, vLLM's prompt checks) and LocalFrontend, over a
fake engine and over a real AsyncEngine (simulated core)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import pytest

from pagoda.engine import AsyncEngine, SimConfig, SimCore
from pagoda.engine.sampling.params import SamplingParams
from pagoda.services.gateway.frontend import LocalFrontend
from pagoda.services.tokenizer.prompts import PromptProcessor
from pagoda.services.transport.errors import APIError
from pagoda.services.transport.messages import PromptInput
from tests.fakes import BOS, EOS, FakeEngine, FakeTokenizer, local_frontend

if TYPE_CHECKING:
    from pagoda.engine.tokenization.tokenizer import Tokenizer

MAX_LEN = 64


@pytest.fixture
def proc() -> PromptProcessor:
    return PromptProcessor(cast("Tokenizer", FakeTokenizer()), MAX_LEN)


def _raises(proc: PromptProcessor, prompt: PromptInput, params: SamplingParams | None = None) -> APIError:
    with pytest.raises(APIError) as info:
        proc.process(prompt, params or SamplingParams(max_tokens=None))
    assert info.value.status == 400 and info.value.type == "BadRequestError"
    return info.value


def test_messages_use_the_template_without_special_tokens(proc: PromptProcessor) -> None:
    msgs: list[dict[str, Any]] = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}]
    ids = proc.process(PromptInput(messages=msgs), SamplingParams())
    assert ids == list(b"<system>S\n<user>Hi\n<assistant>")
    no_gen = proc.process(PromptInput(messages=msgs, add_generation_prompt=False), SamplingParams())
    assert no_gen == list(b"<system>S\n<user>Hi\n")
    # add_special_tokens is about text prompts; a chat template adds its own
    assert proc.process(PromptInput(messages=msgs, add_special_tokens=True), SamplingParams()) == ids


def test_text_and_token_ids(proc: PromptProcessor) -> None:
    assert proc.process(PromptInput(text="ab"), SamplingParams()) == [BOS, 97, 98]
    assert proc.process(PromptInput(text="ab", add_special_tokens=False), SamplingParams()) == [97, 98]
    assert proc.process(PromptInput(token_ids=[EOS, 5]), SamplingParams()) == [EOS, 5]


def test_chat_template_error_is_400(proc: PromptProcessor) -> None:
    err = _raises(proc, PromptInput(messages=[{"role": "assistant", "content": "x"}]))
    assert "chat template" in err.message and err.param == "messages"


def test_exactly_one_prompt_kind(proc: PromptProcessor) -> None:
    _raises(proc, PromptInput())
    _raises(proc, PromptInput(text="a", token_ids=[1]))


def test_empty_prompt(proc: PromptProcessor) -> None:
    err = _raises(proc, PromptInput(token_ids=[]))
    assert "empty" in err.message and err.param == "prompt"
    _raises(proc, PromptInput(text="", add_special_tokens=False))


def test_prompt_too_long(proc: PromptProcessor) -> None:
    err = _raises(proc, PromptInput(text="x" * MAX_LEN))
    assert err.message == (
        f"This model's maximum context length is {MAX_LEN} tokens. However, your request has "
        f"{MAX_LEN + 1} input tokens. Please reduce the length of the input messages."
    )
    # one token short of the context still leaves room for one generated token
    assert len(proc.process(PromptInput(token_ids=[1] * (MAX_LEN - 1)), SamplingParams(max_tokens=1))) == 63


def test_prompt_plus_max_tokens_too_long(proc: PromptProcessor) -> None:
    err = _raises(proc, PromptInput(token_ids=[1] * 40), SamplingParams(max_tokens=30))
    assert err.param == "max_tokens"
    assert err.message == (
        f"This model's maximum context length is {MAX_LEN} tokens. However, you requested 70 tokens "
        "(40 in the messages, 30 in the completion). Please reduce the length of the messages or completion."
    )
    assert proc.process(PromptInput(token_ids=[1] * 40), SamplingParams(max_tokens=24))
    assert proc.process(PromptInput(token_ids=[1] * 40), SamplingParams(max_tokens=None))


@pytest.mark.parametrize(
    ("prompt", "params", "param"),
    [
        (PromptInput(token_ids=[1, 259]), SamplingParams(), "prompt"),
        (PromptInput(token_ids=[-1]), SamplingParams(), "prompt"),
        (PromptInput(text="a"), SamplingParams(logit_bias={1000: 1.0}), "logit_bias"),
        (PromptInput(text="a"), SamplingParams(stop_token_ids=(5, 259)), "stop_token_ids"),
    ],
)
def test_out_of_vocabulary(
    proc: PromptProcessor, prompt: PromptInput, params: SamplingParams, param: str
) -> None:
    err = _raises(proc, prompt, params)
    assert "out of vocabulary" in err.message and err.param == param


async def test_local_frontend_submits_checked_ids() -> None:
    engine = FakeEngine()
    front = local_frontend(engine)
    assert (front.model_name, front.max_model_len, front.default_sampling) == ("fake-model", 256, {})
    assert front.is_ready()
    params = SamplingParams(max_tokens=2)
    sub = await front.submit("r1", PromptInput(text="hi"), params, priority=1, cache_salt="s", session_id="x")
    assert sub.prompt_token_ids == [BOS, *b"hi"]
    assert engine.requests == [("r1", [BOS, *b"hi"], params, 1, "s")]
    outs = [o async for o in sub.outputs]
    assert [o.new_token_ids for o in outs] == [[ord("H")], [ord("e")]] and outs[-1].finished
    with pytest.raises(APIError) as info:
        await front.submit("r2", PromptInput(text="x" * 300), params)
    assert info.value.status == 400 and len(engine.requests) == 1  # refused before the engine
    await front.abort("r3")
    assert engine.aborted == {"r3"}


async def test_local_frontend_over_an_async_engine_streams_then_answers_503_once_it_died() -> None:
    core = SimCore(cast("Tokenizer", FakeTokenizer()), "sim", MAX_LEN, SimConfig(step_ms=0.0))
    engine = AsyncEngine(core)
    front = LocalFrontend(engine)
    try:
        sub = await front.submit("a", PromptInput(text="hi"), SamplingParams(max_tokens=3, n=2))
        outs = [o async for o in sub.outputs]
        assert sorted((o.index, o.num_output_tokens) for o in outs if o.finished) == [(0, 3), (1, 3)]
        with pytest.raises(APIError) as info:  # a prompt the model cannot take
            await front.submit("b", PromptInput(token_ids=[10**6]), SamplingParams())
        assert info.value.status == 400 and "out of vocabulary" in info.value.message

        def broken() -> Any:
            raise RuntimeError("device lost")

        core.step = broken  # type: ignore[method-assign]
        sub = await front.submit("c", PromptInput(text="hi"), SamplingParams(max_tokens=3))
        with pytest.raises(RuntimeError, match="engine step failed: device lost"):
            await anext(aiter(sub.outputs))
        assert not front.is_ready()
        with pytest.raises(APIError) as info:
            await front.submit("d", PromptInput(text="hi"), SamplingParams())
        assert info.value.status == 503 and "device lost" in info.value.message
    finally:
        await engine.shutdown()

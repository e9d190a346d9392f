"""The official openai SDK (sync, async, streaming) against both stacks: the embedded server and
the distributed cluster. The same calls must work, and give the same greedy text, on both."""

from __future__ import annotations

import asyncio

import openai
import pytest

pytestmark = pytest.mark.integration

MODEL = "SmolLM2-135M-Instruct"
MSG = [{"role": "user", "content": "Name a primary color."}]


@pytest.fixture(params=["embedded", "cluster"])
def base(request: pytest.FixtureRequest) -> str:
    stack = request.getfixturevalue(request.param)
    return stack if isinstance(stack, str) else str(stack["base"])


def test_sync_chat_and_completion(base: str) -> None:
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
    assert [m.id for m in client.models.list().data] == [MODEL]
    chat = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=12, temperature=0, seed=1)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content and chat.choices[0].finish_reason in ("stop", "length")
    assert chat.usage and chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens
    prompts = ["1, 2, 3,", "a, b, c,"]
    comp = client.completions.create(model=MODEL, prompt=prompts, max_tokens=5, temperature=0, echo=True, n=2)
    assert [c.index for c in comp.choices] == [0, 1, 2, 3]
    assert comp.choices[0].text.startswith("1, 2, 3,") and comp.choices[2].text.startswith("a, b, c,")
    assert comp.choices[0].text == comp.choices[1].text  # greedy: both choices agree


def test_async_streaming_with_usage_logprobs_and_stop(base: str) -> None:
    async def run() -> None:
        client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
        stream = await client.chat.completions.create(
            model=MODEL, messages=MSG, max_tokens=12, temperature=0, stream=True,
            stream_options={"include_usage": True}, logprobs=True, top_logprobs=2,
        )  # fmt: skip
        chunks = [c async for c in stream]
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
        with_lp = [c for c in chunks if c.choices and c.choices[0].logprobs and c.choices[0].logprobs.content]
        assert with_lp and all(
            len(e.top_logprobs) == 2 for c in with_lp for e in c.choices[0].logprobs.content
        )
        full = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert len(full) > 3
        stop_at = full[2:4]
        stopped = await client.chat.completions.create(
            model=MODEL, messages=MSG, max_tokens=12, temperature=0, stop=[stop_at]
        )
        assert stopped.choices[0].finish_reason == "stop"
        assert stopped.choices[0].message.content == full[: full.index(stop_at)]
        await client.close()

    asyncio.run(run())


def test_errors_have_the_openai_shape(base: str) -> None:
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=MSG, top_p=2.0)
    assert "top_p" in str(bad.value)
    with pytest.raises(openai.BadRequestError) as long:
        client.completions.create(model=MODEL, prompt="word " * 3000, max_tokens=5)
    assert "maximum context length is 2048" in str(long.value)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-5", messages=MSG)


def test_same_greedy_text_on_both_stacks(embedded: str, cluster: dict[str, object]) -> None:
    texts = []
    for base in (embedded, str(cluster["base"])):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
        r = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=16, temperature=0)
        texts.append(r.choices[0].message.content)
    assert texts[0] == texts[1]

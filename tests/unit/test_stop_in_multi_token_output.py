"""A stop string inside an output of several tokens (a speculative step's accepted drafts, or
outputs coalesced on the way): the text is cut before it, and the tokens after the one it ends in
are left out of the choice's token count and log-probs, as if the tokens had come one by one."""

from __future__ import annotations

from collections.abc import AsyncIterator

from pagoda.engine import RequestOutput, TokenLogprob
from pagoda.services.gateway.choices import SubRequest
from pagoda.services.gateway.frontend import Submitted
from pagoda.services.gateway.protocol import CompletionRequest
from tests.fakes import EOS, FakeTokenizer


async def _nothing() -> AsyncIterator[RequestOutput]:
    return
    yield


def _sub(stop: list[str], include: bool = False) -> SubRequest:
    req = CompletionRequest(model="m", prompt="x", stop=stop, include_stop_str_in_output=include, logprobs=0)
    return SubRequest.of("r", Submitted([1], _nothing()), "x", req, FakeTokenizer(), 0)  # type: ignore[arg-type]


def _out(text: str, total: int, stop_token: bool = False) -> RequestOutput:
    ids = list(text.encode()) + ([EOS] if stop_token else [])
    return RequestOutput(
        "r",
        ids,
        0,
        num_prompt_tokens=1,
        num_cached_tokens=0,
        num_output_tokens=total + len(ids),
        new_logprobs=[TokenLogprob(i, -0.5) for i in ids],
        finished=stop_token,
        finish_reason="stop" if stop_token else None,
        stop_token_id=EOS if stop_token else None,
    )


def test_a_stop_string_mid_output_cuts_the_count_and_logprobs() -> None:
    sub = _sub(["END"])
    first = sub.process(_out("abc", 0))
    assert first is not None and first.text == "abc"
    # one output of 9 tokens; "END" ends in its 6th (bytes are tokens in the fake vocabulary)
    delta = sub.process(_out("deENDfgh!", 3))
    assert delta is not None and delta.finish_reason == "stop"
    assert sub.choices[0].text == "abcde"
    assert sub.choices[0].num_output_tokens == 3 + 5  # "abc" + "deEND": f, g, h, ! are not output
    assert [lp.token_id for lp in delta.logprobs] == list(b"deEND")
    assert len(sub.choices[0].logprobs) == 8


def test_with_the_stop_string_kept_and_a_stop_token_after_it() -> None:
    sub = _sub(["END"], include=True)
    delta = sub.process(_out("xEND", 0, stop_token=True))  # ... and the EOS that came with it
    assert delta is not None and sub.choices[0].text == "xEND"
    assert sub.choices[0].num_output_tokens == 4  # EOS after the stop string is not counted
    assert len(delta.logprobs) == 4


def test_without_a_hit_every_token_counts() -> None:
    sub = _sub(["END"])
    delta = sub.process(_out("abcEN", 0))
    assert delta is not None and delta.text == "abc"  # "EN" held back: it may start "END"
    assert sub.choices[0].num_output_tokens == 5 and len(delta.logprobs) == 5
    done = sub.process(_out("", 5, stop_token=True))
    assert done is not None and sub.choices[0].text == "abcEN" and sub.choices[0].num_output_tokens == 6

"""Wire messages: round trips, versioning, and garbage that never kills a consumer."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagoda.engine.outputs import RequestOutput, TokenLogprob
from pagoda.engine.sampling.params import SamplingParams
from pagoda.services.transport.messages import (
    AbortRequest,
    MessageError,
    PromptInput,
    Queues,
    SamplingSpec,
    StepOutputs,
    TokenDelta,
    TokenizeRequest,
    WorkerRequest,
    decode,
    encode,
)


def test_round_trips_keep_every_field() -> None:
    params = SamplingParams(n=2, max_tokens=7, temperature=0.5, top_k=3, seed=9, logit_bias={4: -2.0},
                            stop_token_ids=(5,), logprobs=2, ignore_eos=True)  # fmt: skip
    assert SamplingSpec.of(params).to_params() == params
    prompt = PromptInput(messages=[{"role": "user", "content": "hi"}])
    spec = SamplingSpec.of(params)
    req = TokenizeRequest(
        request_id="r", reply_to="q", prompt=prompt, sampling=spec, priority=3, cache_salt="s", session_id="u"
    )
    assert decode(encode(req)) == req
    run = WorkerRequest(
        request_id="r", reply_to="q", prompt_token_ids=[1, 2], sampling=SamplingSpec.of(params)
    )
    assert isinstance(decode(encode(run)), WorkerRequest)
    out = RequestOutput("r", [5], 1, 3, 0, 1, [TokenLogprob(5, -0.1, {5: -0.1, 6: -2.0})], True, "stop", 2)
    step = StepOutputs(worker_id="w", deltas=[TokenDelta.of(out)])
    back = decode(encode(step))
    assert isinstance(back, StepOutputs) and back.deltas[0].to_output() == out
    assert decode(encode(AbortRequest(request_ids=["a", "b"]))) == AbortRequest(request_ids=["a", "b"])


def test_queue_names_are_namespaced() -> None:
    q = Queues("test-1")
    assert (q.tokenize, q.schedule, q.worker("w"), q.reply("g")) == (
        "test-1.tokenize", "test-1.schedule", "test-1.worker.w", "test-1.reply.g",
    )  # fmt: skip


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"\xff\xfe", "not JSON"),
        (b"[]", "envelope is not an object"),
        (json.dumps({"v": 2, "type": "abort", "body": {}}).encode(), "wire version 2"),
        (json.dumps({"v": 1, "type": "launch", "body": {}}).encode(), "unknown message type 'launch'"),
        (json.dumps({"v": 1, "type": "abort", "body": {"request_ids": "x"}}).encode(), "bad abort message"),
    ],
)
def test_bad_messages_raise_message_error(data: bytes, reason: str) -> None:
    with pytest.raises(MessageError, match=reason):
        decode(data)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=200), st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=20,
).map(lambda v: json.dumps({"v": 1, "type": "step", "body": v}).encode())))  # fmt: skip
def test_decode_only_ever_raises_message_error(data: bytes) -> None:
    try:
        decode(data)
    except MessageError:
        pass

"""Wire messages: round trips, versioning, and garbage that never kills a consumer; the worker
heartbeat through the store."""

from __future__ import annotations

import json
import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagoda.engine.outputs import RequestOutput, TokenLogprob
from pagoda.engine.sampling.params import SamplingParams
from pagoda.services.scheduler.registry import WorkerRegistry, load_of, routable
from pagoda.services.transport.messages import (
    WIRE_VERSION,
    AbortRequest,
    MessageError,
    PromptInput,
    Queues,
    SamplingSpec,
    StepOutputs,
    TokenDelta,
    TokenizeRequest,
    WorkerHeartbeat,
    WorkerRequest,
    decode,
    encode,
)
from pagoda.services.transport.store import InMemoryStore
from tests.fakes import heartbeat


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
    assert (q.tokenize("m"), q.schedule, q.worker("w"), q.reply("g")) == (
        "test-1.tokenize.m", "test-1.schedule", "test-1.worker.w", "test-1.reply.g",
    )  # fmt: skip


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"\xff\xfe", "not JSON"),
        (b"[]", "envelope is not an object"),
        (
            json.dumps({"v": 1, "type": "abort", "body": {}}).encode(),
            "wire version 1",
        ),  # before "accepted" went
        (json.dumps({"v": 2, "type": "launch", "body": {}}).encode(), "unknown message type 'launch'"),
        (json.dumps({"v": 2, "type": "accepted", "body": {}}).encode(), "unknown message type 'accepted'"),
        (json.dumps({"v": 2, "type": "abort", "body": {"request_ids": "x"}}).encode(), "bad abort message"),
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
).map(lambda v: json.dumps({"v": WIRE_VERSION, "type": "step", "body": v}).encode())))  # fmt: skip
def test_decode_only_ever_raises_message_error(data: bytes) -> None:
    try:
        decode(data)
    except MessageError:
        pass


# -- the worker heartbeat (through the store, not the bus) ------------------------------------
BEAT = heartbeat("w1", state="draining", num_running=3, num_waiting=2, kv_usage=0.375, kv_live_tokens=40,
                 kv_live_token_ratio=0.625, max_num_seqs=8, block_size=32, num_blocks=64, num_free_blocks=17,
                 steps=1234, last_seen=1700000000.125)  # fmt: skip


def test_heartbeat_fields_round_trip() -> None:
    fields = BEAT.to_fields()
    assert all(isinstance(v, str) for v in fields.values()) and "worker_id" not in fields  # the key's
    assert fields["state"] == "draining" and fields["num_free_blocks"] == "17"
    assert WorkerHeartbeat.from_fields("w1", fields) == BEAT


@pytest.mark.parametrize(
    ("change", "where"),
    [
        ({"num_running": "many"}, "num_running"),
        ({"state": "asleep"}, "state"),
        ({"block_size": "0"}, "block_size"),
    ],
)
def test_a_bad_heartbeat_raises_message_error(change: dict[str, str], where: str) -> None:
    with pytest.raises(MessageError, match=f"bad heartbeat of worker w1: 1 errors, first: {where}: "):
        WorkerHeartbeat.from_fields("w1", {**BEAT.to_fields(), **change})
    with pytest.raises(MessageError, match="max_num_seqs"):  # a hash missing a figure is no heartbeat
        WorkerHeartbeat.from_fields("w1", {k: v for k, v in BEAT.to_fields().items() if k != "max_num_seqs"})


async def test_the_registry_stores_heartbeats_and_skips_bad_records(caplog: pytest.LogCaptureFixture) -> None:
    store = InMemoryStore()
    registry = WorkerRegistry(store, heartbeat_s=10.0)
    assert await registry.beat(BEAT) is False  # first beat: the worker publishes its prefix index
    assert await registry.beat(heartbeat("w2")) is False
    assert await registry.beat(BEAT) is True
    (w1, w2) = await registry.alive()
    assert w1 == BEAT.model_copy(update={"last_seen": w1.last_seen}) and w1.last_seen > BEAT.last_seen
    assert (await store.hgetall("worker:w1"))["num_running"] == "3"  # one readable field per figure
    assert [w.worker_id for w in routable([w1, w2])] == ["w2"]  # w1 drains
    state = load_of(w1)
    assert (state.worker_id, state.num_running, state.num_waiting, state.max_num_seqs) == ("w1", 3, 2, 8)
    await store.hset("worker:w2", {"num_waiting": "-1"})  # a record no worker wrote
    with caplog.at_level(logging.WARNING):
        assert [w.worker_id for w in await registry.alive()] == ["w1"]
    assert "skipped worker w2: bad heartbeat of worker w2" in caplog.text
    await registry.leave(heartbeat("w1", state="stopped"), linger_s=10.0)
    assert [(w.worker_id, w.state) for w in await registry.alive()] == [("w1", "stopped")]

"""The gateway's failover bookkeeping: continuing a stream on another worker without a duplicate
or missing token, and deciding when a worker is lost."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pagoda.services.gateway.failover import MAX_ATTEMPTS, RequestTrack, WorkerWatch
from pagoda.services.transport.messages import (
    Assigned,
    PromptInput,
    SamplingSpec,
    TokenDelta,
    TokenizeRequest,
)


def _track(max_tokens: int | None = 10, n: int = 1, min_tokens: int = 0) -> RequestTrack:
    req = TokenizeRequest(
        request_id="r", reply_to="q", prompt=PromptInput(text="hi"),
        sampling=SamplingSpec(max_tokens=max_tokens, n=n, min_tokens=min_tokens, temperature=0.0),
    )  # fmt: skip
    track = RequestTrack(req, n)
    track.prompt_token_ids = [1, 2, 3]
    return track


def _delta(ids: list[int], done: int, finished: bool = False, prompt: int = 3) -> TokenDelta:
    return TokenDelta(
        request_id="r", index=0, new_token_ids=ids, num_prompt_tokens=prompt, num_cached_tokens=0,
        num_output_tokens=done, finished=finished, finish_reason="length" if finished else None,
    )  # fmt: skip


def test_continuation_resumes_after_the_tokens_sent() -> None:
    t = _track(max_tokens=10, min_tokens=4)
    assert t.assign(Assigned(request_id="r", worker_id="w1")) is None
    assert t.accept("w1", _delta([7, 8], 2)) is not None
    assert t.accept("w1", _delta([9], 3)) is not None
    cont = t.continuation()
    assert not isinstance(cont, str)
    assert cont.prompt_token_ids == [1, 2, 3, 7, 8, 9]
    assert (cont.sampling.max_tokens, cont.sampling.min_tokens) == (7, 1)
    assert (cont.attempt, cont.resume_from) == (1, 3)
    # greedy: the old worker's deltas still on their way are taken until the new assignment
    late = t.accept("w1", _delta([10], 4))
    assert late is not None and late.new_token_ids == [10]
    assert t.assign(Assigned(request_id="r", worker_id="w2", attempt=1, resume_from=3)) == "w1"
    assert t.accept("w1", _delta([11], 5)) is None
    out = t.accept("w2", _delta([10, 11], 2, prompt=6))  # position 3 (10) was sent already
    assert out is not None
    assert out.new_token_ids == [11]
    assert (out.num_output_tokens, out.num_prompt_tokens) == (5, 3)  # as the client counts them


def test_sampled_continuation_takes_nothing_more_from_the_old_worker() -> None:
    t = _track()
    t.request = t.request.model_copy(update={"sampling": SamplingSpec(max_tokens=10, temperature=0.8)})
    t.assign(Assigned(request_id="r", worker_id="w1"))
    assert t.accept("w1", _delta([7], 1)) is not None
    assert not isinstance(t.continuation(), str)
    assert t.accept("w1", _delta([8], 2)) is None  # the continuation follows [7] alone


def test_a_stale_assignment_is_aborted_not_followed() -> None:
    t = _track()
    t.assign(Assigned(request_id="r", worker_id="w2", attempt=1))
    assert t.assign(Assigned(request_id="r", worker_id="w1", attempt=0)) == "w1"
    assert t.worker_id == "w2"


@given(st.lists(st.integers(1, 4), min_size=1, max_size=8), st.integers(0, 30), st.data())
def test_restarted_streams_deliver_each_position_once(
    steps: list[int], cut: int, data: st.DataObject
) -> None:
    """A re-run from any earlier position (a duplicate run, a redelivery) gives every output
    position to the client exactly once, in order."""
    full = list(range(100, 100 + sum(steps)))
    t = _track(max_tokens=None)
    t.assign(Assigned(request_id="r", worker_id="w1"))
    seen: list[int] = []
    pos = 0
    for k in steps:  # first run, cut after `cut` positions
        if pos >= min(cut, len(full)):
            break
        out = t.accept("w1", _delta(full[pos : pos + k], min(pos + k, len(full))))
        seen += out.new_token_ids if out else []
        pos = min(pos + k, len(full))
    restart = data.draw(st.integers(0, pos))  # the new worker resumes from here (<= what was sent)
    t.assign(Assigned(request_id="r", worker_id="w2", attempt=1, resume_from=restart))
    p = restart
    while p < len(full):
        k = data.draw(st.integers(1, 4))
        out = t.accept("w2", _delta(full[p : p + k], min(p + k, len(full)) - restart))
        seen += out.new_token_ids if out else []
        p = min(p + k, len(full))
    assert seen == full


def test_no_continuation_for_n_gt_1_or_after_max_attempts() -> None:
    assert "n=2" in str(_track(n=2).continuation())
    t = _track(max_tokens=None)
    for attempt in range(1, MAX_ATTEMPTS):
        cont = t.continuation()
        assert not isinstance(cont, str)
        t.assign(Assigned(request_id="r", worker_id=f"w{attempt}", attempt=attempt))
    assert "moved" in str(t.continuation())


def test_worker_watch_grace_and_stall() -> None:
    watch = WorkerWatch(grace_s=1.0)
    assert watch.update({"w1": "ready"}, {"w1"}, now=0.0) == set()
    assert watch.update({}, {"w1"}, now=1.0) == set()  # missing: grace starts
    assert watch.update({}, {"w1"}, now=1.5) == set()
    assert watch.update({"w1": "ready"}, {"w1"}, now=1.9) == set()  # back (a store restart)
    assert watch.update({}, {"w1"}, now=2.0) == set()
    assert watch.update({}, {"w1"}, now=3.0) == {"w1"}
    assert watch.update({"w2": "stalled"}, {"w2"}, now=3.0) == {"w2"}
    assert watch.update({"w2": "draining"}, {"w2"}, now=9.0) == set()


def test_bad_timeouts_are_one_line_cli_errors(capsys: pytest.CaptureFixture[str]) -> None:
    from pagoda.services.cli.main import main

    cluster = ["--bus", "amqp://guest:guest@127.0.0.1:1/", "--store", "redis://127.0.0.1:1/0"]
    assert main(["worker", *cluster, "--stall-timeout", "0"]) == 2
    assert "--stall-timeout must be > 0 seconds, got 0.0" in capsys.readouterr().err
    assert main(["scheduler", *cluster, "--shutdown-timeout", "-1"]) == 2
    assert "--shutdown-timeout must be >= 0 seconds, got -1.0" in capsys.readouterr().err

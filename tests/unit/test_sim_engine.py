"""The simulated engine core: tokens per step, max_tokens, stop ids, EOS, n, abort, determinism,
its modeled step time and capacity; AsyncEngine's one output path (the step sink, and the
per-request streams built on it) over it."""

from __future__ import annotations

import time
from typing import Any

import pytest

from pagoda.engine.core.async_engine import AsyncEngine
from pagoda.engine.core.request_streams import RequestStreams
from pagoda.engine.core.sim_core import SimConfig, SimCore, word_token_ids
from pagoda.engine.core.stats import EngineCapacity
from pagoda.engine.outputs import RequestOutput
from pagoda.engine.sampling.params import SamplingParams
from pagoda.engine.tokenization.tokenizer import Tokenizer
from tests.polling import until


@pytest.fixture(scope="module")
def tokenizer(demo_checkpoint: Any) -> Tokenizer:
    return demo_checkpoint.tokenizer  # type: ignore[no-any-return]


def _core(tok: Tokenizer, **sim: Any) -> SimCore:
    return SimCore(tok, "sim", 256, SimConfig(**{"step_ms": 0.0, **sim}))


def _run(core: SimCore) -> dict[tuple[str, int], list[RequestOutput]]:
    outs: dict[tuple[str, int], list[RequestOutput]] = {}
    while core.has_unfinished():
        for o in core.step():
            outs.setdefault((o.request_id, o.index), []).append(o)
    return outs


def test_one_token_per_step_up_to_max_tokens_and_the_batch_cap(tokenizer: Tokenizer) -> None:
    core = _core(tokenizer, max_batch=2)
    for i, m in enumerate((3, 5, 2)):
        core.add_request(f"r{i}", [1, 2, 3 + i], SamplingParams(max_tokens=m))
    first = core.step()
    assert sorted(o.request_id for o in first) == ["r0", "r1"]  # r2 waits for a slot
    assert all(len(o.new_token_ids) == 1 for o in first)
    outs = _run(core)
    assert {k: sum(len(o.new_token_ids) for o in v) for k, v in outs.items()} == {
        ("r0", 0): 2, ("r1", 0): 4, ("r2", 0): 2,
    }  # fmt: skip
    for v in outs.values():
        assert v[-1].finished and v[-1].finish_reason == "length"
        assert not any(o.finished for o in v[:-1])
    assert core.num_steps == 5  # r1's 5 tokens; r2 ran in steps 4-5 after r0 ended at step 3
    text = tokenizer.decode([t for v in outs.values() for o in v for t in o.new_token_ids])
    assert text.strip() and text.isascii()  # whole English words


def test_tokens_are_deterministic_and_from_the_word_vocab(tokenizer: Tokenizer) -> None:
    vocab = set(word_token_ids(tokenizer))
    assert len(vocab) > 20
    runs = []
    for _ in range(2):
        core = _core(tokenizer)
        core.add_request("a", [5, 6, 7], SamplingParams(max_tokens=20, n=2))
        runs.append({k: [t for o in v for t in o.new_token_ids] for k, v in _run(core).items()})
    assert runs[0] == runs[1]
    assert runs[0][("a", 0)] != runs[0][("a", 1)]  # the choices differ
    assert set(runs[0][("a", 0)]) <= vocab


def test_stop_token_ids_eos_and_ignore_eos(tokenizer: Tokenizer) -> None:
    core = _core(tokenizer)
    core.add_request("free", [9, 9], SamplingParams(max_tokens=50))
    free = [t for o in _run(core)[("free", 0)] for t in o.new_token_ids]
    stop = free[5]
    cut = free.index(stop) + 1  # the first time that token comes
    core.add_request("stop", [9, 9], SamplingParams(max_tokens=50, stop_token_ids=(stop,)))
    got = _run(core)[("stop", 0)]
    assert [t for o in got for t in o.new_token_ids] == free[:cut]
    assert (got[-1].finish_reason, got[-1].stop_token_id) == ("stop", stop)

    eos_core = _core(tokenizer, eos_prob=1.0)
    eos_core.add_request("eos", [1], SamplingParams(max_tokens=10, min_tokens=3))
    eos_core.add_request("keep", [1], SamplingParams(max_tokens=10, ignore_eos=True))
    outs = _run(eos_core)
    eos = outs[("eos", 0)]
    assert len(eos) == 4 and eos[-1].finish_reason == "stop"  # not before min_tokens
    assert eos[-1].new_token_ids == [tokenizer.eos_token_ids[0]]
    assert len(outs[("keep", 0)]) == 10 and outs[("keep", 0)][-1].finish_reason == "length"


def test_abort_and_bad_prompts(tokenizer: Tokenizer) -> None:
    core = _core(tokenizer)
    core.add_request("a", [1, 2], SamplingParams(max_tokens=10, n=2))
    core.step()
    aborted = core.abort(["a"])
    assert [(o.index, o.finish_reason) for o in aborted] == [(0, "abort"), (1, "abort")]
    assert not core.has_unfinished()
    with pytest.raises(ValueError, match="empty"):
        core.add_request("e", [], SamplingParams())
    with pytest.raises(ValueError, match="max_model_len is 256"):
        core.add_request("long", [1] * 300, SamplingParams())
    with pytest.raises(ValueError, match="out of vocabulary"):
        core.add_request("oov", [10**7], SamplingParams())
    with pytest.raises(ValueError, match="sim-max-batch"):
        SimConfig(max_batch=0)


def test_steps_take_the_modeled_time(tokenizer: Tokenizer) -> None:
    core = _core(tokenizer, step_ms=20.0)
    core.add_request("a", [1], SamplingParams(max_tokens=5))
    t0 = time.perf_counter()
    _run(core)
    assert time.perf_counter() - t0 >= 5 * 0.020  # never faster than modeled


async def test_async_engine_streams_a_sim_core(tokenizer: Tokenizer) -> None:
    engine = AsyncEngine(_core(tokenizer, step_ms=1.0))
    try:
        got = [o async for o in engine.add_request("x", [1, 2, 3], SamplingParams(max_tokens=7))]
    finally:
        await engine.shutdown()
    assert sum(len(o.new_token_ids) for o in got) == 7
    assert got[-1].finished and got[-1].num_output_tokens == 7


def test_sim_core_reports_its_capacity_and_caches_no_blocks(tokenizer: Tokenizer) -> None:
    core = _core(tokenizer, max_batch=7, block_size=32)
    assert core.capacity == EngineCapacity(max_num_seqs=7, block_size=32, num_blocks=0)
    core.add_request("a", list(range(1, 100)), SamplingParams(max_tokens=2))
    _run(core)
    assert core.cached_block_hashes() == [] and core.drain_cache_events() == ([], [])
    assert core.counters().num_free_blocks == 0 and not hasattr(core, "kv")  # no stand-in KV manager
    with pytest.raises(ValueError, match="block_size must be at least 1, got 0"):
        SimConfig(block_size=0)


# -- AsyncEngine's one output path ------------------------------------------------------------
async def test_an_engine_has_one_sink_either_the_caller_s_or_the_streams(tokenizer: Tokenizer) -> None:
    params = SamplingParams(max_tokens=2)
    worker_like = AsyncEngine(_core(tokenizer, step_ms=1.0))
    with pytest.raises(RuntimeError, match="set_sink"):  # its outputs would go nowhere
        worker_like.submit("a", [1], params)
    steps: list[list[str]] = []
    worker_like.set_sink(lambda outs, stored, evicted: steps.append([o.request_id for o in outs]))
    streaming = AsyncEngine(_core(tokenizer, step_ms=1.0))
    try:
        worker_like.submit("a", [1], params)
        with pytest.raises(RuntimeError, match="use submit"):
            worker_like.add_request("b", [1], params)
        assert [o.num_output_tokens async for o in streaming.add_request("c", [1], params)] == [1, 2]
        with pytest.raises(RuntimeError, match="streams per request"):
            streaming.set_sink(lambda *a: None)
        await until(lambda: len(steps) == 2, 5, "both steps of a at the sink")
        assert steps == [["a"], ["a"]]
    finally:
        await worker_like.shutdown()
        await streaming.shutdown()


async def test_closing_a_stream_early_aborts_its_request(tokenizer: Tokenizer) -> None:
    core = _core(tokenizer, step_ms=1.0)
    engine = AsyncEngine(core)
    try:
        stream = engine.add_request("long", [1], SamplingParams(max_tokens=200))
        assert (await anext(aiter(stream))).num_output_tokens == 1
        await stream.aclose()  # type: ignore[attr-defined]
        await until(lambda: not core.has_unfinished(), 5, "the abort to reach the core")
        with pytest.raises(ValueError, match="out of vocabulary"):  # checked before it is queued
            engine.add_request("oov", [10**7], SamplingParams())
        again = [o async for o in engine.add_request("long", [1], SamplingParams(max_tokens=2))]
        assert [o.num_output_tokens for o in again] == [1, 2]  # the id is free again
    finally:
        await engine.shutdown()


def _out(rid: str, index: int = 0, finished: bool = False) -> RequestOutput:
    return RequestOutput(
        rid, [5], index, 1, 0, 1, finished=finished, finish_reason="length" if finished else None
    )


async def test_request_streams_route_outputs_and_abort_only_what_runs() -> None:
    aborted: list[str] = []
    streams = RequestStreams(aborted.append)
    ids = {"done": 1, "left": 2, "no": 1, "x": 1}  # id -> choices
    done, left, refused, orphan = (streams.open(rid, n) for rid, n in ids.items())
    with pytest.raises(ValueError, match="'done' is already running"):
        streams.reserve("done")
    streams.on_step([_out("left", 0), _out("done", finished=True), _out("gone")], [b"h"], [])
    assert [o.request_id async for o in done] == ["done"]  # one choice, finished: the stream ends
    assert (await anext(left)).index == 0
    await left.aclose()  # type: ignore[attr-defined]
    streams.on_reject("no", ValueError("request id 'no' is already running"))
    with pytest.raises(ValueError, match="already running"):
        await anext(refused)
    streams.on_dead(RuntimeError("engine step failed"))
    with pytest.raises(RuntimeError, match="engine step failed"):
        await anext(orphan)
    assert aborted == ["left"]  # not the finished, the refused (never taken in) or the dead engine's
    for rid in ids:  # every id is free again
        streams.reserve(rid)

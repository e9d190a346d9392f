"""The engine's public APIs on the demo model: LLM, AsyncEngine, sampling, n > 1, bad input."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from pagoda.engine.config import CacheConfig, EngineConfig
from pagoda.engine.core.async_engine import AsyncEngine
from pagoda.engine.core.engine_core import EngineCore
from pagoda.engine.core.stats import EngineCapacity
from pagoda.engine.kv.block_hash import hash_full_blocks
from pagoda.engine.llm import LLM, make_engine_config
from pagoda.engine.loader import ModelLoadError, load_checkpoint
from pagoda.engine.sampling.params import SamplingParams


@pytest.fixture(scope="module")
def core(demo_checkpoint: Any) -> EngineCore:
    return EngineCore(
        EngineConfig(dtype="float32", max_model_len=512, cache=CacheConfig(kv_cache_memory=64 << 20)),
        checkpoint=demo_checkpoint,
    )


@pytest.fixture(scope="module")
def llm(core: EngineCore) -> LLM:
    llm = LLM.__new__(LLM)
    llm.engine, llm.tokenizer, llm._next_id = core, core.tokenizer, 0
    return llm


def test_seeded_sampling_repeats_and_n_gives_n_choices(llm: LLM) -> None:
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)
    a = llm.generate(["Once upon a time"], params, use_tqdm=False)[0].outputs[0].token_ids
    # same seed, now batched with other requests: same tokens
    batch = llm.generate(["Hello there", "Once upon a time", "2 + 2 ="], params, use_tqdm=False)
    assert batch[1].outputs[0].token_ids == a
    other = llm.generate(
        ["Once upon a time"],
        SamplingParams(max_tokens=12, temperature=0.9, seed=99, ignore_eos=True),
        use_tqdm=False,
    )
    assert other[0].outputs[0].token_ids != a
    four = llm.generate(
        ["Tell me a story"], SamplingParams(n=4, max_tokens=8, temperature=1.0, seed=7), use_tqdm=False
    )[0]
    assert [c.index for c in four.outputs] == [0, 1, 2, 3]
    assert all(c.token_ids and c.finish_reason in ("stop", "length") for c in four.outputs)
    assert len({tuple(c.token_ids) for c in four.outputs}) > 1
    assert llm.engine.kv.pool.num_free_blocks == llm.engine.num_blocks  # all children freed


def test_n_children_share_prompt_blocks(llm: LLM) -> None:
    prompt = list(range(1000, 1100))  # 100 tokens: 6 full blocks
    core = llm.engine
    core.add_request("share", prompt, SamplingParams(n=3, max_tokens=2, temperature=1.0, seed=1))
    core.step()
    tables = [core.kv.blocks_of(f"share#{i}") for i in range(3)]
    assert tables[0][:6] == tables[1][:6] == tables[2][:6]
    assert core.kv.pool.ref_cnt[tables[0][0]] == 3
    while core.has_unfinished():
        core.step()


def test_the_core_reports_capacity_free_blocks_and_cached_hashes(core: EngineCore) -> None:
    """What a worker heartbeats and publishes, asked of the core (not of its KV cache)."""
    assert core.capacity == EngineCapacity(core.config.batcher.max_num_seqs, 16, core.num_blocks)
    core.drain_cache_events()
    prompt = list(range(2000, 2040))  # 2 full blocks of 16, and 8 tokens
    core.add_request("cap", prompt, SamplingParams(max_tokens=2))
    core.step()
    assert core.counters().num_free_blocks == core.num_blocks - 3  # the request holds 3 blocks
    while core.has_unfinished():
        core.step()
    full = hash_full_blocks(prompt, 16)
    stored, _ = core.drain_cache_events()
    assert set(full) <= set(stored) and set(full) <= set(core.cached_block_hashes())
    assert core.drain_cache_events() == ([], [])  # drained
    assert core.counters().num_free_blocks == core.num_blocks  # cached blocks are free to evict


def test_logprobs_and_stop_token_ids(llm: LLM) -> None:
    params = SamplingParams(max_tokens=5, temperature=0.0, logprobs=3, ignore_eos=True)
    out = llm.generate(["The capital of France is"], params, use_tqdm=False)[0].outputs[0]
    assert out.logprobs is not None and len(out.logprobs) == 5
    for tok, lp in zip(out.token_ids, out.logprobs, strict=True):
        assert lp.token_id == tok and len(lp.top) == 3 and lp.logprob <= 0
        assert max(lp.top.values()) == pytest.approx(lp.logprob)  # greedy: the top-1 token
    stop_at = out.token_ids[2]
    stopped = llm.generate(
        ["The capital of France is"],
        SamplingParams(max_tokens=5, temperature=0.0, stop_token_ids=(stop_at,), ignore_eos=True),
        use_tqdm=False,
    )[0].outputs[0]
    assert stopped.token_ids == out.token_ids[: out.token_ids.index(stop_at) + 1]
    assert stopped.finish_reason == "stop"


def test_bad_input_is_a_clear_error(core: EngineCore, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"600 tokens but max_model_len is 512"):
        core.add_request("long", [5] * 600, SamplingParams())
    with pytest.raises(ValueError, match="max_tokens must be at least 1, got 0"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 1.5"):
        SamplingParams(top_p=1.5)
    with pytest.raises(ValueError, match="out of vocabulary"):
        core.add_request("oov", [10**6], SamplingParams())
    with pytest.raises(ModelLoadError, match="no-such-model"):
        load_checkpoint(str(tmp_path / "no-such-model"))
    with pytest.raises(
        ValueError, match="max_model_len 100000 exceeds the model's maximum context length 8192"
    ):
        EngineCore(make_engine_config(max_model_len=100000), checkpoint=core_checkpoint(core))
    with pytest.raises(ValueError, match="dtype must be one of"):
        make_engine_config(dtype="float64")


def core_checkpoint(core: EngineCore) -> Any:
    class _C:
        name = core.model_name
        arch = core.model.cfg
        tokenizer = core.tokenizer
        quantization = None
        pooler = None

        def weights(self) -> Any:
            return iter(())

    return _C()


async def test_async_engine_streams_and_aborts(core: EngineCore) -> None:
    engine = AsyncEngine(core)
    prompt = core.tokenizer.encode("Write a long story about a dragon.")
    try:
        greedy = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)

        async def collect(rid: str) -> list[int]:
            toks: list[int] = []
            async for out in engine.add_request(rid, prompt, greedy):
                toks += out.new_token_ids
            return toks

        a, b = await asyncio.gather(collect("a"), collect("b"))
        assert a == b and len(a) == 20
        # leaving the iterator early aborts the request and frees its blocks
        stream = engine.add_request("c", prompt, SamplingParams(max_tokens=500, ignore_eos=True))
        async for _ in stream:
            break
        await stream.aclose()  # type: ignore[attr-defined]
        for _ in range(100):
            if core.kv.pool.num_free_blocks == core.num_blocks and not core.has_unfinished():
                break
            await asyncio.sleep(0.02)
        assert not core.has_unfinished()
        assert core.kv.pool.num_free_blocks == core.num_blocks
        with pytest.raises(ValueError, match="max_model_len"):
            engine.add_request("too-long", [5] * 600, greedy)
        assert engine.is_ready()
    finally:
        await engine.shutdown()

"""Speculative decoding end to end on the demo GGUF (its quantized weights as served, float32
activations: in bfloat16 the engine's own greedy stream already depends on the batch for these
prompts, with or without speculation, near ties of 0.03 nats flipping). Greedy output with n-gram
speculation equals greedy output without it (with prefix-cache hits, n > 1 and logprobs, and
with preemption in a tiny KV cache), seeded sampling repeats, stop tokens and max_tokens cut a
step's tokens, and the runner's block tables follow the batcher's rollback step by step. Each
greedy case asserts that drafts were proposed and that some were accepted and some rejected."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from pagoda.engine import LLM, SamplingParams
from pagoda.engine.core.stats import CoreCounters

SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
CODE = "".join(f"def {n}(a, b):\n    return a {op} b\n\n" for n, op in [("add", "+"), ("mul", "*")])
PROMPTS = [  # text the model copies from, so n-gram lookups find something
    CODE + "def div(a, b):",
    "Repeat this list exactly: apples, bananas, cherries, dates, elderberries, figs, grapes. Again: apples,",
    "One, two, three, four, five, six, seven, eight, nine, ten. One, two, three,",
]
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
ENGINE: dict[str, Any] = {"kv_cache_memory": 1 << 26, "max_model_len": 512, "dtype": "float32"}


@pytest.fixture(scope="module")
def plain(demo_gguf: str) -> LLM:
    return LLM(demo_gguf, **ENGINE)


@pytest.fixture(scope="module")
def spec(demo_gguf: str) -> LLM:
    return LLM(demo_gguf, speculative_config=SPEC, **ENGINE)


def generate(llm: LLM, prompts: list[str], params: SamplingParams) -> list[Any]:
    """llm.generate, checking after every step that the runner's block table of each running
    sequence is the batcher's (rollback frees blocks on both sides)."""
    engine, step = llm.engine, llm.engine.step

    def checked_step() -> list[Any]:
        outs = step()
        for req in engine.batcher.running:
            assert engine.runner.requests[req.request_id].block_ids == engine.kv.blocks_of(req.request_id)
        return outs

    engine.step = checked_step  # type: ignore[method-assign]
    try:
        return llm.generate(prompts, params, use_tqdm=False)
    finally:
        del engine.step


@dataclasses.dataclass
class Drafts:
    proposed: int = 0
    accepted: int = 0

    @classmethod
    def since(cls, before: CoreCounters, after: CoreCounters) -> Drafts:
        return cls(
            after.spec_num_draft_tokens - before.spec_num_draft_tokens,
            after.spec_num_accepted_tokens - before.spec_num_accepted_tokens,
        )

    def assert_some_accepted_and_rejected(self) -> None:
        assert self.proposed > self.accepted > 0, self


def _ids(results: list[Any]) -> list[list[int]]:
    return [c.token_ids for r in results for c in r.outputs]


def test_greedy_equal_with_prefix_hits_n_and_logprobs(plain: LLM, spec: LLM) -> None:
    params = dataclasses.replace(GREEDY, n=2, logprobs=1)
    want = plain.generate(PROMPTS, params, use_tqdm=False)
    before = spec.engine.counters()
    first = generate(spec, PROMPTS, params)
    again = generate(spec, PROMPTS, params)  # the prompts' blocks are cached now
    Drafts.since(before, spec.engine.counters()).assert_some_accepted_and_rejected()
    assert _ids(first) == _ids(want) and _ids(again) == _ids(want)
    assert all(r.num_cached_tokens > 0 for r in again)
    for got, ref in zip(first, want, strict=True):
        for g, w in zip(got.outputs, ref.outputs, strict=True):
            assert (
                g.logprobs is not None and w.logprobs is not None and len(g.logprobs) == len(w.logprobs) == 24
            )
            for a, b in zip(g.logprobs, w.logprobs, strict=True):
                assert a.logprob == pytest.approx(b.logprob, abs=2e-2)


def test_greedy_equal_under_preemption(demo_gguf: str, plain: LLM) -> None:
    """Dense float32 weights on both sides: where pagoda's CPU kernels are off, the GGUF's int4
    linears take bf16 activations, whose rounding turns float32 order noise between batch shapes
    into logit differences of ~5e-3 (an AVX2-only EPYC: prompt 3 flipped a near-tie of 0.0047 at
    token 17 batched vs alone, without speculation). Speculation over quantized weights is the
    test above's."""
    longest = max(len(plain.tokenizer.encode(p)) for p in PROMPTS) + GREEDY.max_tokens  # type: ignore[operator]
    blocks = -(-longest // 16) + 2  # one sequence and a bit: the others are preempted
    dense = {"dtype": "float32", "quantization": "none"}
    small = LLM(demo_gguf, speculative_config=SPEC, num_blocks=blocks, max_model_len=blocks * 16, **dense)
    before = small.engine.counters()
    got = generate(small, PROMPTS, GREEDY)
    assert small.engine.batcher.num_preemptions > 0
    Drafts.since(before, small.engine.counters()).assert_some_accepted_and_rejected()
    reference = LLM(demo_gguf, kv_cache_memory=1 << 26, max_model_len=512, **dense)
    assert _ids(got) == _ids(reference.generate(PROMPTS, GREEDY, use_tqdm=False))
    assert small.engine.kv.pool.num_free_blocks == blocks  # no block leaked


def test_seeded_sampling_repeats(spec: LLM) -> None:
    params = SamplingParams(max_tokens=24, temperature=0.8, top_p=0.95, seed=11, ignore_eos=True)
    before = spec.engine.counters()
    first, second = (_ids(generate(spec, PROMPTS, params)) for _ in range(2))
    assert first == second
    assert Drafts.since(before, spec.engine.counters()).accepted > 0


def test_stop_token_and_max_tokens_cut_a_step_s_tokens(plain: LLM, spec: LLM) -> None:
    prompt = PROMPTS[2]
    ref = _ids(plain.generate([prompt], GREEDY, use_tqdm=False))[0]
    stop = ref[6]
    cut = ref[: ref.index(stop) + 1]
    stopped = generate(spec, [prompt], dataclasses.replace(GREEDY, stop_token_ids=(stop,)))
    assert stopped[0].outputs[0].token_ids == cut and stopped[0].outputs[0].finish_reason == "stop"
    short = generate(spec, [prompt], dataclasses.replace(GREEDY, max_tokens=7))
    assert short[0].outputs[0].token_ids == ref[:7] and short[0].outputs[0].finish_reason == "length"

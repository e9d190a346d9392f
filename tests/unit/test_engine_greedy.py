"""Output invariance: greedy tokens equal HF transformers' and do not change with prefix caching,
chunked prefill, preemption or batch size."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from pagoda.engine.config import BatcherConfig, CacheConfig, EngineConfig
from pagoda.engine.core.engine_core import EngineCore
from pagoda.engine.llm import LLM
from pagoda.engine.sampling.params import SamplingParams
from pagoda.load.prompts import chat_prompts

# 24 new tokens: past the first decode blocks of every prompt, enough for a wrong kernel to diverge,
# and short enough that the eight prompts' HF reference and the seven engines stay quick
NEW_TOKENS = 24
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)


def _engine(ckpt: Any, **kw: Any) -> LLM:
    cache = CacheConfig(
        **{k: kw.pop(k) for k in list(kw) if k in ("enable_prefix_caching", "num_blocks_override")}
    )
    sched = BatcherConfig(
        **{k: kw.pop(k) for k in list(kw) if k in ("max_num_batched_tokens", "max_num_seqs")}
    )
    llm = LLM.__new__(LLM)
    llm.engine = EngineCore(EngineConfig(dtype="float32", cache=cache, batcher=sched, **kw), checkpoint=ckpt)
    llm.tokenizer = llm.engine.tokenizer
    llm._next_id = 0
    return llm


@pytest.fixture(scope="module")
def prompts(demo_checkpoint: Any) -> list[list[int]]:
    tok = demo_checkpoint.tokenizer
    msgs = chat_prompts(8, seed=1)
    # two prompts share a long system prompt so prefix caching has something to hit
    system = {"role": "system", "content": "You are a careful assistant. " * 8}
    msgs[2] = [system, *msgs[2]]
    msgs[3] = [system, *msgs[3]]
    return [tok.encode(tok.apply_chat_template(m), add_special_tokens=False) for m in msgs]


@pytest.fixture(scope="module")
def reference(hf_demo_model: Any, prompts: list[list[int]]) -> list[list[int]]:
    outs = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p])
            gen = hf_demo_model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                eos_token_id=2,
                pad_token_id=2,
            )
            outs.append(gen[0, len(p) :].tolist())
    return outs


def _tokens(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    return [r.outputs[0].token_ids for r in llm.generate(prompts, GREEDY, use_tqdm=False)]


@pytest.mark.slow
def test_greedy_matches_hf_as_one_batch_and_again_from_the_prefix_cache(
    demo_checkpoint: Any, prompts: list[list[int]], reference: list[list[int]]
) -> None:
    """All eight prompts in one batch give HF's tokens; then the first four again, now from the
    prefix cache (one engine: the second run is the repeat whose cached blocks must not change a
    token)."""
    llm = _engine(demo_checkpoint)
    first = llm.generate(prompts, GREEDY, use_tqdm=False)
    got = [r.outputs[0].token_ids for r in first]
    for i, (g, r) in enumerate(zip(got, reference, strict=True)):
        assert g == r, f"prompt {i}: engine {g} != HF {r}"
    assert sum(map(len, got)) > 8 * NEW_TOKENS // 2  # real generations, not instant EOS
    assert first[3].num_cached_tokens > 0  # shares the system prompt with prompt 2
    second = llm.generate(prompts[:4], GREEDY, use_tqdm=False)
    assert [r.outputs[0].token_ids for r in second] == reference[:4]
    for r in second:
        assert r.num_cached_tokens >= (len(r.prompt_token_ids) - 1) // 16 * 16


@pytest.mark.slow
@pytest.mark.parametrize(
    "variant",
    [
        {"enable_prefix_caching": False},
        {"max_num_batched_tokens": 8},
        {"max_num_seqs": 1},
    ],
    ids=["no-prefix-cache", "token-budget-8", "batch-1"],
)
def test_greedy_invariant_under_engine_settings(
    demo_checkpoint: Any, prompts: list[list[int]], reference: list[list[int]], variant: dict[str, Any]
) -> None:
    llm = _engine(demo_checkpoint, **variant)
    assert _tokens(llm, prompts) == reference


@pytest.mark.slow
def test_greedy_invariant_under_preemption(
    demo_checkpoint: Any, prompts: list[list[int]], reference: list[list[int]]
) -> None:
    longest = max(map(len, prompts)) + NEW_TOKENS
    blocks = -(-longest // 16) + 4  # room for one sequence and a bit: forces preemption
    llm = _engine(demo_checkpoint, num_blocks_override=blocks, max_model_len=blocks * 16)
    got = _tokens(llm, prompts)
    assert llm.engine.batcher.num_preemptions > 0
    assert got == reference


@pytest.mark.slow
def test_greedy_invariant_at_batch_16(
    demo_checkpoint: Any, prompts: list[list[int]], reference: list[list[int]]
) -> None:
    llm = _engine(demo_checkpoint, enable_prefix_caching=False)
    assert _tokens(llm, prompts + prompts[::-1]) == reference + reference[::-1]

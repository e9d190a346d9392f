"""Logits of every supported family match HF transformers (fp32) through the whole engine path:
paged KV, chunked prefill against a cached prefix, batched decode."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pagoda.engine.llm import LLM
from pagoda.engine.sampling.params import SamplingParams
from tests.tiny_models import KINDS, VOCAB, make_tiny_model

PROMPTS = [
    [256, *range(40, 70)],  # 31 tokens: spans two blocks and is chunked under a budget of 8
    [256, 5, 9, 200, 17],
    [256, *range(100, 118)],
]
NEW = 6


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("budget", [2048, 8], ids=["whole-prefill", "chunked"])
def test_logprobs_match_hf(tmp_path: Path, kind: str, budget: int) -> None:
    hf, _ = make_tiny_model(kind, tmp_path)
    llm = LLM(
        str(tmp_path),
        dtype="float32",
        kv_cache_memory=1 << 22,
        max_model_len=256,
        max_num_batched_tokens=budget,
        block_size=16,
    )
    params = SamplingParams(max_tokens=NEW, temperature=0.0, logprobs=VOCAB, ignore_eos=True)
    results = llm.generate(PROMPTS, params, use_tqdm=False)
    for prompt, res in zip(PROMPTS, results, strict=True):
        out = res.outputs[0]
        assert out.logprobs is not None and len(out.token_ids) == NEW
        full = torch.tensor([prompt + out.token_ids[:-1]])
        with torch.inference_mode():
            ref = torch.log_softmax(hf(full).logits[0].float(), dim=-1)[len(prompt) - 1 :]
        got = torch.full_like(ref, float("-inf"))
        for i, lp in enumerate(out.logprobs):
            for tok, value in lp.top.items():
                got[i, tok] = value
        torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4)
        assert out.token_ids == ref.argmax(-1).tolist()

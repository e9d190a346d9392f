"""Logits of every supported family match HF transformers (fp32) through the whole engine path:
paged KV, chunked prefill against a cached prefix, batched decode, sliding windows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from pagoda.engine.llm import LLM
from pagoda.engine.sampling.params import SamplingParams
from tests.tiny_models import KINDS, VOCAB, WINDOW, make_tiny_model

PROMPTS = [
    [256, *range(40, 70)],  # 31 tokens: spans two blocks and is chunked under a budget of 8
    [256, 5, 9, 200, 17],
    [256, *range(100, 118)],
]
NEW = 6


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("budget", [2048, 8], ids=["whole-prefill", "chunked"])
def test_logprobs_match_hf(tmp_path: Path, kind: str, budget: int) -> None:
    """gemma2/gemma3: the prompts outgrow the local layers' window (WINDOW tokens), in whole
    prefills, in chunks against cached context and in decodes."""
    hf, _ = make_tiny_model(kind, tmp_path)
    _assert_matches_hf(hf, tmp_path, budget)


@pytest.mark.parametrize("budget", [2048, 8], ids=["whole-prefill", "chunked"])
def test_sliding_window_in_the_llama_family_matches_hf(tmp_path: Path, budget: int) -> None:
    """Phi-3 (and Mistral) put a window on every layer: the tiny phi3 with a window of WINDOW,
    which changes HF's own logits for these prompts (so a window ignored would fail)."""
    hf, _ = make_tiny_model("phi3", tmp_path)
    full = torch.tensor([PROMPTS[0]])
    with torch.inference_mode():
        unwindowed = hf(full).logits
        hf.config.sliding_window = WINDOW
        assert not torch.allclose(hf(full).logits, unwindowed, atol=1e-3)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "sliding_window": WINDOW}))
    _assert_matches_hf(hf, tmp_path, budget)


def _assert_matches_hf(hf: Any, path: Path, budget: int) -> None:
    """The engine's greedy tokens and full log-prob rows for PROMPTS equal `hf`'s (float32)."""
    llm = LLM(
        str(path),
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

"""Speculative decoding on the Triton backend (kernels under the interpreter on CPU): verification
rows are decode rows of the paged decode kernel (decode-only steps) and of the unified kernel
(steps with prefill chunks), and greedy tokens equal the torch backend's without speculation."""

from __future__ import annotations

from pathlib import Path

import pytest

from pagoda.engine.llm import LLM
from pagoda.engine.sampling.params import SamplingParams
from tests.tiny_models import make_tiny_model

SPEC = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 2}
PROMPTS = [[256, *range(40, 60), *range(40, 50)], [256, 7, 8, 9, 7, 8, 9, 7, 8]]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def _llm(path: Path, backend: str, spec: dict[str, object] | None) -> LLM:
    return LLM(
        str(path),
        dtype="float32",
        kv_cache_memory=1 << 21,
        max_model_len=128,
        max_num_batched_tokens=16,  # prompt chunks beside the other sequence's verification rows
        attention_backend=backend,
        speculative_config=spec,
    )


@pytest.mark.slow
def test_triton_backend_with_speculation_equals_torch_without(tmp_path: Path) -> None:
    make_tiny_model("llama3", tmp_path)  # GQA ratio 2, head_dim 16
    want = [
        r.outputs[0].token_ids
        for r in _llm(tmp_path, "torch", None).generate(PROMPTS, GREEDY, use_tqdm=False)
    ]
    llm = _llm(tmp_path, "triton", SPEC)
    assert llm.engine.runner.backend.name == "triton"
    got = [r.outputs[0].token_ids for r in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    assert got == want
    c = llm.engine.counters()
    assert c.spec_num_draft_tokens > c.spec_num_accepted_tokens > 0, c

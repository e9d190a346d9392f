"""A greedy stream does not depend on what else the engine is running: the demo model served as
users get it (the GGUF quantized; in bf16, and in float32 as the integration tests run it) gives
each chat prompt the same tokens alone as in a batch. A distributed cluster relies on this: which
requests share a worker's batch, and which one decodes alone at the end, depends on timing."""

from __future__ import annotations

import pytest

from pagoda.engine import LLM, SamplingParams

QUESTIONS = [f"In one sentence, what is {t}?" for t in ("a cat", "the moon", "rain", "a violin", "bread")]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # bf16: prompts on AMX where it is
def test_greedy_tokens_alone_equal_tokens_in_a_batch(demo_gguf: str, dtype: str) -> None:
    llm = LLM(demo_gguf, dtype=dtype, kv_cache_memory=1 << 26, max_model_len=256)
    chats = [[{"role": "user", "content": q}] for q in QUESTIONS]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    together = [list(r.outputs[0].token_ids) for r in llm.chat(chats, params, use_tqdm=False)]
    alone = [list(llm.chat([c], params, use_tqdm=False)[0].outputs[0].token_ids) for c in chats]
    assert all(len(t) == 24 for t in together)
    # measured before the decode mask covered a lone sequence: 3 of these 5 streams went apart
    assert alone == together

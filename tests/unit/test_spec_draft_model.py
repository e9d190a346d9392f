"""Speculative decoding with a draft model (method "draft_model") on tiny random Llamas: the draft
is the target with noise added to its weights, so that some drafts are accepted and some rejected.

The proposer alone drafts what the draft model's own greedy decoding gives (catch-up chunked, its
KV kept across verifications by counter); in the engine, greedy output equals greedy output
without speculation (with prefix-cache hits and n > 1, and under preemption), the draft runs
batched over the step's sequences, the adaptive policy times its forwards, the KV budget counts
the draft's bytes per block, seeded sampling repeats, and a draft of another vocabulary is refused
naming both sizes."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from pagoda.engine import LLM, SamplingParams
from pagoda.engine.runner.attention import get_backend
from pagoda.engine.runner.forward import forward_tokens
from pagoda.engine.spec_decode.draft_model import DraftModelProposer
from pagoda.engine.spec_decode.draft_runner import DraftRunner, kv_bytes_per_block, load_draft_model
from tests.tiny_models import VOCAB, make_tiny_model, save_noisy_draft, save_tiny_tokenizer, tiny_config
from tests.unit.test_spec_engine import Drafts

K = 3
PROMPTS = [
    "The quick brown fox jumps over the lazy dog. The quick brown",
    "abcabcabcabc abcabcabcabc abcabcabcabc abc",
    "Once upon a time there was a tiny model that",
]
GREEDY = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
ENGINE: dict[str, Any] = {
    "kv_cache_memory": 1 << 21,
    "max_model_len": 256,
    "dtype": "float32",
    "device": "cpu",
}


def target_and_draft(root: Path) -> tuple[str, str]:
    """(target, draft) directories under `root`: the draft is the target with noise on every weight."""
    target, draft = root / "target", root / "draft"
    target.mkdir()
    model, _ = make_tiny_model("llama", target)
    save_noisy_draft(model, draft)
    return str(target), str(draft)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    return target_and_draft(tmp_path_factory.mktemp("draft_model"))


def spec_config(draft: str) -> dict[str, Any]:
    """The draft model's config with the adaptive policy off: a draft as big as its target never
    pays (the policy counts the draft's forwards and stops drafting), but these tests need drafts
    every step."""
    return {"method": "draft_model", "model": draft, "num_speculative_tokens": K, "adaptive": False}


@pytest.fixture(scope="module")
def plain(models: tuple[str, str]) -> LLM:
    return LLM(models[0], **ENGINE)


@pytest.fixture(scope="module")
def spec(models: tuple[str, str]) -> LLM:
    return LLM(models[0], speculative_config=spec_config(models[1]), **ENGINE)


def _ids(results: list[Any]) -> list[list[int]]:
    return [c.token_ids for r in results for c in r.outputs]


def _greedy_reference(model: Any, tokens: list[int], k: int) -> list[int]:
    out: list[int] = []
    for _ in range(k):
        hidden = forward_tokens(model, tokens + out)
        out.append(int(model.compute_logits(hidden[-1:]).argmax(-1)))
    return out


def test_proposer_drafts_the_draft_model_s_greedy_tokens(models: tuple[str, str]) -> None:
    """Catch-up in chunks of 5 tokens, then a verification that keeps one draft and one that keeps
    none: each proposal is what the draft model alone decodes greedily."""
    device = torch.device("cpu")
    model = load_draft_model(models[1], VOCAB, 256, device, torch.float32, "none")
    runner = DraftRunner(model, get_backend("torch", device), 64, 4, torch.float32, device)
    tables = {"a": list(range(0, 20)), "b": list(range(40, 60))}
    proposer = DraftModelProposer(runner, K, 256, tables.__getitem__, max_chunk=5)
    seqs = {"a": [5, 9, 33, 33, 71, 2, 8, 100, 101, 7, 7], "b": [44, 3]}
    for rid, tokens in seqs.items():
        proposer.add_request(rid, tokens)
    for verify in ("one", "none", "one"):
        got = proposer.propose(["a", "b"], [K, 2]).draft_token_ids
        want = [_greedy_reference(model, seqs["a"], K), _greedy_reference(model, seqs["b"], 2)]
        assert got == want
        for rid, draft in zip(("a", "b"), got, strict=True):
            # the verified tokens: the first draft and another token, or another token only
            emitted = [draft[0], (draft[1] + 1) % VOCAB] if verify == "one" else [(draft[0] + 1) % VOCAB]
            proposer.append(rid, emitted)
            seqs[rid] += emitted
    assert proposer._states["a"].computed == len(seqs["a"]) - 1  # the kept draft's KV was reused


def test_greedy_equal_with_prefix_hits_n_and_batched_drafts(plain: LLM, spec: LLM) -> None:
    params = dataclasses.replace(GREEDY, n=2)
    want = _ids(plain.generate(PROMPTS, params, use_tqdm=False))
    proposer = spec.engine.spec.speculation.proposer  # type: ignore[union-attr]
    assert isinstance(proposer, DraftModelProposer)
    calls = 0
    propose = proposer.propose

    def counted(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        return propose(*args)

    proposer.propose = counted  # type: ignore[method-assign]
    before, forwards = spec.engine.counters(), proposer.runner.num_forwards
    first = spec.generate(PROMPTS, params, use_tqdm=False)
    again = spec.generate(PROMPTS, params, use_tqdm=False)  # the prompts' blocks are cached now
    del proposer.propose
    assert _ids(first) == want and _ids(again) == want
    assert all(r.num_cached_tokens > 0 for r in again)
    Drafts.since(before, spec.engine.counters()).assert_some_accepted_and_rejected()
    drafted = spec.engine.counters().spec_num_drafts - before.spec_num_drafts
    # one catch-up forward and K - 1 decode forwards per step, whatever the number of sequences
    assert proposer.runner.num_forwards - forwards <= K * calls < K * drafted


def test_greedy_equal_under_preemption(models: tuple[str, str], plain: LLM) -> None:
    small = LLM(
        models[0], speculative_config=spec_config(models[1]), num_blocks=8, max_model_len=128, dtype="float32"
    )
    before = small.engine.counters()
    got = _ids(small.generate(PROMPTS, GREEDY, use_tqdm=False))
    assert small.engine.batcher.num_preemptions > 0
    Drafts.since(before, small.engine.counters()).assert_some_accepted_and_rejected()
    assert got == _ids(plain.generate(PROMPTS, GREEDY, use_tqdm=False))
    assert small.engine.kv.pool.num_free_blocks == 8  # no block leaked


def test_the_adaptive_policy_counts_the_draft_s_forwards(models: tuple[str, str], plain: LLM) -> None:
    """With the policy on, the draft model's proposals are timed: a draft token's cost in target
    rows is measured (positive), and greedy output is still the target's."""
    llm = LLM(models[0], speculative_config={**spec_config(models[1]), "adaptive": True}, **ENGINE)
    assert llm.engine.spec is not None
    policy = llm.engine.spec.speculation.policy
    assert policy is not None and policy.draft_rows() == 0.0
    got = _ids(llm.generate(PROMPTS, GREEDY, use_tqdm=False))
    assert got == _ids(plain.generate(PROMPTS, GREEDY, use_tqdm=False))
    assert policy.drafting.tokens > 0 and policy.draft_rows() > 0.0, policy.drafting


def check_seeded_sampling_repeats(spec: LLM, max_tokens: int) -> None:
    """Two runs of seeded sampling give the same tokens, with drafts accepted on the way."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.1, top_p=0.95, seed=11, ignore_eos=True)
    before = spec.engine.counters()
    first, second = (_ids(spec.generate(PROMPTS, params, use_tqdm=False)) for _ in range(2))
    assert first == second
    assert Drafts.since(before, spec.engine.counters()).accepted > 0


def test_seeded_sampling_repeats(spec: LLM) -> None:
    check_seeded_sampling_repeats(spec, 20)


def test_the_adaptive_key_turns_the_policy_off(spec: LLM) -> None:
    assert spec.engine.spec is not None and spec.engine.spec.speculation.policy is None


def test_kv_budget_counts_the_draft_s_blocks(plain: LLM, spec: LLM) -> None:
    draft = spec.engine.draft_model
    assert draft is not None
    block_size = spec.engine.config.cache.block_size
    target_bytes = kv_bytes_per_block(plain.engine.model, block_size, torch.float32)
    draft_bytes = kv_bytes_per_block(draft, block_size, torch.float32)
    assert plain.engine.num_blocks == ENGINE["kv_cache_memory"] // target_bytes
    assert spec.engine.num_blocks == ENGINE["kv_cache_memory"] // (target_bytes + draft_bytes)
    assert spec.engine.num_blocks < plain.engine.num_blocks


def test_draft_of_another_vocabulary_is_refused(models: tuple[str, str], tmp_path: Path) -> None:
    import transformers as tf

    config = {**tiny_config(1), "vocab_size": VOCAB + 8}
    tf.LlamaForCausalLM(tf.LlamaConfig(**config)).save_pretrained(str(tmp_path))
    save_tiny_tokenizer(tmp_path)
    with pytest.raises(
        ValueError, match=f"vocabulary of {VOCAB + 8} tokens but the target model's has {VOCAB}"
    ):
        LLM(models[0], speculative_config=spec_config(str(tmp_path)), **ENGINE)

"""Mixture-of-experts families against HF transformers (fp32) through the whole engine path: log-probs
of whole and chunked prefills and decodes, greedy generation, and the checkpoint layouts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from pagoda.engine.llm import LLM
from pagoda.engine.loader.hf_loader import arch_from_hf_config
from pagoda.engine.models import build_model
from pagoda.engine.models.moe import MoeForCausalLM, SparseMoeBlock
from pagoda.engine.models.moe_experts import StackedExperts
from pagoda.engine.sampling.params import SamplingParams
from tests.tiny_moe_models import MOE_KINDS, make_tiny_moe
from tests.unit.test_model_parity import PROMPTS, _assert_matches_hf


@pytest.mark.parametrize("kind", MOE_KINDS)
@pytest.mark.parametrize("budget", [2048, 8], ids=["whole-prefill", "chunked"])
def test_moe_logprobs_match_hf(tmp_path: Path, kind: str, budget: int) -> None:
    """Renormalised top-k (mixtral, qwen3_moe, granitemoe) and not (qwen2_moe, with its shared
    expert and a dense layer), Granite's multipliers, Qwen3's q/k norms."""
    hf = make_tiny_moe(kind, tmp_path)
    _assert_matches_hf(hf, tmp_path, budget)


def test_topk_renormalisation_follows_the_config(tmp_path: Path) -> None:
    """qwen3_moe with norm_topk_prob off: HF's logits change (so a flag ignored would fail), and
    the engine follows."""
    hf = make_tiny_moe("qwen3_moe", tmp_path, norm_topk_prob=False)
    full = torch.tensor([PROMPTS[0]])
    with torch.inference_mode():
        plain = hf(full).logits
        hf.config.norm_topk_prob = True
        for layer in hf.model.layers:
            layer.mlp.gate.norm_topk_prob = True
        assert not torch.allclose(hf(full).logits, plain, atol=1e-3)
        hf.config.norm_topk_prob = False
        for layer in hf.model.layers:
            layer.mlp.gate.norm_topk_prob = False
    _assert_matches_hf(hf, tmp_path, 8)


def test_moe_greedy_generation_matches_hf(tmp_path: Path) -> None:
    """The offline API's greedy tokens for a batch of prompts equal HF's generate, prompt by prompt."""
    hf = make_tiny_moe("mixtral", tmp_path)
    llm = LLM(str(tmp_path), dtype="float32", kv_cache_memory=1 << 22, max_model_len=256, block_size=16)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    got = [r.outputs[0].token_ids for r in llm.generate(PROMPTS, params, use_tqdm=False)]
    for prompt, tokens in zip(PROMPTS, got, strict=True):
        with torch.inference_mode():
            ids = torch.tensor([prompt])
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
        assert tokens == ref[0, len(prompt) :].tolist()


def _engine_model(path: Path, state: dict[str, torch.Tensor]) -> MoeForCausalLM:
    arch = arch_from_hf_config(json.loads((path / "config.json").read_text()))
    with torch.device("meta"):
        model = build_model(arch, 256)
    assert isinstance(model, MoeForCausalLM)
    model.load_weights(state.items(), torch.device("cpu"), torch.float32)
    return model


@pytest.mark.parametrize("kind", ["mixtral", "granitemoe"])
def test_stacked_checkpoint_layout_loads(tmp_path: Path, kind: str) -> None:
    """transformers 5's own names (experts stacked as gate_up_proj/down_proj, Mixtral's
    block_sparse_moe as mlp, Granite's router.weight) load into the same weights as the saved
    per-expert checkpoint."""
    hf = make_tiny_moe(kind, tmp_path)
    from safetensors.torch import load_file

    saved = _engine_model(tmp_path, load_file(str(tmp_path / "model.safetensors")))
    stacked = _engine_model(tmp_path, hf.state_dict())
    for (name, a), (_, b) in zip(saved.named_parameters(), stacked.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    block = saved.layers[0].mlp
    assert isinstance(block, SparseMoeBlock) and isinstance(block.experts, StackedExperts)
    hf_experts: Any = (
        hf.model.layers[0].mlp.experts if kind == "mixtral" else hf.model.layers[0].block_sparse_moe.experts
    )
    assert torch.equal(block.experts.gate_up_proj, hf_experts.gate_up_proj.detach())


def test_incomplete_experts_are_refused(tmp_path: Path) -> None:
    make_tiny_moe("qwen2_moe", tmp_path)
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "model.safetensors"))
    del state["model.layers.0.mlp.experts.3.up_proj.weight"]
    with pytest.raises(ValueError, match="7 of 8 expert tensors"):
        _engine_model(tmp_path, state)

"""Mixture-of-experts families against HF transformers (fp32) through the whole engine path: log-probs
of whole and chunked prefills and decodes, greedy generation, and the checkpoint layouts."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from pagoda.engine.llm import LLM
from pagoda.engine.loader.hf_loader import arch_from_hf_config
from pagoda.engine.models import build_model
from pagoda.engine.models.moe import MoeForCausalLM, Router, SparseMoeBlock
from pagoda.engine.models.moe_experts import Int8Experts, StackedExperts
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


def test_int8_quantizes_the_experts(tmp_path: Path) -> None:
    """`--quantization int8`: stacked experts become Int8Experts (the router stays dense), and the
    log-probs stay near float32's."""
    make_tiny_moe("qwen2_moe", tmp_path)
    params = SamplingParams(max_tokens=4, temperature=0.0, logprobs=1, ignore_eos=True)
    runs = {}
    for method in ("none", "int8"):
        llm = LLM(
            str(tmp_path), dtype="float32", kv_cache_memory=1 << 22, max_model_len=256, quantization=method
        )
        runs[method] = llm.generate(PROMPTS[:1], params, use_tqdm=False)[0].outputs[0]
    block = llm.engine.model.layers[0].mlp
    assert isinstance(block, SparseMoeBlock) and isinstance(block.experts, Int8Experts)
    assert isinstance(block.gate, Router)
    dense, int8 = runs["none"], runs["int8"]
    assert int8.token_ids[0] == dense.token_ids[0]
    assert dense.logprobs is not None and int8.logprobs is not None
    assert abs(int8.logprobs[0].logprob - dense.logprobs[0].logprob) < 0.05


def test_int4_refuses_experts(tmp_path: Path) -> None:
    make_tiny_moe("mixtral", tmp_path)
    with pytest.raises(ValueError, match="--quantization int4 does not cover mixture-of-experts"):
        LLM(str(tmp_path), dtype="bfloat16", kv_cache_memory=1 << 22, max_model_len=256, quantization="int4")


@pytest.mark.parametrize("arch", ["llama", "qwen3moe"])
def test_moe_gguf_is_refused(tmp_path: Path, arch: str) -> None:
    """Mixtral GGUFs are "llama" with an expert count; Qwen's MoE GGUFs have their own names."""
    import numpy as np
    from gguf import GGUFWriter

    from pagoda.engine.loader import ModelLoadError
    from pagoda.engine.loader.gguf_loader import load_gguf

    path = tmp_path / "moe.gguf"
    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_expert_count(4)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="mixture-of-experts GGUF"):
        load_gguf(path)


def test_moe_decode_steps_run_eagerly(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The default `--compile auto` is turned off for an MoE model, with the reason logged
    (docs/moe.md); `--compile on` is refused, naming the fix."""
    make_tiny_moe("granitemoe", tmp_path)
    args: dict[str, Any] = dict(dtype="float32", kv_cache_memory=1 << 22, max_model_len=256)
    with pytest.raises(ValueError, match=r"cannot trace a mixture-of-experts model.*drop --compile"):
        LLM(str(tmp_path), compile="on", **args)
    with caplog.at_level(logging.INFO, logger="pagoda.engine.core.engine_core"):
        llm = LLM(str(tmp_path), compile="auto", **args)
    assert llm.engine.runner.compiled is None
    assert "mixture-of-experts model run eagerly" in caplog.text
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    assert len(llm.generate(PROMPTS[:1], params, use_tqdm=False)[0].outputs[0].token_ids) == 3

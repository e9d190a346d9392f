"""Quantized linears against their dequantized references, and the engine running on them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from pagoda.engine.llm import LLM
from pagoda.engine.models.quantization import (
    Int4WeightOnlyLinear,
    Int8DynamicLinear,
    quantize_linears,
    resolve_quantization,
)
from pagoda.engine.sampling.params import SamplingParams
from tests.tiny_models import VOCAB, make_tiny_model


def _linear(out_f: int, in_f: int, bias: bool = False) -> nn.Linear:
    torch.manual_seed(0)
    lin = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.normal_(0, 0.05)
    return lin


def _q41_grid(w: torch.Tensor) -> torch.Tensor:
    """Put each group of 32 weights on a 16-level grid, as GGUF Q4_1 dequantizes them."""
    g = w.view(w.shape[0], -1, 32)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    step = (hi - lo) / 15
    return (((g - lo) / step).round() * step + lo).view_as(w)


@pytest.mark.parametrize("tokens", [1, 5, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_int4_is_exact_on_q4_grid_weights(tokens: int, bias: bool) -> None:
    lin = _linear(96, 128, bias)
    with torch.no_grad():
        lin.weight.copy_(_q41_grid(lin.weight))
    q = Int4WeightOnlyLinear(lin)
    x = torch.randn(tokens, 128).bfloat16()
    ref = nn.functional.linear(x.float(), lin.weight, lin.bias)
    torch.testing.assert_close(q(x).float(), ref, atol=3e-2, rtol=2e-2)  # bf16 activations only


def test_int4_rejects_uneven_groups_and_int8_is_close_and_batch_invariant() -> None:
    with pytest.raises(ValueError, match="divisible by 32"):
        Int4WeightOnlyLinear(_linear(8, 48))
    lin = _linear(64, 96, bias=True)
    x = torch.randn(7, 96)
    ref = lin(x)
    dyn = Int8DynamicLinear(lin)
    got = dyn(x)
    assert (got - ref).norm() / ref.norm() < 0.03
    # per-row activation scales: a row's result does not depend on the rest of its batch
    alone = torch.cat([dyn(x[i : i + 1]) for i in range(len(x))])
    torch.testing.assert_close(alone, got, rtol=0, atol=0)
    loud = x.clone()
    loud[3] *= 100
    torch.testing.assert_close(dyn(loud)[:3], got[:3], rtol=0, atol=0)
    assert (dyn(x.bfloat16()).float() - ref).norm() / ref.norm() < 0.03  # bf16 in, bf16 out


def test_quantize_linears_keeps_the_head_at_8_bits() -> None:
    model = nn.Module()
    model.proj = _linear(64, 64)
    model.lm_head = _linear(32, 64)
    assert quantize_linears(model, "int4") == 2
    assert isinstance(model.proj, Int4WeightOnlyLinear) and isinstance(model.lm_head, Int8DynamicLinear)
    with pytest.raises(ValueError, match="quantization must be one of"):
        resolve_quantization("fp8", torch.device("cpu"))
    assert resolve_quantization("auto", torch.device("cpu")) == "none"


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_engine_on_int4_tracks_hf_and_is_batch_invariant(tmp_path: Path, kind: str) -> None:
    hf, _ = make_tiny_model(kind, tmp_path)
    llm = LLM(
        str(tmp_path), dtype="bfloat16", quantization="int4", kv_cache_memory=1 << 22, max_model_len=256
    )
    prompts = [[256, *range(40, 60)], [256, 7, 8, 9], [256, *range(100, 140)]]
    params = SamplingParams(max_tokens=5, temperature=0.0, logprobs=VOCAB, ignore_eos=True)
    batch = llm.generate(prompts, params, use_tqdm=False)
    alone = [llm.generate([p], params, use_tqdm=False)[0] for p in prompts]
    assert [r.outputs[0].token_ids for r in batch] == [r.outputs[0].token_ids for r in alone]
    for prompt, res in zip(prompts, batch, strict=True):
        out = res.outputs[0]
        assert out.logprobs is not None
        with torch.inference_mode():
            ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0, -1].float(), -1)
        got = torch.tensor([out.logprobs[0].top[t] for t in range(VOCAB)])
        # total variation of the first distribution: ~0.18 here (random weights are far from a 4-bit
        # grid), ~1 for a broken kernel
        assert (got.exp() - ref.exp()).abs().sum() < 0.3


def test_auto_serves_the_checkpoints_own_quantization_and_names_must_match() -> None:
    cpu = torch.device("cpu")
    assert resolve_quantization("auto", cpu, "gguf") == "gguf"
    assert resolve_quantization("compressed-tensors", cpu, "compressed-tensors") == "compressed-tensors"
    assert resolve_quantization("none", cpu, "awq") == "none"  # dequantized
    with pytest.raises(ValueError, match="does not match the model, which is not quantized"):
        resolve_quantization("gptq", cpu, None)
    with pytest.raises(ValueError, match="which is gguf-quantized; use auto"):
        resolve_quantization("awq", cpu, "gguf")

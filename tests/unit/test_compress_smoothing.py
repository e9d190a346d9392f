"""SmoothQuant/AWQ factors folded into the weights leave the model's function unchanged: every
identity of pagoda/compress/smoothing.py (norm -> q/k/v, norm -> gate/up, up -> down, v -> o) on
the engine's own model, for Llama (multi-head, so v -> o applies), Qwen2 (a v bias) and Qwen3
(q/k norms after the projections)."""

from __future__ import annotations

import pytest
import torch

from pagoda.compress.calibration import build_float_model
from pagoda.compress.smoothing import fold, layer_smoothings, smoothed_hessian
from pagoda.engine.models import build_model
from pagoda.engine.models.arch_config import ModelArchConfig
from pagoda.engine.runner.forward import forward_tokens
from tests.tiny_models import hf_state_dict


def _arch(architecture: str, num_kv_heads: int = 4) -> ModelArchConfig:
    return ModelArchConfig(
        architecture=architecture,
        vocab_size=50,
        hidden_size=32,
        intermediate_size=48,
        num_layers=2,
        num_heads=4,
        num_kv_heads=num_kv_heads,
        head_dim=8,
        attention_bias=architecture == "qwen2",
        qk_norm=architecture == "qwen3",
    )


def _random_weights(arch: ModelArchConfig) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model(arch, 64)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
    return hf_state_dict(model)


def _hidden(arch: ModelArchConfig, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    model = build_float_model(arch, weights.items(), 64)
    return forward_tokens(model, list(range(3, 40)))


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "qwen3"])
def test_folded_factors_leave_the_output_unchanged(architecture: str) -> None:
    arch = _arch(architecture)
    weights = _random_weights(arch)
    before = _hidden(arch, weights)
    gen = torch.Generator().manual_seed(1)
    sites = []
    for i in range(arch.num_layers):
        for smoothing in layer_smoothings(arch, i, with_v_to_o=True):
            n = weights[smoothing.linears[0] + ".weight"].shape[1]
            fold(weights, smoothing, torch.rand(n, generator=gen) * 3.5 + 0.25)  # s in [0.25, 3.75]
            sites.append(smoothing.site.split(".", 2)[2])
    assert sites.count("self_attn.o_proj") == arch.num_layers  # v -> o applied (multi-head)
    after = _hidden(arch, weights)
    assert (after - before).abs().max() < 1e-4 * before.abs().max(), (after - before).abs().max()


def test_scaling_only_the_linears_is_caught() -> None:
    """The comparison above can fail: scaling the columns without the matching division changes
    the output far beyond float32 rounding."""
    arch = _arch("llama")
    weights = _random_weights(arch)
    before = _hidden(arch, weights)
    smoothing = layer_smoothings(arch, 0, with_v_to_o=False)[0]
    for name in smoothing.linears:
        weights[name + ".weight"] = weights[name + ".weight"] * 1.5
    after = _hidden(arch, weights)
    assert (after - before).abs().max() > 1e-2 * before.abs().max()


def test_grouped_query_attention_skips_v_to_o() -> None:
    gqa = layer_smoothings(_arch("llama", num_kv_heads=2), 0, with_v_to_o=True)
    assert [s.site for s in gqa] == [
        "layers.0.self_attn.qkv_proj",
        "layers.0.mlp.gate_up_proj",
        "layers.0.mlp.down_proj",
    ]
    assert [s.source for s in gqa] == [
        "model.layers.0.input_layernorm",
        "model.layers.0.post_attention_layernorm",
        "model.layers.0.mlp.up_proj",
    ]


def test_smoothed_hessian_is_the_hessian_of_the_smoothed_input() -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(100, 12, generator=gen, dtype=torch.float64)
    s = torch.rand(12, generator=gen, dtype=torch.float64) + 0.5
    h = 2 / 100 * x.t() @ x
    expected = 2 / 100 * (x / s).t() @ (x / s)
    assert torch.allclose(smoothed_hessian(h, s).double(), expected, rtol=1e-6, atol=0)

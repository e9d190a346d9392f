"""The fused MoE kernel and the CPU grouped path against the per-token reference."""

from __future__ import annotations

import pytest
import torch

from pagoda.engine.models.moe import route
from pagoda.engine.models.moe_experts import Int8Experts, StackedExperts, sort_by_expert
from pagoda.kernels.fused_moe import align_by_expert, fused_moe
from pagoda.kernels.reference import fused_moe_ref
from tests.kernels import DEV

TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _problem(
    tokens: int, hidden: int, inter: int, experts: int, top_k: int, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=g) / hidden**0.5
    w2 = torch.randn(experts, hidden, inter, generator=g) / inter**0.5
    weights, ids = route(torch.randn(tokens, experts, generator=g), top_k, renormalize=seed % 2 == 0)
    return x.to(dtype), w13.to(dtype), w2.to(dtype), weights, ids


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    scale = want.float().abs().max().clamp(min=1e-6)
    torch.testing.assert_close(got.float() / scale, want.float() / scale, atol=TOL[dtype], rtol=0)


@pytest.mark.parametrize(
    ("tokens", "hidden", "inter", "experts", "top_k", "dtype", "block_m"),
    [
        (1, 64, 32, 4, 2, torch.float32, None),  # a decode row: most experts empty
        (7, 96, 48, 8, 3, torch.float32, 16),  # partial N and K tiles, top-3
        (33, 64, 80, 5, 2, torch.float16, 16),  # 66 rows: groups cross block boundaries
        (16, 128, 64, 16, 1, torch.float16, None),  # top-1
        (20, 64, 32, 3, 3, torch.float32, 64),  # every expert in every token
    ],
)
def test_fused_moe_matches_reference(
    tokens: int, hidden: int, inter: int, experts: int, top_k: int, dtype: torch.dtype, block_m: int | None
) -> None:
    x, w13, w2, weights, ids = (t.to(DEV) for t in _problem(tokens, hidden, inter, experts, top_k, dtype))
    got = fused_moe(x, w13, w2, weights, ids, block_m=block_m)
    _close(got, fused_moe_ref(x, w13, w2, weights, ids), dtype)


def test_fused_moe_int8_experts() -> None:
    """Int8 codes and per-channel scales: the kernel against the reference on the dequantized weights."""
    x, w13, w2, weights, ids = _problem(9, 64, 48, 4, 2, torch.float32)
    experts = StackedExperts(4, 64, 48)
    experts.gate_up_proj.data, experts.down_proj.data = w13, w2
    q = Int8Experts(experts).to(DEV)
    d13, d2 = q.dequantized()
    got = fused_moe(
        x.to(DEV),
        q.gate_up_codes,
        q.down_codes,
        weights.to(DEV),
        ids.to(DEV),
        q.gate_up_scales,
        q.down_scales,
    )
    _close(got, fused_moe_ref(x.to(DEV), d13, d2, weights.to(DEV), ids.to(DEV)), torch.float32)


def test_align_by_expert_groups_and_pads() -> None:
    ids = torch.tensor([[2, 0], [2, 1], [0, 2]])
    rows, experts = align_by_expert(ids, 4, 4)
    pad = ids.numel()
    assert rows.tolist()[:12] == [1, 4, pad, pad, 3, pad, pad, pad, 0, 2, 5, pad]
    assert experts.tolist() == [0, 1, 2, -1, -1, -1, -1][: experts.numel()]
    order, counts = sort_by_expert(ids, 4)
    assert counts.tolist() == [2, 1, 3, 0] and ids.reshape(-1)[order].tolist() == [0, 0, 1, 2, 2, 2]


@pytest.mark.parametrize("grouped_mm", [True, False], ids=["grouped_mm", "per-expert"])
@pytest.mark.parametrize(("tokens", "dtype"), [(1, torch.float32), (13, torch.float32), (40, torch.bfloat16)])
def test_cpu_experts_match_reference(grouped_mm: bool, tokens: int, dtype: torch.dtype) -> None:
    """StackedExperts on the CPU (one grouped_mm, or a matmul per expert present) and Int8Experts."""
    x, w13, w2, weights, ids = _problem(tokens, 64, 32, 6, 2, dtype, seed=tokens)
    experts = StackedExperts(6, 64, 32)
    experts.gate_up_proj.data, experts.down_proj.data = w13, w2
    experts.use_grouped_mm = grouped_mm
    _close(experts(x, weights, ids), fused_moe_ref(x, w13, w2, weights, ids), dtype)
    q = Int8Experts(experts)
    _close(q(x, weights, ids), fused_moe_ref(x, *q.dequantized(), weights, ids), dtype)

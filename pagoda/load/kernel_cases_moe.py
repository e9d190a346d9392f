"""`pagoda bench kernels` case of the fused MoE kernel (pagoda/kernels/fused_moe.py) against the
experts' torch path (rows sorted by expert, a matmul per expert present: what a GPU without Triton
runs), at Mixtral-8x7B's expert sizes on a GPU and toy ones under the interpreter."""

from __future__ import annotations

import torch

from pagoda.load.kernel_cases import Case, Shapes, rel_err


def moe_cases(s: Shapes) -> list[Case]:
    from pagoda.engine.models.moe import route
    from pagoda.engine.models.moe_experts import StackedExperts, run_sorted
    from pagoda.kernels.fused_moe import fused_moe
    from pagoda.kernels.reference import fused_moe_ref

    hidden, inter, experts, top_k = (4096, 14336, 8, 2) if s.big else (128, 64, 4, 2)
    layer = StackedExperts(experts, hidden, inter)
    layer.gate_up_proj.data = s.rnd(experts, 2 * inter, hidden) / hidden**0.5
    layer.down_proj.data = s.rnd(experts, hidden, inter) / inter**0.5
    w13, w2 = layer.gate_up_proj, layer.down_proj
    cases = []
    for tokens in (1, 16, 256) if s.big else (1, 9):
        x = s.rnd(tokens, hidden)
        weights, ids = route(torch.randn(tokens, experts, device=s.device), top_k, True)
        touched = min(experts, tokens * top_k)  # experts whose weights a step reads, at most
        cases.append(
            Case(
                "fused moe",
                f"t{tokens} h{hidden} i{inter} e{experts} k{top_k}",
                touched * 3 * hidden * inter * s.el + 2 * tokens * hidden * s.el,
                2 * tokens * top_k * 3 * hidden * inter,
                lambda x=x, weights=weights, ids=ids: fused_moe(x, w13, w2, weights, ids),  # type: ignore[misc]
                lambda x=x, weights=weights, ids=ids: run_sorted(x, weights, ids, experts, layer._sorted_mlp),  # type: ignore[misc]
                "sorted per expert",
                lambda x=x, weights=weights, ids=ids: rel_err(  # type: ignore[misc]
                    fused_moe(x, w13, w2, weights, ids), fused_moe_ref(x, w13, w2, weights, ids).float()
                ),
            )
        )
    return cases

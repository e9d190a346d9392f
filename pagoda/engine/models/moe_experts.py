"""The experts of a mixture-of-experts layer: num_experts gated MLPs held as stacked weights
(gate_up_proj [E, 2 * inter, hidden], gate rows first, and down_proj [E, hidden, inter]), so an
expert-parallel split is a slice along the first dimension.

A step's rows are sorted by expert once (`sort_by_expert`); each expert then runs its contiguous
slice of rows. On the CPU the slices run as one `F.grouped_mm` where torch has it (2.8+; rows
aligned to 16 bytes), else one matmul per expert present: never a loop over tokens. grouped_mm
against the per-expert loop on this repository's 2-core EPYC (hidden 1024, inter 512, best of 9,
ms; docs/moe.md, pagoda/load/bench_moe_cpu.py): bf16, 32 experts top-4: 0.80 vs 0.85 at 1 token,
5.05 vs 5.78 at 8, 10.85 vs 11.73 at 64, 17.75 vs 19.38 at 256; 64 experts top-8: 1.61 vs 1.73,
10.78 vs 11.98, 21.13 vs 23.95, 36.05 vs 38.69. float32 ties (both bound by reading the
weights). Both give bitwise the same rows. On a GPU with Triton the experts run as
pagoda/kernels/fused_moe.py.

`--quantization int8` turns the experts into Int8Experts: int8 codes stacked as the dense weights,
one float32 scale per expert and output channel (weight-only); the CPU runs each expert's slice
through `_weight_int8pack_mm`, a GPU the fused kernel with the scales applied per tile.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pagoda.kernels.runtime import triton_installed

# rows [n, in], the expert, which matrix (0: gate_up, 1: down) -> [n, out]
ExpertMatmul = Callable[[torch.Tensor, int, int], torch.Tensor]
# rows [n, in] sorted by expert, their int32 offsets (cumulative counts [E]), which matrix -> [n, out]
GroupedMatmul = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def sort_by_expert(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order [T * k]: the flat (token, slot) positions grouped by expert, tokens in order within
    each; counts [E]: rows per expert) for topk_ids [T, k]."""
    flat = topk_ids.reshape(-1)
    order = flat.argsort(stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    return order, counts


def run_sorted(
    x: torch.Tensor,  # [T, hidden]
    topk_weights: torch.Tensor,  # [T, k] float32
    topk_ids: torch.Tensor,  # [T, k]
    num_experts: int,
    gated_mlp: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],  # (rows, counts) -> rows out
) -> torch.Tensor:  # [T, hidden]
    """Each token through its experts: rows gathered in expert order, `gated_mlp` over the sorted
    rows, then weighted and added back per token in float32 (experts in increasing order, as HF
    transformers adds them)."""
    k = topk_ids.shape[1]
    order, counts = sort_by_expert(topk_ids, num_experts)
    token = order // k
    ys = gated_mlp(x[token], counts).float() * topk_weights.reshape(-1)[order, None]  # [T * k, hidden]
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    return out.index_add_(0, token, ys).to(x.dtype)


def sorted_gated_mlp(
    rows: torch.Tensor, counts: torch.Tensor, matmul: ExpertMatmul, grouped: GroupedMatmul | None = None
) -> torch.Tensor:
    """down(silu(gate(rows)) * up(rows)) for rows sorted by expert (counts [E] of each): `grouped`
    (taking the cumulative counts as int32 offsets) where given, else `matmul` per expert present."""
    if grouped is not None:
        offs = counts.cumsum(0).to(torch.int32)
        gate, up = grouped(rows, offs, 0).chunk(2, dim=-1)
        return grouped((F.silu(gate) * up).contiguous(), offs, 1)
    outs, start = [], 0
    for e, n in enumerate(counts.tolist()):
        if n:
            gate, up = matmul(rows[start : start + n], e, 0).chunk(2, dim=-1)
            outs.append(matmul(F.silu(gate) * up, e, 1))
            start += n
    return torch.cat(outs) if outs else rows.new_zeros(0, rows.shape[1])


def _grouped_mm_usable(x: torch.Tensor, *dims: int) -> bool:
    """F.grouped_mm (torch 2.8+) on the CPU: row strides a multiple of 16 bytes."""
    if (
        not hasattr(F, "grouped_mm")
        or x.device.type != "cpu"
        or x.dtype not in (torch.float32, torch.bfloat16)
    ):
        return False
    return all(d * x.element_size() % 16 == 0 for d in dims)


def _use_fused(x: torch.Tensor) -> bool:
    return x.device.type == "cuda" and triton_installed()


class StackedExperts(nn.Module):
    """num_experts gated MLPs (SiLU) of `inter` units over `hidden`, as stacked weights."""

    def __init__(self, num_experts: int, hidden: int, inter: int) -> None:
        super().__init__()
        self.num_experts, self.hidden, self.inter = num_experts, hidden, inter
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, inter), requires_grad=False)
        self.use_grouped_mm = True  # False: one matmul per expert present (tests compare the two)

    def forward(
        self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:  # x [T, hidden], topk_* [T, k] -> [T, hidden]
        if _use_fused(x):
            from pagoda.kernels.fused_moe import fused_moe

            return fused_moe(x, self.gate_up_proj, self.down_proj, topk_weights, topk_ids)
        return run_sorted(x, topk_weights, topk_ids, self.num_experts, self._sorted_mlp)

    def _sorted_mlp(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        weights = (self.gate_up_proj, self.down_proj)

        def grouped(r: torch.Tensor, offs: torch.Tensor, which: int) -> torch.Tensor:
            return F.grouped_mm(r, weights[which].transpose(1, 2), offs=offs)  # type: ignore[no-any-return]

        def matmul(r: torch.Tensor, e: int, which: int) -> torch.Tensor:
            return F.linear(r, weights[which][e])

        usable = self.use_grouped_mm and _grouped_mm_usable(rows, self.hidden, self.inter)
        return sorted_gated_mlp(rows, counts, matmul, grouped if usable else None)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, hidden={self.hidden}, inter={self.inter}"


def _int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [E, out, in] -> (codes int8 [E, out, in], scales float32 [E, out]), symmetric."""
    w = w.detach().float()
    scales = w.abs().amax(-1).clamp(min=1e-8) / 127.0
    return (w / scales[..., None]).round().clamp(-127, 127).to(torch.int8), scales


class Int8Experts(nn.Module):
    """StackedExperts with weight-only int8 weights: codes [E, out, in] and a float32 scale per
    expert and output channel, w = code * scale (`--quantization int8`)."""

    kind = "int8-experts"
    gate_up_codes: torch.Tensor  # [E, 2 * inter, hidden] int8
    gate_up_scales: torch.Tensor  # [E, 2 * inter] float32
    down_codes: torch.Tensor  # [E, hidden, inter] int8
    down_scales: torch.Tensor  # [E, hidden] float32

    def __init__(self, experts: StackedExperts) -> None:
        super().__init__()
        self.num_experts, self.hidden, self.inter = experts.num_experts, experts.hidden, experts.inter
        w13, s13 = _int8_per_channel(experts.gate_up_proj)
        w2, s2 = _int8_per_channel(experts.down_proj)
        self.register_buffer("gate_up_codes", w13)
        self.register_buffer("gate_up_scales", s13)
        self.register_buffer("down_codes", w2)
        self.register_buffer("down_scales", s2)

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        codes = (self.gate_up_codes, self.down_codes)
        scales = (self.gate_up_scales, self.down_scales)
        if _use_fused(x):
            from pagoda.kernels.fused_moe import fused_moe

            return fused_moe(x, codes[0], codes[1], topk_weights, topk_ids, scales[0], scales[1])

        def matmul(rows: torch.Tensor, e: int, which: int) -> torch.Tensor:
            if rows.device.type == "cpu" and rows.dtype in (torch.float32, torch.bfloat16):
                return torch._weight_int8pack_mm(rows, codes[which][e], scales[which][e].to(rows.dtype))
            return F.linear(rows, codes[which][e].to(rows.dtype) * scales[which][e, :, None].to(rows.dtype))

        return run_sorted(
            x, topk_weights, topk_ids, self.num_experts, lambda r, c: sorted_gated_mlp(r, c, matmul)
        )

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:  # ([E, 2I, H], [E, H, I]) float32
        return (
            self.gate_up_codes.float() * self.gate_up_scales[..., None],
            self.down_codes.float() * self.down_scales[..., None],
        )

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, hidden={self.hidden}, inter={self.inter}, int8 per channel"


def quantize_experts(model: nn.Module, method: str) -> int:
    """Replace the model's StackedExperts by Int8Experts (`--quantization int8`); returns how many.
    int4 is refused: its packed CPU layout is per matrix, not stacked."""
    stacked = [(name, m) for name, m in model.named_modules() if isinstance(m, StackedExperts)]
    if not stacked:
        return 0
    if method != "int8":
        raise ValueError(
            f"--quantization {method} does not cover mixture-of-experts layers; "
            "use --quantization int8 (experts and linears) or none"
        )
    for name, experts in stacked:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, Int8Experts(experts))
    return len(stacked)

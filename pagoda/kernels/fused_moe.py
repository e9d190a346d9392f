"""Fused mixture-of-experts MLP: each token through its top-k experts' gated MLPs in two launches
of one grouped GEMM over rows sorted by expert (the design of vLLM's fused_moe).

1. `align_by_expert`: the T * k (token, slot) rows grouped by expert, each expert's group padded
   to a multiple of BLOCK_M, so that every BLOCK_M-row block belongs to one expert. Written with
   torch ops that never read a value back to the host (scatter_add, cumsum, searchsorted): the
   launch grid depends on T, k and E only, so a decode step can be captured in a CUDA graph.
2. `_moe_gemm_kernel`, GATED: act[row] = silu(x[token] @ W_gate[e].T) * (x[token] @ W_up[e].T),
   both halves of gate_up_proj [E, 2I, H] read in the same K loop.
3. `_moe_gemm_kernel`, WEIGHTED: out[row] = weight[row] * (act[row] @ W_down[e].T), float32.
4. out.view(T, k, H).sum(1): the weighted combine, in float32, in slot order (deterministic).

Int8 experts (`--quantization int8`) pass codes [E, N, K] and per-channel scales [E, N]: the
codes convert exactly to the activation dtype in the K loop and the scale multiplies the tile
once after it. Reference: kernels/reference.py `fused_moe_ref`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagoda.kernels.runtime import dot_upcast


def align_by_expert(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted_rows [T*k + E*(block_m-1)]: flat row ids t*k+j grouped by expert, each group padded
    to a multiple of block_m with T*k (a row that does not exist); block_experts [blocks]: the
    expert of each block_m block, -1 past the last group)."""
    flat = topk_ids.reshape(-1)
    n = flat.numel()
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)  # [E]: where each expert's padded group ends
    order = flat.argsort(stable=True)  # rows grouped by expert
    expert_of = flat[order]
    rank = torch.arange(n, device=flat.device) - (counts.cumsum(0) - counts)[expert_of]
    capacity = n + num_experts * (block_m - 1)
    sorted_rows = torch.full((capacity,), n, dtype=torch.int64, device=flat.device)
    sorted_rows.scatter_(0, ends[expert_of] - padded[expert_of] + rank, order)
    block_starts = torch.arange(0, capacity, block_m, device=flat.device)
    experts = torch.searchsorted(ends, block_starts, right=True)
    return sorted_rows, torch.where(experts < num_experts, experts, -1)


@triton.jit
def _moe_gemm_kernel(  # type: ignore[no-untyped-def]
    out_ptr, a_ptr, w_ptr, scale_ptr, rows_ptr, experts_ptr, topk_w_ptr,
    num_rows, N, K, top_k,
    stride_am, stride_we, stride_wn, stride_se, stride_om,
    GATED: tl.constexpr, A_PER_TOKEN: tl.constexpr, WEIGHTED: tl.constexpr, SCALED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """out[rows of block m, N tile n] of one expert; GATED: silu(gate) * up from W rows n and N + n."""
    expert = tl.load(experts_ptr + tl.program_id(0))
    if expert < 0:  # a block past the last expert's group
        return
    rows = tl.load(rows_ptr + tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M))  # [BLOCK_M]
    m_ok = rows < num_rows
    a_rows = rows // top_k if A_PER_TOKEN else rows
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    rk = tl.arange(0, BLOCK_K)
    a_base = a_ptr + a_rows[:, None].to(tl.int64) * stride_am
    w_base = w_ptr + expert.to(tl.int64) * stride_we + rn[None, :].to(tl.int64) * stride_wn  # [1, BLOCK_N]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + rk) < K
        a = tl.load(a_base + (k0 + rk)[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w_mask = n_ok[None, :] & k_ok[:, None]
        w = tl.load(w_base + (k0 + rk)[:, None], mask=w_mask, other=0)  # [BLOCK_K, BLOCK_N]
        acc += _dot(a, w, UPCAST)
        if GATED:
            w_up = tl.load(w_base + N * stride_wn + (k0 + rk)[:, None], mask=w_mask, other=0)
            acc_up += _dot(a, w_up, UPCAST)
    if SCALED:
        s_base = scale_ptr + expert.to(tl.int64) * stride_se
        acc *= tl.load(s_base + rn, mask=n_ok, other=0.0)[None, :]
        if GATED:
            acc_up *= tl.load(s_base + N + rn, mask=n_ok, other=0.0)[None, :]
    if GATED:
        acc = acc * tl.sigmoid(acc) * acc_up
    if WEIGHTED:
        acc *= tl.load(topk_w_ptr + rows, mask=m_ok, other=0.0)[:, None]
    out = out_ptr + rows[:, None].to(tl.int64) * stride_om + rn[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _dot(a, w, UPCAST: tl.constexpr):  # type: ignore[no-untyped-def]
    if UPCAST:
        return tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
    return tl.dot(a, w.to(a.dtype))


def _launch(
    out: torch.Tensor,
    a: torch.Tensor,
    w: torch.Tensor,
    scales: torch.Tensor | None,
    sorted_rows: torch.Tensor,
    block_experts: torch.Tensor,
    topk_weights: torch.Tensor,
    top_k: int,
    gated: bool,
    block_m: int,
) -> None:
    n = w.shape[1] // 2 if gated else w.shape[1]
    k = w.shape[2]
    block_n = 64 if n >= 64 else 32
    block_k = 64 if k >= 64 else 32
    grid = (block_experts.shape[0], triton.cdiv(n, block_n))
    _moe_gemm_kernel[grid](
        out, a, w, scales if scales is not None else topk_weights, sorted_rows, block_experts, topk_weights,
        out.shape[0], n, k, top_k,
        a.stride(0), w.stride(0), w.stride(1), scales.stride(0) if scales is not None else 0, out.stride(0),
        GATED=gated, A_PER_TOKEN=gated, WEIGHTED=not gated, SCALED=scales is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, UPCAST=dot_upcast(a.dtype),
    )  # fmt: skip


def fused_moe(
    x: torch.Tensor,  # [T, hidden]
    w13: torch.Tensor,  # [E, 2 * inter, hidden] (int8 codes with w13_scales)
    w2: torch.Tensor,  # [E, hidden, inter]
    topk_weights: torch.Tensor,  # [T, k] float32
    topk_ids: torch.Tensor,  # [T, k]
    w13_scales: torch.Tensor | None = None,  # [E, 2 * inter] float32: int8 experts
    w2_scales: torch.Tensor | None = None,  # [E, hidden]
    block_m: int | None = None,
) -> torch.Tensor:  # [T, hidden] in x's dtype
    t, hidden = x.shape
    top_k = topk_ids.shape[1]
    if t == 0:
        return torch.empty_like(x)
    x = x.contiguous()
    rows = t * top_k
    # decode-sized steps leave most experts with a row or two: small blocks waste less padding
    block_m = block_m or (16 if rows <= 8 * w13.shape[0] else 64)
    sorted_rows, block_experts = align_by_expert(topk_ids, w13.shape[0], block_m)
    weights = topk_weights.reshape(-1).float().contiguous()
    act = torch.empty(rows, w13.shape[1] // 2, dtype=x.dtype, device=x.device)
    _launch(act, x, w13, w13_scales, sorted_rows, block_experts, weights, top_k, True, block_m)
    out = torch.empty(rows, hidden, dtype=torch.float32, device=x.device)
    _launch(out, act, w2, w2_scales, sorted_rows, block_experts, weights, top_k, False, block_m)
    return out.view(t, top_k, hidden).sum(1).to(x.dtype)

"""Multi-LoRA shrink and expand as segmented GEMMs (SGMV, as Punica and vLLM's LoRA kernels).

A step's tokens fall into segments (one sequence, or neighbouring sequences of one adapter), each
with the slot of its adapter; rows of no segment (the base model's) are left alone:

  shrink: h[seg] = x[seg] @ A[slot]^T     x [T, in], A [slots, rank, in]  -> h [T, rank]
  expand: y[seg] += h[seg] @ B[slot]      h [T, rank], B [slots, rank, n] -> y [T, n]

One kernel does both: out[rows] (+)= a[rows] @ W[slot] with W[slot] a [K, N] matrix read through
strides (A^T for the shrink, B as it is for the expand), so `h` may be a column slice of the
fused projections' rank columns and `y` a column slice (q, k or v) of the base output. Program
(g, m, n) computes rows m*BLOCK_M.. of segment g, columns n*BLOCK_N..; the K loop accumulates in
float32. The PyTorch reference is `sgmv_ref` (pagoda/kernels/reference.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagoda.kernels.runtime import dot_upcast, next_pow2


@triton.jit
def _sgmv_kernel(  # type: ignore[no-untyped-def]
    a_ptr,  # [T, K]
    w_ptr,  # [slots] x [K, N] through strides
    out_ptr,  # [T, N]
    seg_start_ptr,
    seg_len_ptr,
    seg_slot_ptr,
    K,
    N,
    stride_am,
    stride_ak,
    stride_ws,
    stride_wk,
    stride_wn,
    stride_om,
    stride_on,
    ACCUMULATE: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    seg = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2)
    length = tl.load(seg_len_ptr + seg)
    if pid_m * BLOCK_M >= length:
        return
    start = tl.load(seg_start_ptr + seg)
    slot = tl.load(seg_slot_ptr + seg).to(tl.int64)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rows = (start + rm).to(tl.int64)
    m_ok = rm < length
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w_base = w_ptr + slot * stride_ws
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + rk) < K
        a = tl.load(
            a_ptr + rows[:, None] * stride_am + (k0 + rk)[None, :] * stride_ak,
            mask=m_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        w = tl.load(
            w_base + (k0 + rk)[:, None] * stride_wk + rn[None, :] * stride_wn,
            mask=k_ok[:, None] & n_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            acc += tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(a, w)
    out_ptrs = out_ptr + rows[:, None] * stride_om + rn[None, :] * stride_on
    mask = m_ok[:, None] & n_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(
    a: torch.Tensor,
    w: torch.Tensor,  # [slots, K, N] (a strided view)
    out: torch.Tensor,
    seg_start: torch.Tensor,
    seg_len: torch.Tensor,
    seg_slot: torch.Tensor,
    max_len: int,
    accumulate: bool,
) -> None:
    num_segments = seg_start.numel()
    _, k, n = w.shape
    if num_segments == 0 or max_len == 0:
        return
    block_m = 16
    block_n = min(64, max(16, next_pow2(n)))
    block_k = min(64, max(16, next_pow2(k)))
    grid = (num_segments, triton.cdiv(max_len, block_m), triton.cdiv(n, block_n))
    _sgmv_kernel[grid](
        a,
        w,
        out,
        seg_start,
        seg_len,
        seg_slot,
        k,
        n,
        a.stride(0),
        a.stride(1),
        w.stride(0),
        w.stride(1),
        w.stride(2),
        out.stride(0),
        out.stride(1),
        ACCUMULATE=accumulate,
        UPCAST=dot_upcast(a.dtype),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
    )


def lora_shrink(
    x: torch.Tensor,  # [T, in]
    lora_a: torch.Tensor,  # [slots, rank, in]
    out: torch.Tensor,  # [T, rank] (may be a column slice): the segments' rows are written
    seg_start: torch.Tensor,  # [G] int32: each segment's first row
    seg_len: torch.Tensor,  # [G] int32
    seg_slot: torch.Tensor,  # [G] int32: the slot of its adapter
    max_len: int,  # the longest segment
) -> None:
    _launch(x, lora_a.transpose(1, 2), out, seg_start, seg_len, seg_slot, max_len, accumulate=False)


def lora_expand(
    h: torch.Tensor,  # [T, rank] (may be a column slice)
    lora_b: torch.Tensor,  # [slots, rank, n] (B transposed, scaled; may be a column slice)
    out: torch.Tensor,  # [T, n] (may be a column slice): the segments' rows are added to
    seg_start: torch.Tensor,
    seg_len: torch.Tensor,
    seg_slot: torch.Tensor,
    max_len: int,
) -> None:
    _launch(h, lora_b, out, seg_start, seg_len, seg_slot, max_len, accumulate=True)

"""Rotary position embedding applied in place to q and k, neox (rotate-half) or gptj
(interleaved) layout. The cos/sin table is [max_position, head_dim] float32 (cos in the first
half, sin in the second), built from the model's inverse frequencies, so Llama-3 / linear rope
scaling only changes the table."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagoda.kernels.runtime import next_pow2


@triton.jit
def _rotate(  # type: ignore[no-untyped-def]
    x_ptr, stride_t, stride_h, t, cos, sin, heads,
    HEADS_PAD: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr, NEOX: tl.constexpr,
):  # fmt: skip
    h = tl.arange(0, HEADS_PAD)[:, None]
    j = tl.arange(0, HALF_PAD)[None, :]
    ok = (h < heads) & (j < HALF)
    base = x_ptr + t * stride_t + h * stride_h
    if NEOX:
        p1 = base + j
        p2 = base + j + HALF
    else:
        p1 = base + 2 * j
        p2 = base + 2 * j + 1
    x1 = tl.load(p1, mask=ok, other=0.0)
    x2 = tl.load(p2, mask=ok, other=0.0)
    a = x1.to(tl.float32)
    b = x2.to(tl.float32)
    tl.store(p1, (a * cos - b * sin).to(x1.dtype), mask=ok)
    tl.store(p2, (b * cos + a * sin).to(x2.dtype), mask=ok)


@triton.jit
def _rotary_kernel(  # type: ignore[no-untyped-def]
    q_ptr, k_ptr, pos_ptr, cos_sin_ptr, stride_qt, stride_qh, stride_kt, stride_kh, q_heads, k_heads,
    HEADS_PAD: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr, NEOX: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    j = tl.arange(0, HALF_PAD)[None, :]
    cos = tl.load(cos_sin_ptr + pos * (2 * HALF) + j, mask=j < HALF, other=0.0)
    sin = tl.load(cos_sin_ptr + pos * (2 * HALF) + HALF + j, mask=j < HALF, other=0.0)
    _rotate(q_ptr, stride_qt, stride_qh, t, cos, sin, q_heads, HEADS_PAD, HALF, HALF_PAD, NEOX)
    _rotate(k_ptr, stride_kt, stride_kh, t, cos, sin, k_heads, HEADS_PAD, HALF, HALF_PAD, NEOX)


def cos_sin_table(inv_freq: torch.Tensor, max_position: int, device: torch.device) -> torch.Tensor:
    """[max_position, head_dim] float32: cos(pos * f) then sin(pos * f)."""
    freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq.float())
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(device)


def rotary_embedding(
    positions: torch.Tensor,  # [num_tokens]
    q: torch.Tensor,  # [num_tokens, heads, head_dim], head_dim stride 1
    k: torch.Tensor,  # [num_tokens, kv_heads, head_dim]
    cos_sin: torch.Tensor,  # [max_position, head_dim] float32
    neox: bool = True,
) -> None:
    num_tokens, q_heads, head_dim = q.shape
    assert q.stride(2) == 1 and k.stride(2) == 1, f"head_dim must be contiguous: {q.stride()}, {k.stride()}"
    assert cos_sin.shape[1] == head_dim and cos_sin.is_contiguous(), f"bad cos/sin table {cos_sin.shape}"
    if num_tokens == 0:
        return
    _rotary_kernel[(num_tokens,)](
        q, k, positions, cos_sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1), q_heads, k.shape[1],
        HEADS_PAD=next_pow2(max(q_heads, k.shape[1])), HALF=head_dim // 2,
        HALF_PAD=next_pow2(head_dim // 2), NEOX=neox,
    )  # fmt: skip

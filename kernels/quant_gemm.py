"""Weight-only quantized GEMM (w4a16 / w8a16): y = x @ dequant(W), the dequantization fused into
the K loop, so the weights cross memory at 4 or 8 bits (the role Marlin/Machete play in vLLM).

Layout: codes of `bits` bits, 32 // bits of them packed along K in each int32 of
qweight [K * bits / 32, N]; per group of `group_size` input rows a scale [K / group, N] and, when
asymmetric, a zero point [K / group, N] (a code value); w = (code - zero) * scale, zero = 2**(bits-1)
when symmetric.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import nn

from kernels.runtime import dot_upcast


@dataclass
class QuantizedWeight:
    qweight: torch.Tensor  # [K * bits / 32, N] int32
    scales: torch.Tensor  # [K / group_size, N]
    zeros: torch.Tensor | None  # [K / group_size, N] or None (symmetric)
    bits: int
    group_size: int

    @property
    def in_features(self) -> int:
        return self.qweight.shape[0] * 32 // self.bits

    @property
    def out_features(self) -> int:
        return self.qweight.shape[1]


def quantize_weight(
    weight: torch.Tensor,  # [N, K] (nn.Linear layout)
    bits: int = 4,
    group_size: int = 128,
    symmetric: bool = True,
    scale_dtype: torch.dtype = torch.float16,
) -> QuantizedWeight:
    if bits not in (4, 8):
        raise ValueError(f"weight-only GEMM supports 4 or 8 bits, got {bits}")
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"in_features {k} is not a multiple of the group size {group_size}")
    w = weight.detach().float().t().reshape(k // group_size, group_size, n)  # [groups, G, N]
    qmax = (1 << bits) - 1
    zeros: torch.Tensor | None
    if symmetric:
        scale = w.abs().amax(1).clamp(min=1e-8) / ((1 << (bits - 1)) - 1)
        zero = torch.full_like(scale, float(1 << (bits - 1)))
        zeros = None
    else:
        lo, hi = w.amin(1).clamp(max=0), w.amax(1).clamp(min=0)
        scale = ((hi - lo) / qmax).clamp(min=1e-8)
        zero = (-lo / scale).round().clamp(0, qmax)
        zeros = zero.to(scale_dtype)
    codes = (w / scale[:, None, :]).round().add(zero[:, None, :]).clamp(0, qmax).to(torch.int64)
    per_word = 32 // bits
    codes = codes.reshape(k // per_word, per_word, n)
    shifts = torch.arange(per_word, device=weight.device, dtype=torch.int64) * bits
    packed = (codes << shifts[None, :, None]).sum(1)
    packed = torch.where(packed >= 1 << 31, packed - (1 << 32), packed).to(torch.int32)
    return QuantizedWeight(packed, scale.to(scale_dtype), zeros, bits, group_size)


@triton.jit
def _quant_matmul_kernel(  # type: ignore[no-untyped-def]
    out_ptr, x_ptr, qw_ptr, scale_ptr, zero_ptr, M, N, K, stride_xm, stride_om, stride_qk, stride_sg,
    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    PER_WORD: tl.constexpr = 32 // BITS
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    shifts = ((rk % PER_WORD) * BITS)[:, None]
    for k0 in range(0, K, BLOCK_K):  # BLOCK_K divides GROUP: one scale row per tile
        a = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + (k0 + rk)[None, :], mask=m_ok[:, None])
        words = tl.load(
            qw_ptr + ((k0 + rk) // PER_WORD)[:, None] * stride_qk + rn[None, :], mask=n_ok[None, :]
        )
        codes = ((words >> shifts) & ((1 << BITS) - 1)).to(tl.float32)  # [BLOCK_K, BLOCK_N]
        g = k0 // GROUP
        scale = tl.load(scale_ptr + g * stride_sg + rn, mask=n_ok, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            zero = tl.load(zero_ptr + g * stride_sg + rn, mask=n_ok, other=0.0).to(tl.float32)
            w = (codes - zero[None, :]) * scale[None, :]
        else:
            w = (codes - (1 << (BITS - 1))) * scale[None, :]
        if UPCAST:
            acc += tl.dot(a.to(tl.float32), w)
        else:
            acc += tl.dot(a, w.to(a.dtype))
    tl.store(
        out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=m_ok[:, None] & n_ok[None, :],
    )


def quant_matmul(x: torch.Tensor, w: QuantizedWeight) -> torch.Tensor:
    """x [..., K] @ dequant(w) -> [..., N] in x's dtype."""
    shape = x.shape
    k, n = w.in_features, w.out_features
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_k = min(64, w.group_size)
    assert w.group_size % block_k == 0 and k % block_k == 0, f"K {k}, group {w.group_size}"
    # small batches (decode) are weight-bandwidth bound: thin M tiles, many N tiles
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    block_n = 64 if m <= 16 else 128
    if m:
        grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
        _quant_matmul_kernel[grid](
            out, x2, w.qweight, w.scales, w.zeros if w.zeros is not None else w.scales, m, n, k,
            x2.stride(0), out.stride(0), w.qweight.stride(0), w.scales.stride(0),
            BITS=w.bits, GROUP=w.group_size, HAS_ZEROS=w.zeros is not None,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, UPCAST=dot_upcast(),
        )  # fmt: skip
    return out.view(*shape[:-1], n)


class QuantLinear(nn.Module):
    """nn.Linear with weight-only int4/int8 weights, run by quant_matmul (GPU path of
    `--quantization int4|int8`)."""

    def __init__(self, linear: nn.Linear, bits: int, group_size: int = 128, symmetric: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        dtype = linear.weight.dtype if linear.weight.dtype != torch.float32 else torch.float16
        self.weight_q = quantize_weight(linear.weight, bits, group_size, symmetric, dtype)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = quant_matmul(x, self.weight_q)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        w = self.weight_q
        sym = "sym" if w.zeros is None else "asym"
        shape = f"in_features={self.in_features}, out_features={self.out_features}"
        return f"{shape}, int{w.bits} g{w.group_size} {sym}"

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

from pagoda.kernels.runtime import dot_upcast, interpreting, launch_options


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
    packed = pack_codes(codes.reshape(k, n), bits)
    return QuantizedWeight(packed, scale.to(scale_dtype), zeros, bits, group_size)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes [K, N] -> qweight [K * bits / 32, N] int32, code k in bits (k % per_word) * bits
    of word k // per_word."""
    k, n = codes.shape
    per_word = 32 // bits
    grouped = codes.to(torch.int64).reshape(k // per_word, per_word, n)
    shifts = torch.arange(per_word, device=codes.device, dtype=torch.int64) * bits
    packed = (grouped << shifts[None, :, None]).sum(1)
    return torch.where(packed >= 1 << 31, packed - (1 << 32), packed).to(torch.int32)


def dequantize_weight(w: QuantizedWeight) -> torch.Tensor:
    """The [K, N] float32 matrix the kernels multiply by: (code - zero) * scale per group."""
    per_word = 32 // w.bits
    shifts = torch.arange(per_word, device=w.qweight.device, dtype=torch.int32) * w.bits
    codes = (w.qweight[:, None, :] >> shifts[None, :, None]) & ((1 << w.bits) - 1)
    codes = codes.reshape(w.in_features, w.out_features).float()
    zero = (
        w.zeros.float()
        if w.zeros is not None
        else torch.full_like(w.scales, 1 << (w.bits - 1), dtype=torch.float32)
    )
    scale = w.scales.float().repeat_interleave(w.group_size, 0)
    return (codes - zero.repeat_interleave(w.group_size, 0)) * scale


@triton.jit
def _store_split_tile(out_ptr, acc, rm, rn, m_ok, n_ok, stride_os, stride_om):  # type: ignore[no-untyped-def]
    """Store the [BLOCK_M, BLOCK_N] tile `acc` as this program's K split's partial product (the
    output itself without split-K)."""
    out_ptr += tl.program_id(2).to(tl.int64) * stride_os
    tl.store(
        out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=m_ok[:, None] & n_ok[None, :],
    )


@triton.jit
def _quant_matmul_kernel(  # type: ignore[no-untyped-def]
    out_ptr, x_ptr, qw_ptr, scale_ptr, zero_ptr, M, N, k_per_split,
    stride_xm, stride_os, stride_om, stride_qk, stride_sg,
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
    k_lo = tl.program_id(2) * k_per_split  # split-K: program (.., .., s) covers one K slice
    for k0 in range(k_lo, k_lo + k_per_split, BLOCK_K):  # BLOCK_K divides GROUP: one scale row
        a = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_xm + (k0 + rk)[None, :], mask=m_ok[:, None])
        words = tl.load(
            qw_ptr + ((k0 + rk) // PER_WORD)[:, None] * stride_qk + rn[None, :], mask=n_ok[None, :]
        )
        codes = (words >> shifts) & ((1 << BITS) - 1)  # [BLOCK_K, BLOCK_N] int32
        g = k0 // GROUP
        scale = tl.load(scale_ptr + g * stride_sg + rn, mask=n_ok, other=0.0).to(tl.float32)
        # integer codes minus integer zero points are exact in a half dtype: the dot runs on the
        # unscaled values and the group's scale multiplies its [BLOCK_M, BLOCK_N] result
        if HAS_ZEROS:
            zero = tl.load(zero_ptr + g * stride_sg + rn, mask=n_ok, other=0.0).to(tl.float32)
            w = codes.to(tl.float32) - zero[None, :]
        else:
            w = codes - (1 << (BITS - 1))
        if UPCAST:
            part = tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            part = tl.dot(a, w.to(a.dtype))
        acc += part * scale[None, :]
    _store_split_tile(out_ptr, acc, rm, rn, m_ok, n_ok, stride_os, stride_om)


# half dtype -> (bits of MAGIC_VALUE, MAGIC_VALUE): OR-ing a 4-bit code q into the low mantissa
# bits gives MAGIC_VALUE + q exactly (the unit in the last place of MAGIC_VALUE is 1)
_MAGIC = {torch.bfloat16: (0x4300, 128.0), torch.float16: (0x6400, 1024.0)}


@triton.jit
def _int4_group_tile(  # type: ignore[no-untyped-def]
    qw_ptr, scale_ptr, zero_ptr, k0, r, rn, n_ok, stride_qk, stride_sg,
    GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """The packed words of rows k0 .. k0 + 8 * len(r) of the N tile ([len(r), BLOCK_N] int32, 8
    codes each) and their group's scale and zero point per column (float32; 8 when symmetric)."""
    words = tl.load(qw_ptr + (k0 // 8 + r)[:, None] * stride_qk + rn[None, :], mask=n_ok[None, :], other=0)
    g = k0 // GROUP
    scale = tl.load(scale_ptr + g * stride_sg + rn, mask=n_ok, other=0.0).to(tl.float32)
    if HAS_ZEROS:
        zero = tl.load(zero_ptr + g * stride_sg + rn, mask=n_ok, other=0.0).to(tl.float32)
    else:
        zero = tl.full([BLOCK_N], 8.0, tl.float32)
    return words, scale, zero


@triton.jit
def _int4_matmul_kernel(  # type: ignore[no-untyped-def]
    out_ptr, x_ptr, qw_ptr, scale_ptr, zero_ptr, M, N, k_per_split,
    stride_xm, stride_os, stride_om, stride_qk, stride_sg,
    GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, MAGIC: tl.constexpr, MAGIC_VALUE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """int4 x half activations with few instructions per weight (_quant_matmul_kernel spends ~27:
    a load and a conversion per weight; measured 0.8x bf16 F.linear on an H200). Each word is
    loaded once and its 8 nibbles broadcast out to [BLOCK_K, BLOCK_N] (k = 8 * row + nibble);
    codes become half numbers by bit operations, no int->float conversion (see _MAGIC). The
    offset (MAGIC_VALUE + zero point) comes off through the activations' row sums, and the
    group's scale multiplies the tile's [BLOCK_M, BLOCK_N] result."""
    R: tl.constexpr = BLOCK_K // 8
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    r = tl.arange(0, R)
    nibble = tl.arange(0, 8)
    m_ok = rm < M
    n_ok = rn < N
    x_rows = x_ptr + rm[:, None].to(tl.int64) * stride_xm
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    k_lo = tl.program_id(2) * k_per_split  # split-K: program (.., .., s) covers one K slice
    for k0 in range(k_lo, k_lo + k_per_split, BLOCK_K):  # BLOCK_K divides GROUP: one scale row
        words, scale, zero = _int4_group_tile(
            qw_ptr, scale_ptr, zero_ptr, k0, r, rn, n_ok, stride_qk, stride_sg, GROUP, HAS_ZEROS, BLOCK_N
        )
        codes = (words[:, None, :] >> (4 * nibble)[None, :, None]) & 0xF  # [R, 8, BLOCK_N]
        codes = tl.reshape(codes, (BLOCK_K, BLOCK_N))
        a = tl.load(x_rows + (k0 + rk)[None, :], mask=m_ok[:, None], other=0.0)  # [BLOCK_M, BLOCK_K]
        w = (codes | MAGIC).to(tl.int16).to(a.dtype, bitcast=True)  # MAGIC_VALUE + code, exact
        part = tl.dot(a, w)
        a_sum = tl.sum(a.to(tl.float32), 1)
        part -= a_sum[:, None] * (MAGIC_VALUE + zero[None, :])
        acc += part * scale[None, :]
    _store_split_tile(out_ptr, acc, rm, rn, m_ok, n_ok, stride_os, stride_om)


@triton.jit
def _int4_gemv_kernel(  # type: ignore[no-untyped-def]
    out_ptr, x_ptr, qw_ptr, scale_ptr, zero_ptr, M, N, k_per_split,
    stride_xm, stride_os, stride_om, stride_qk, stride_sg,
    GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One activation row per program, no tensor cores (batch-1 decode): float32 FMAs into a
    [BLOCK_K / 8, BLOCK_N] accumulator summed once at the end. A code q becomes 2**23 + q by
    OR-ing it into the float32 0x4B000000."""
    R: tl.constexpr = BLOCK_K // 8
    row = tl.program_id(0)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    r = tl.arange(0, R)
    n_ok = rn < N
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    acc = tl.zeros([R, BLOCK_N], tl.float32)
    k_lo = tl.program_id(2) * k_per_split
    for k0 in range(k_lo, k_lo + k_per_split, BLOCK_K):  # BLOCK_K divides GROUP: one scale row
        words, scale, zero = _int4_group_tile(
            qw_ptr, scale_ptr, zero_ptr, k0, r, rn, n_ok, stride_qk, stride_sg, GROUP, HAS_ZEROS, BLOCK_N
        )
        offset = 8388608.0 + zero
        for j in tl.static_range(8):
            a = tl.load(x_row + k0 + 8 * r + j).to(tl.float32)  # [R]
            v = (((words >> (4 * j)) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True)
            acc += a[:, None] * ((v - offset[None, :]) * scale[None, :])
    out_ptr += tl.program_id(2).to(tl.int64) * stride_os
    tl.store(
        out_ptr + row.to(tl.int64) * stride_om + rn, tl.sum(acc, 0).to(out_ptr.dtype.element_ty), mask=n_ok
    )


def _int4_fast_path(x: torch.Tensor, w: QuantizedWeight) -> bool:
    """The bit-trick kernels take int4 weights, half activations and groups of a multiple of 128
    (their BLOCK_K). Under the interpreter only float16 (its bfloat16 dot is wrong)."""
    if w.bits != 4 or x.dtype not in _MAGIC or w.group_size % 128:
        return False
    return not (interpreting() and x.dtype == torch.bfloat16)


def quant_matmul(
    x: torch.Tensor,
    w: QuantizedWeight,
    block_n: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    split_k: int | None = None,
    kernel: str | None = None,
) -> torch.Tensor:
    """x [..., K] @ dequant(w) -> [..., N] in x's dtype. The keyword arguments are tuning knobs
    (`pagoda bench kernels --sweep`); None picks the defaults below. `split_k` > 1 gives each
    program a slice of K (more programs in flight for small batches) and sums the float32 partial
    products; `kernel` is "convert" (_quant_matmul_kernel), "magic" (_int4_matmul_kernel) or
    "gemv" (_int4_gemv_kernel); the last two only where _int4_fast_path allows."""
    shape = x.shape
    k, n = w.in_features, w.out_features
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if not m:
        return torch.empty(*shape[:-1], n, dtype=x.dtype, device=x.device)
    kernel, block_m, block_n, block_k, split_k = _tiles(x2, w, kernel, block_n, block_k, split_k)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    dest = out if split_k == 1 else torch.empty(split_k, m, n, dtype=torch.float32, device=x.device)
    scales, zeros = w.scales, w.zeros if w.zeros is not None else w.scales
    grid = (triton.cdiv(m, block_m) if kernel != "gemv" else m, triton.cdiv(n, block_n), split_k)
    args = (
        dest, x2, w.qweight, scales, zeros, m, n, k // split_k,
        x2.stride(0), m * n, n, w.qweight.stride(0), scales.stride(0),
    )  # fmt: skip
    common = {
        "GROUP": w.group_size, "HAS_ZEROS": w.zeros is not None, "BLOCK_N": block_n, "BLOCK_K": block_k,
        **launch_options(num_warps, num_stages),
    }  # fmt: skip
    if kernel == "gemv":
        _int4_gemv_kernel[grid](*args, **common)
    elif kernel == "magic":
        magic_bits, magic_value = _MAGIC[x.dtype]
        _int4_matmul_kernel[grid](*args, MAGIC=magic_bits, MAGIC_VALUE=magic_value, BLOCK_M=block_m, **common)
    else:
        _quant_matmul_kernel[grid](*args, BITS=w.bits, UPCAST=dot_upcast(x.dtype), BLOCK_M=block_m, **common)
    if split_k > 1:
        out.copy_(dest.sum(0))
    return out.view(*shape[:-1], n)


def _tiles(
    x2: torch.Tensor,
    w: QuantizedWeight,
    kernel: str | None,
    block_n: int | None,
    block_k: int | None,
    split_k: int | None,
) -> tuple[str, int, int, int, int]:
    """(kernel, BLOCK_M, BLOCK_N, BLOCK_K, split_k) for x2 [m, K] @ w: the given knobs, the
    defaults for the others."""
    m, k = x2.shape[0], w.in_features
    # small batches (decode) are weight-bandwidth bound: thin M tiles, many N tiles. Defaults
    # from `bench kernels --sweep int4` on an H200 at 4096 -> 14336 (docs/perf-history.md): one row runs
    # the GEMV kernel in 4 K slices; up to 16 rows the conversion kernel; more, the bit-trick one.
    if not _int4_fast_path(x2, w):
        kernel = "convert"
    elif kernel is None:
        kernel = "gemv" if m == 1 else "convert" if m <= 16 else "magic"
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    if kernel == "gemv":
        block_n, split_k = block_n or 64, split_k or 4
    elif kernel == "magic":
        block_n = block_n or 128
    else:
        block_n = block_n or 64
    block_k = 128 if kernel != "convert" else min(block_k or 128, w.group_size)
    assert w.group_size % block_k == 0 and k % block_k == 0, f"K {k}, group {w.group_size}"
    split_k = split_k or 1
    while k % (split_k * block_k):
        split_k //= 2
    return kernel, block_m, block_n, block_k, split_k


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

"""Weight-only int4/int8 GEMM against x @ dequant(W), and the quantizer against the float weight."""

from __future__ import annotations

import pytest
import torch

from pagoda.kernels.quant_gemm import quant_matmul, quantize_weight
from pagoda.kernels.reference import dequantize_ref, quant_matmul_ref
from tests.kernels import DEV

TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize(
    ("dtype", "bits", "symmetric", "m"),
    [
        (torch.float32, 4, True, 1),
        (torch.float32, 4, False, 5),
        (torch.float16, 4, True, 16),  # int4 x half: the bit-trick kernel (also on the CPU)
        (torch.float16, 4, False, 2),
        (torch.bfloat16, 4, True, 1),  # the bit-trick kernel on a GPU (the interpreter: the other)
        (torch.bfloat16, 4, False, 3),
        (torch.float32, 8, True, 17),
        (torch.float16, 8, False, 1),
    ],
)
def test_quant_matmul(dtype: torch.dtype, bits: int, symmetric: bool, m: int) -> None:
    g = torch.Generator().manual_seed(m + bits)
    weight = torch.randn(72, 256, generator=g).to(DEV)  # N = 72: a partial N tile; K = 2 groups of 128
    qw = quantize_weight(
        weight, bits, 128, symmetric, scale_dtype=dtype if dtype != torch.float32 else torch.float16
    )
    x = torch.randn(m, 256, generator=g).to(dtype).to(DEV)
    got = quant_matmul(x, qw)
    want = quant_matmul_ref(x, qw.qweight, qw.scales, qw.zeros, bits, 128)
    scale = want.float().abs().max()
    torch.testing.assert_close(got.float() / scale, want.float() / scale, atol=TOL[dtype], rtol=0)


@pytest.mark.parametrize(
    ("split_k", "kernel", "symmetric"),
    [
        (1, "gemv", False),
        (2, "convert", False),
        (4, "magic", False),
        (8, "magic", False),
        (2, "gemv", False),
        (1, "gemv", True),  # the zero point 8 of symmetric groups
        (4, "magic", True),
    ],
)
def test_quant_matmul_split_k(split_k: int, kernel: str, symmetric: bool) -> None:
    """Each int4 kernel, K in slices summed in float32 (8 slices of 512: more than K's 4 tiles of
    128, so the launcher halves it to 4)."""
    g = torch.Generator().manual_seed(split_k)
    weight = torch.randn(40, 512, generator=g).to(DEV)
    qw = quantize_weight(weight, 4, 128, symmetric, scale_dtype=torch.float16)
    x = torch.randn(3, 512, generator=g).to(torch.float16).to(DEV)
    got = quant_matmul(x, qw, split_k=split_k, kernel=kernel)
    want = quant_matmul_ref(x, qw.qweight, qw.scales, qw.zeros, 4, 128)
    scale = want.float().abs().max()
    torch.testing.assert_close(got.float() / scale, want.float() / scale, atol=2e-3, rtol=0)
    assert torch.equal(got, quant_matmul(x, qw, split_k=split_k, kernel=kernel))  # deterministic


@pytest.mark.parametrize(
    ("bits", "symmetric", "max_err"), [(4, True, 0.15), (4, False, 0.15), (8, True, 0.01), (8, False, 0.01)]
)
def test_quantize_round_trip(bits: int, symmetric: bool, max_err: float) -> None:
    weight = torch.randn(32, 256, device=DEV)
    qw = quantize_weight(weight, bits, 128, symmetric, scale_dtype=torch.float32)
    deq = dequantize_ref(qw.qweight, qw.scales, qw.zeros, bits, 128).t()
    rel = (deq - weight).abs().mean() / weight.abs().mean()
    assert max_err / 3 < rel < max_err, f"int{bits} relative error {rel:.4f}"
    assert qw.qweight.shape == (256 * bits // 32, 32) and qw.qweight.dtype == torch.int32


def test_quant_linear_module() -> None:
    """The nn.Linear twin the engine uses on a GPU: bias, a 3-D input, int4 within 10% of float."""
    from torch import nn

    from pagoda.kernels.quant_gemm import QuantLinear

    lin = nn.Linear(256, 40, bias=True).to(torch.float16).to(DEV)
    q = QuantLinear(lin, bits=4)
    x = torch.randn(2, 3, 256).to(torch.float16).to(DEV)
    got = q(x)
    assert got.shape == (2, 3, 40) and got.dtype == torch.float16
    rel = (got.float() - lin(x).float()).norm() / lin(x).float().norm()
    assert rel < 0.1, f"int4 linear relative error {rel:.3f}"
    assert "int4 g128 sym" in repr(q)


@pytest.mark.parametrize(
    ("bits", "group", "signed", "offset"), [(4, 32, False, True), (4, 128, True, False), (8, 64, True, False)]
)
def test_quantized_linear_on_the_triton_kernel(bits: int, group: int, signed: bool, offset: bool) -> None:
    """The engine's Int4Linear/Int8Linear on their GPU path (here under the interpreter): the
    QuantizedWeight -> kernel layout conversion (codes packed along K, zero points in code units)
    multiplies by the same weight."""
    from pagoda.engine.quantization.linear import Int4Linear, Int8Linear
    from pagoda.engine.quantization.weights import QuantizedWeight

    g = torch.Generator().manual_seed(bits + group)
    lo, hi = (-(1 << (bits - 1)), 1 << (bits - 1)) if signed else (0, 1 << bits)
    codes = torch.randint(lo, hi, (40, 256), generator=g, dtype=torch.int16)
    scale = (torch.rand(40, 256 // group, generator=g) * 0.02 + 0.001).half().float()
    off = (torch.randn(40, 256 // group, generator=g) * 0.05).half().float() if offset else None
    qw = QuantizedWeight(codes, scale, off, bits)
    cls = Int4Linear if bits == 4 else Int8Linear
    layer = cls(qw, None, torch.device(DEV), torch.float32, triton=True)
    w = layer.dequantized_weight().cpu()
    torch.testing.assert_close(w, qw.dequantize(), atol=2e-3 * float(qw.dequantize().abs().max()), rtol=0)
    x = torch.randn(3, 256, generator=g).to(DEV)
    want = x.float().cpu() @ w.t()
    torch.testing.assert_close(layer(x).float().cpu(), want, atol=1e-3 * float(want.abs().max()), rtol=0)

"""Quantized weights: GGUF blocks decode to exactly gguf-py's values, and every quantized linear
multiplies by the weight it was given (its `dequantized_weight()`, read back through its kernel)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize, quantize

from pagoda.engine.quantization import native
from pagoda.engine.quantization.gguf import gguf_quantized_weight
from pagoda.engine.quantization.linear import make_linear
from pagoda.engine.quantization.vnni import act_block, rounded_activations
from pagoda.engine.quantization.weights import QuantizedWeight, concat_rows
from tests.quant_kinds import weight_only_acts

Q = GGMLQuantizationType


def _random_k_blocks(qtype: GGMLQuantizationType, out_f: int, in_f: int, seed: int = 0) -> np.ndarray:
    """Random K-quant blocks (gguf-py cannot quantize to them): random bytes with sane fp16 d/dmin."""
    rng = np.random.default_rng(seed)
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (out_f, in_f // block, size), dtype=np.uint8)
    for pos in [208] if qtype == Q.Q6_K else [0, 2]:
        halves = rng.uniform(0.001, 0.05, (out_f, in_f // block)).astype(np.float16)
        raw[..., pos : pos + 2] = halves.view(np.uint8).reshape(out_f, in_f // block, 2)
    return raw.reshape(out_f, -1)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K])
def test_gguf_blocks_decode_to_gguf_values(qtype: GGMLQuantizationType) -> None:
    out_f, in_f = 6, 512
    if qtype in (Q.Q4_0, Q.Q4_1, Q.Q8_0):
        w = np.random.default_rng(1).standard_normal((out_f, in_f)).astype(np.float32)
        raw = quantize(w, qtype)
    else:
        raw = _random_k_blocks(qtype, out_f, in_f)
    want = dequantize(raw, qtype).reshape(out_f, in_f)
    qw = gguf_quantized_weight(raw, qtype, (out_f, in_f))
    assert qw.codes.dtype == torch.int16 and int(qw.codes.max()) < (1 << qw.bits)
    assert torch.equal(qw.dequantize(), torch.from_numpy(want))


def _qw(
    out_f: int,
    in_f: int,
    bits: int,
    group: int,
    *,
    signed: bool,
    offset: bool,
    seed: int = 0,
    scale_dtype: torch.dtype = torch.bfloat16,
) -> QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    lo, hi = (-(1 << (bits - 1)), 1 << (bits - 1)) if signed else (0, 1 << bits)
    codes = torch.randint(lo, hi, (out_f, in_f), generator=g, dtype=torch.int16)
    # scales that `scale_dtype` (bfloat16: both run dtypes) holds exactly, so every path multiplies
    # by the same weight
    scale = (torch.rand(out_f, in_f // group, generator=g) * 0.02 + 0.001).to(scale_dtype).float()
    off = (torch.randn(out_f, in_f // group, generator=g) * 0.05).to(scale_dtype).float() if offset else None
    return QuantizedWeight(codes, scale, off, bits)


CASES = {  # name -> (QuantizedWeight, the layer kind make_linear must pick)
    "int4 asymmetric g32 (Q4_1)": (_qw(48, 128, 4, 32, signed=False, offset=True), "int4 g32"),
    "int4 symmetric g128 (W4A16)": (_qw(48, 256, 4, 128, signed=True, offset=False), "int4 g128"),
    "int4 per channel": (_qw(48, 192, 4, 192, signed=True, offset=False), "int4 g64"),
    "int8 per channel (W8A16)": (_qw(48, 128, 8, 128, signed=True, offset=False), "int8 per channel"),
    "int8 g32 (Q8_0)": (_qw(48, 128, 8, 32, signed=True, offset=False), "int8 g32 (two int4 passes)"),
    "6-bit g32 with offsets (Q5_K-like)": (
        _qw(48, 128, 6, 32, signed=False, offset=True),
        "int8 g32 (two int4 passes)",
    ),
    "8-bit g16 (Q6_K)": (_qw(48, 128, 8, 16, signed=False, offset=True), "dequantized per call"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_quantized_linear_multiplies_by_its_weight(case: str, dtype: torch.dtype, kernels: str) -> None:
    qw, kind = CASES[case]
    if qw.bits == 6:  # six-bit codes travel as an 8-bit QuantizedWeight
        qw = QuantizedWeight(qw.codes, qw.scale, qw.offset, 8)
    block = act_block(qw)
    if kernels == "native":
        assert block is not None
        kind = f"int{4 if qw.bits <= 4 else 8} g{block} (pagoda {native.isa()}, {weight_only_acts()}"
    bias = torch.randn(qw.out_features)
    layer = make_linear(qw, bias.to(dtype), torch.device("cpu"), dtype)
    assert layer.kind == kind
    w = layer.dequantized_weight()
    # torch's CPU kernels run in bf16 (scales, zero points, activations): offset + 8 * scale rounds;
    # pagoda's keeps scales and offsets exact
    peak = float(qw.dequantize().abs().max())
    exact = qw.offset is None or kernels == "native"
    torch.testing.assert_close(w, qw.dequantize(), rtol=0, atol=(0 if exact else 4e-3) * peak)
    x = torch.randn(5, qw.in_features).to(dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (5, qw.out_features)
    if kernels == "native":  # 16-bit activations per block: the kernel's own rounding, emulated
        assert block is not None
        rounded = rounded_activations(x, block, 16)
    else:
        rounded = x.to(torch.bfloat16).float() if kind != "dequantized per call" else x.float()
    want = rounded @ w.t() + bias.to(dtype).float()
    tolerance = 1e-5 if kernels == "native" and dtype == torch.float32 else 1e-2
    torch.testing.assert_close(y.float(), want, rtol=0, atol=tolerance * float(want.abs().max()))
    # batch invariance: each row alone gives its row of the batch, bit for bit (the kernels' own
    # property; a per-call dequantization runs the dense GEMM, which picks kernels by batch size)
    assert kind == "dequantized per call" or all(torch.equal(layer(x[i : i + 1])[0], y[i]) for i in range(5))


def test_w8a8_and_fp8_layers(kernels: str) -> None:
    from pagoda.engine.quantization.w8a8 import W8A8Linear

    int8 = _qw(32, 128, 8, 128, signed=True, offset=False)
    qw = QuantizedWeight(int8.codes, int8.scale, None, 8, act="int8")
    picked = make_linear(qw, None, torch.device("cpu"), torch.float32).kind
    if kernels == "native":
        isa = native.isa() + (", AMX" if torch.ops.pagoda_cpu.amx() else "")
        assert picked == f"int8 per channel (pagoda {isa}, int8 activations per token)"
    else:
        assert picked == "w8a8 int8 (fbgemm)"
    # a fixed x: on CPUs without VNNI torch's kernels take 7-bit activations (reduce_range), whose
    # error over random x reached 2.7% of the peak (30 seeds, an AVX2 EPYC)
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(0))
    ref = x @ int8.dequantize().t()
    for kernel in ("onednn", "fbgemm"):
        w8a8 = W8A8Linear(qw, None, kernel)
        assert torch.equal(w8a8.dequantized_weight(), int8.dequantize())
        y = w8a8(x)
        err = (y - ref).abs().max() / ref.abs().max()
        assert 0 < err < 0.02  # int8 activations: close, not exact (1.2-1.3% at this x on AVX2)
        assert all(torch.equal(w8a8(x[i : i + 1])[0], y[i]) for i in range(4))  # per-row scales

    codes = (torch.randn(32, 128) * 100).to(torch.float8_e4m3fn)
    scale = torch.rand(32, 1) * 0.01
    fp8 = make_linear(
        QuantizedWeight(codes, scale, None, 8, act="fp8"), None, torch.device("cpu"), torch.float32
    )
    pagoda_fp8 = kernels == "native" and native.available()  # AVX-512 only
    assert fp8.kind == ("fp8 (pagoda, dequantized per tile)" if pagoda_fp8 else "fp8")
    w = codes.float() * scale
    assert torch.equal(fp8.dequantized_weight(), w)
    err = (fp8(x) - x @ w.t()).abs().max() / (x @ w.t()).abs().max()
    assert 0 < err < 0.1  # activations rounded through fp8 per token


def test_concat_rows_mixes_group_sizes_and_bits() -> None:
    a = _qw(8, 128, 4, 64, signed=False, offset=True)
    b = _qw(4, 128, 8, 32, signed=True, offset=False, seed=1)
    both = concat_rows([a, b])
    assert both.group_size == 32 and both.bits == 8
    assert torch.equal(both.dequantize(), torch.cat([a.dequantize(), b.dequantize()]))
    with pytest.raises(ValueError, match="different schemes"):
        concat_rows([a, QuantizedWeight(b.codes, b.scale, None, 8, act="int8")])

"""Scales and zero points (pagoda/compress/rtn.py) and GPTQ's activation order: the "mse" observer
against minmax on groups with an outlier, W4A16_ASYM's zero points against compressed-tensors' own
arithmetic (and exact in bf16, where a kernel folds them), actorder's sweep order."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from compressed_tensors.quantization.lifecycle.forward import quantize
from compressed_tensors.quantization.utils import calculate_qparams

from pagoda.compress.algorithms import gptq, hessian_from, output_error, rtn
from pagoda.compress.scheme import parse_scheme
from pagoda.engine.quantization.weights import QuantizedWeight

ASYM_ARGS = dict(num_bits=4, type="int", symmetric=False, strategy="group", group_size=32)


def outlier_weight(seed: int = 0) -> torch.Tensor:
    """[64, 128] Gaussian weights, one of every group of 32 inputs 6x larger than the rest."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(64, 128, generator=gen) * 0.02
    w.view(64, 4, 32)[:, :, 0] *= 6.0
    return w


def group_errors(w: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    """Squared error of each group of 32 [64, 4]."""
    return (qw.dequantize() - w).pow(2).view(64, -1, 32).sum(-1)


@pytest.mark.parametrize(("name", "bound"), [("W4A16", 0.92), ("W4A16_ASYM", 0.97)])
def test_mse_scales_beat_absmax_on_groups_with_an_outlier(name: str, bound: float) -> None:
    """The outlier stretches a minmax step for all 32 weights; shrinking the range clips it a little
    and quantizes the other 31 finer. Every group is at least as close as with minmax (the full
    range is one of the candidates) and the weight as a whole closer: squared error 0.88x
    (symmetric), 0.96x (asymmetric, whose zero point already spends no codes on the empty side)."""
    w = outlier_weight()
    minmax = rtn(w, parse_scheme(name, 32))
    mse = rtn(w, parse_scheme(name, 32, "mse"))
    before, after = group_errors(w, minmax), group_errors(w, mse)
    assert bool((after <= before).all())
    assert float(after.sum() / before.sum()) < bound, float(after.sum() / before.sum())
    assert bool((mse.scale <= minmax.scale * 1.0001).all())  # ranges only ever shrink


def bf16_weight() -> torch.Tensor:
    """[64, 128] bf16 values with a zero row, a zero group and an all-positive group."""
    w = (torch.randn(64, 128, generator=torch.Generator().manual_seed(5)) * 0.05).bfloat16().float()
    w[3] = 0
    w[5, 32:64] = 0
    w[6, 64:96] = w[6, 64:96].abs() + 0.01
    return w


def zero_points(qw: QuantizedWeight) -> torch.Tensor:
    assert qw.offset is not None
    return -qw.offset / qw.scale


def test_asymmetric_qparams_are_compressed_tensors_own() -> None:
    """The zero point is compressed-tensors' round(clamp(-8 - min / scale)), an integer in [-8, 7];
    the scale its bf16 (max - min) / 15, rounded further only where z * scale would not be exact
    in bf16 (by less than 2^-5 of itself); the codes are the library's quantize() under both."""
    w = bf16_weight()
    qw = rtn(w, parse_scheme("W4A16_ASYM", 32))
    zero = zero_points(qw)
    assert torch.equal(zero, zero.round()) and zero.min() >= -8 and zero.max() <= 7
    assert torch.equal(qw.offset.bfloat16().float(), qw.offset)  # -z * scale: exact in bf16
    assert zero[6, 2] == -8  # an all-positive group's range widens to hold 0
    grouped = w.view(64, -1, 32)
    args = QuantizationArgs(**ASYM_ARGS, scale_dtype=torch.bfloat16)
    ct_scale, ct_zero = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args)
    live = grouped.abs().amax(-1) > 0  # an all-zero group: 0 / 0 in the library, zero point 0 here
    assert torch.equal(zero[live], ct_zero.float()[live]) and bool((zero[~live] == 0).all())
    odd = zero.abs() / (zero.abs().to(torch.int32) & -zero.abs().to(torch.int32)).clamp(min=1)
    snapped = qw.scale != ct_scale
    assert bool((odd[snapped] > 1).all()) and snapped.any()  # only zero points with an odd part of 3, 5, 7
    assert float(((qw.scale - ct_scale).abs() / ct_scale)[live].max()) <= 2**-6
    codes = quantize(w, qw.scale, zero.to(torch.int8), args)
    assert torch.equal(qw.codes.float(), codes.float())


@pytest.mark.parametrize("observer", ["minmax", "mse"])
def test_asymmetric_rtn_decompresses_bit_exactly_with_compressed_tensors(observer: str) -> None:
    """The checkpoint path: pack-quantized with the int8 zero points packed along the output dim,
    decompressed by the library in float32 (exact) and in bf16 (one rounding of the exact value)."""
    w = bf16_weight()
    qw = rtn(w, parse_scheme("W4A16_ASYM", 32, observer))
    ours = qw.dequantize()
    compressor = BaseCompressor.get_value_from_registry("pack-quantized")
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**ASYM_ARGS))
    state = {"weight": ours, "weight_scale": qw.scale.bfloat16()}
    stored = compressor.compress({**state, "weight_zero_point": zero_points(qw).to(torch.int8)}, scheme)
    assert stored["weight_zero_point"].dtype == torch.int32 and stored["weight_zero_point"].shape == (8, 4)
    decoded = compressor.decompress(stored, scheme)["weight"]
    assert decoded.dtype == torch.bfloat16 and torch.equal(decoded, ours.bfloat16())
    wide = compressor.decompress({**stored, "weight_scale": qw.scale}, scheme)["weight"]
    assert torch.equal(wide, ours)


def test_asymmetric_groups_fit_a_shifted_grid_better() -> None:
    """Weights on GGUF Q4_1's grid (w = d * q + m, q in 0..15, groups of 32: the demo's), requantized
    in groups of 64: a zero point follows each group's shift, a symmetric grid cannot (error 0.73x)."""
    gen = torch.Generator().manual_seed(1)
    d, m = torch.rand(64, 4, 1, generator=gen) * 0.01, -torch.rand(64, 4, 1, generator=gen) * 0.1
    w = (torch.randint(0, 16, (64, 4, 32), generator=gen) * d + m).view(64, 128)
    sym = (rtn(w, parse_scheme("W4A16", 64)).dequantize() - w).norm()
    asym = (rtn(w, parse_scheme("W4A16_ASYM", 64)).dequantize() - w).norm()
    assert float(asym / sym) < 0.8, float(asym / sym)


def correlated(n: int, gen: torch.Generator, mix: torch.Tensor, loud: torch.Tensor) -> torch.Tensor:
    """[n, 128] rank-32 correlated inputs, the channels in `loud` x10."""
    x = torch.randn(n, 32, generator=gen) @ mix + 0.1 * torch.randn(n, 128, generator=gen)
    x[:, loud] *= 10.0
    return x


@pytest.mark.parametrize("name", ["W4A16", "W4A16_ASYM"])
def test_actorder_on_uncorrelated_inputs_is_rtn(name: str) -> None:
    """With a diagonal H no error crosses inputs: in any order GPTQ's codes are RTN's, so the sweep's
    order is undone exactly (the Hessian's diagonal is shuffled, so the order is not the identity)."""
    gen = torch.Generator().manual_seed(2)
    w, scheme = outlier_weight(3), parse_scheme(name, 32)
    h = torch.diag(torch.logspace(-1, 1, 128)[torch.randperm(128, generator=gen)])
    ours, ref = gptq(w, h, scheme, actorder=True), rtn(w, scheme)
    assert torch.equal(ours.codes, ref.codes) and torch.equal(ours.scale, ref.scale)
    assert (ours.offset is None) == (ref.offset is None)


def test_actorder_helps_when_the_loud_inputs_come_last() -> None:
    """GPTQ spreads each column's error onto the columns after it: taking the inputs with the
    largest activations first leaves them the most columns to absorb their error, which a
    left-to-right sweep cannot when those inputs are the last ones (held-out error 0.21x)."""
    gen = torch.Generator().manual_seed(4)
    mix, loud = torch.randn(32, 128, generator=gen) / 32**0.5, torch.arange(112, 128)
    xc, xt = correlated(2048, gen, mix, loud), correlated(2048, gen, mix, loud)
    w, scheme, h = torch.randn(96, 128, generator=gen), parse_scheme("W4A16", 32), hessian_from(xc)
    plain = output_error(xt, w, gptq(w, h, scheme).dequantize())
    ordered = output_error(xt, w, gptq(w, h, scheme, actorder=True).dequantize())
    assert ordered < 0.5 * plain, (ordered, plain)

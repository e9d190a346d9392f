"""pagoda.compress's algorithms on synthetic layers: correlated activations X = Z A + noise (rank 64
of 256 inputs) with 4 outlier channels, Gaussian weights. Errors are measured on held-out
activations from the same distribution, so the calibrated algorithms must generalize, not fit.

Measured (CPU, seed 0), held-out output error: GPTQ / RTN 0.20 at W4 group 32 and at W8 per
channel; SparseGPT / magnitude 0.25 at 2:4; AWQ / RTN 0.77 at W4 group 128; SmoothQuant's
simulated W8A8 (per-token int8 activations) error / unsmoothed 0.36. The assertions hold margins
around these (0.4, 0.5, 0.9, 0.5)."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize
from compressed_tensors.quantization.utils import calculate_qparams

from pagoda.compress.algorithms import (
    HessianAccumulator,
    awq_search,
    fake_quantize,
    fp8,
    gptq,
    hessian_from,
    magnitude_24,
    output_error,
    qparams,
    rtn,
    smoothquant_factors,
    sparsegpt_24,
)
from pagoda.compress.scheme import Scheme, parse_scheme

IN, OUT, RANK, OUTLIERS = 256, 128, 64, 4


def activations(n: int, gen: torch.Generator, mix: torch.Tensor) -> torch.Tensor:
    """[n, IN]: rank-RANK correlated inputs plus small noise; the first OUTLIERS channels x20."""
    x = torch.randn(n, RANK, generator=gen) @ mix + 0.1 * torch.randn(n, IN, generator=gen)
    x[:, :OUTLIERS] *= 20.0
    return x


@pytest.fixture(scope="module")
def layer() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(calibration x [2048, IN], held-out x [2048, IN], weight [OUT, IN])."""
    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(RANK, IN, generator=gen) / RANK**0.5
    return activations(2048, gen, mix), activations(2048, gen, mix), torch.randn(OUT, IN, generator=gen)


@pytest.mark.parametrize(
    ("name", "group", "bound"), [("W4A16", 32, 0.4), ("W4A16_ASYM", 32, 0.4), ("W8A16", None, 0.4)]
)
def test_gptq_beats_rtn_on_held_out_inputs(layer: tuple, name: str, group: int | None, bound: float) -> None:
    xc, xt, w = layer
    scheme = parse_scheme(name, group)
    ratio = output_error(xt, w, gptq(w, hessian_from(xc), scheme).dequantize()) / output_error(
        xt, w, rtn(w, scheme).dequantize()
    )
    assert ratio < bound, f"{name} group {group}: GPTQ / RTN output error {ratio:.3f}"


def textbook_gptq(w: torch.Tensor, h: torch.Tensor, scheme: Scheme, damp: float = 0.01) -> torch.Tensor:
    """GPTQ as the paper's OBS derivation states it, in float64: no Cholesky, no lazy blocks; the
    inverse Hessian loses each quantized input's row and column. Returns the dequantized weight."""
    w = w.double().clone()
    g = scheme.group_size or w.shape[1]
    h = h.double() + torch.eye(h.shape[0], dtype=torch.float64) * damp * torch.diag(h).double().mean()
    hinv = torch.linalg.inv(h)
    scale, zero = torch.empty(0), None
    for i in range(w.shape[1]):
        if i % g == 0:
            scale, zero = qparams(w[:, i : i + g].float(), scheme)
        q = fake_quantize(w[:, i : i + 1].float(), scale, zero, scheme).double()[:, 0]
        err = (w[:, i] - q) / hinv[i, i]
        w[:, i + 1 :] -= err[:, None] * hinv[i, i + 1 :][None, :]
        w[:, i] = q
        hinv -= hinv[:, i : i + 1] @ hinv[i : i + 1, :] / hinv[i, i]
    return w.float()


@pytest.mark.parametrize(("name", "group"), [("W4A16", 32), ("W4A16_ASYM", 32), ("W8A16", None)])
def test_gptq_matches_the_textbook_algorithm(layer: tuple, name: str, group: int | None) -> None:
    """Cholesky + lazy blocks of 64 give the same weights as the plain OBS sweep (a code may flip
    where a value sits on a rounding boundary and float32 and float64 disagree)."""
    xc, _, w = layer
    scheme, h = parse_scheme(name, group), hessian_from(xc[:, :128])
    ours = gptq(w[:, :128], h, scheme, block=64).dequantize()
    ref = textbook_gptq(w[:, :128], h, scheme)
    assert (ours == ref).float().mean() > 0.995
    assert output_error(xc[:, :128], w[:, :128], ours) == pytest.approx(
        output_error(xc[:, :128], w[:, :128], ref), rel=0.01
    )


def test_gptq_on_uncorrelated_inputs_is_rtn() -> None:
    """With H = c I no error crosses inputs, so GPTQ's codes and scales are RTN's exactly."""
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(3))
    scheme = parse_scheme("W4A16", 32)
    ours, ref = gptq(w, torch.eye(128) * 3.0, scheme), rtn(w, scheme)
    assert torch.equal(ours.codes, ref.codes) and torch.equal(ours.scale, ref.scale)


def test_gptq_zeroes_dead_inputs_and_stays_finite(layer: tuple) -> None:
    xc, _, w = layer
    x = xc.clone()
    x[:, 7] = 0
    q = gptq(w, hessian_from(x), parse_scheme("W4A16", 32))
    assert torch.isfinite(q.dequantize()).all()
    assert (q.codes[:, 7] == 0).all() and q.codes.abs().max() <= 8


def test_gptq_fp8_codes_are_float8(layer: tuple) -> None:
    xc, xt, w = layer
    scheme = parse_scheme("FP8_DYNAMIC", None)
    q = gptq(w, hessian_from(xc), scheme)
    assert q.codes.dtype == torch.float8_e4m3fn and q.act == "fp8"
    assert output_error(xt, w, q.dequantize()) < output_error(xt, w, fp8(w, scheme).dequantize())


def test_sparsegpt_beats_magnitude_pruning_at_2_4(layer: tuple) -> None:
    xc, xt, w = layer
    sparse, magnitude = sparsegpt_24(w, hessian_from(xc)), magnitude_24(w)
    for pruned in (sparse, magnitude):
        assert ((pruned.reshape(OUT, -1, 4) == 0).sum(-1) >= 2).all()
    ratio = output_error(xt, w, sparse) / output_error(xt, w, magnitude)
    assert ratio < 0.5, f"SparseGPT / magnitude output error {ratio:.3f}"


def test_sparsegpt_on_uncorrelated_inputs_prunes_by_saliency() -> None:
    """With a diagonal H no error crosses inputs, and SparseGPT drops, of every 4 weights, the 2
    with the smallest w_j^2 / [H^-1]_jj = w_j^2 (h_j + damp * mean h): magnitude pruning when all
    inputs are equally large, not when their scales differ."""
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(16, 64, generator=gen)
    assert torch.equal(sparsegpt_24(w, torch.eye(64)), magnitude_24(w))
    h = torch.logspace(-2, 2, 64)[torch.randperm(64, generator=gen)]
    saliency = (w**2 * (h + 0.01 * h.mean())).reshape(16, -1, 4)
    drop = torch.topk(saliency, 2, dim=-1, largest=False).indices
    expected = w.reshape(16, -1, 4).scatter(-1, drop, 0.0).reshape(16, 64)
    assert torch.equal(sparsegpt_24(w, torch.diag(h), damp=0.01), expected)
    assert not torch.equal(expected, magnitude_24(w))


def test_awq_beats_rtn_with_outlier_channels(layer: tuple) -> None:
    xc, xt, w = layer
    scheme = parse_scheme("W4A16", None)
    s = awq_search(xc, [w], scheme)
    awq = rtn(w * s, scheme).dequantize() / s
    ratio = output_error(xt, w, awq) / output_error(xt, w, rtn(w, scheme).dequantize())
    assert ratio < 0.9, f"AWQ / RTN output error {ratio:.3f}"
    assert s[:OUTLIERS].min() > s[OUTLIERS:].max()  # the outlier inputs' weights are protected


def int8_per_token(x: torch.Tensor) -> torch.Tensor:
    scale = x.abs().amax(dim=1, keepdim=True) / 127
    return (x / scale).round().clamp(-127, 127) * scale


def test_smoothquant_migrates_outliers_into_weights(layer: tuple) -> None:
    """The paper's claim: at alpha 0.5 each channel's activation and weight ranges become equal
    (both sqrt(max|X_j| max|W_j|)), the outputs do not change, and W8A8 gets more accurate."""
    xc, xt, w = layer
    act_max, w_max = xc.abs().amax(0), w.abs().amax(0)
    s = smoothquant_factors(act_max, [w], alpha=0.5)
    xs, ws = xt / s, w * s
    torch.testing.assert_close(xs @ ws.t(), xt @ w.t(), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close((xc / s).abs().amax(0), (act_max * w_max).sqrt())
    torch.testing.assert_close(ws.abs().amax(0), (act_max * w_max).sqrt())
    before, after = act_max.max() / w_max.max(), (xc / s).abs().amax(0).max() / ws.abs().amax(0).max()
    assert before > 10 and after == pytest.approx(1.0, rel=1e-5)
    w8 = parse_scheme("W8A8", None)
    ref = xt @ w.t()
    err_plain = (int8_per_token(xt) @ rtn(w, w8).dequantize().t() - ref).norm()
    err_smooth = (int8_per_token(xs) @ rtn(ws, w8).dequantize().t() - ref).norm()
    assert err_smooth < 0.5 * err_plain, f"smoothed / plain W8A8 error {float(err_smooth / err_plain):.3f}"


def test_hessian_accumulator_streams_to_the_batch_hessian(layer: tuple) -> None:
    xc, _, _ = layer
    acc = HessianAccumulator(IN, dtype=torch.float64)
    for part in xc.reshape(4, -1, 8, IN):  # [batches][seqs, tokens, IN]
        acc.add(part)
    torch.testing.assert_close(acc.hessian(), hessian_from(xc, torch.float64))
    assert acc.count == 2048


# compressed-tensors' own arithmetic: a checkpoint written from our codes and scales must decode
# to exactly QuantizedWeight.dequantize().
CT_ARGS = {
    "W4A16": dict(num_bits=4, type="int", symmetric=True, strategy="group", group_size=32),
    "W8A8": dict(num_bits=8, type="int", symmetric=True, strategy="channel"),
    "FP8_DYNAMIC": dict(num_bits=8, type="float", symmetric=True, strategy="channel"),
}
CT_FORMAT = {"W4A16": "pack-quantized", "W8A8": "int-quantized", "FP8_DYNAMIC": "float-quantized"}


def bf16_weight() -> torch.Tensor:
    """[64, 128] bf16-representable values with a zero row and a zero group (the eps scale)."""
    w = (torch.randn(64, 128, generator=torch.Generator().manual_seed(5)) * 0.05).bfloat16().float()
    w[3] = 0
    w[5, 32:64] = 0
    return w


@pytest.mark.parametrize("name", list(CT_ARGS))
def test_rtn_scales_and_codes_are_compressed_tensors_own(name: str) -> None:
    w, scheme = bf16_weight(), parse_scheme(name, 32 if name == "W4A16" else None)
    args = QuantizationArgs(**CT_ARGS[name], scale_dtype=torch.bfloat16)
    qw = rtn(w, scheme)
    g = qw.group_size
    grouped = w.reshape(64, -1, g)
    scale, zero = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args)
    assert torch.equal(qw.scale, scale.reshape(qw.scale.shape)) and not zero.any()
    codes = quantize(w, scale.reshape(qw.scale.shape), zero.reshape(qw.scale.shape), args)
    assert torch.equal(qw.codes.float(), codes.float())


@pytest.mark.parametrize("name", list(CT_ARGS))
def test_rtn_decompresses_bit_exactly_with_compressed_tensors(name: str) -> None:
    w, scheme = bf16_weight(), parse_scheme(name, 32 if name == "W4A16" else None)
    qw = rtn(w, scheme)
    args = QuantizationArgs(**CT_ARGS[name])
    ours = qw.dequantize()
    assert torch.equal(dequantize(qw.codes, qw.scale, None, args, dtype=torch.float32), ours)
    # the checkpoint path: the compressor re-quantizes our values against the bf16 scale it stores,
    # packs, unpacks and dequantizes in bf16
    compressor = BaseCompressor.get_value_from_registry(CT_FORMAT[name])
    ct_scheme = QuantizationScheme(targets=["Linear"], weights=args)
    stored = compressor.compress({"weight": ours, "weight_scale": qw.scale.bfloat16()}, ct_scheme)
    decoded = compressor.decompress(stored, ct_scheme)["weight"]
    assert decoded.dtype == torch.bfloat16 and torch.equal(decoded, ours.bfloat16())


def test_rtn_codes_range_and_rounding() -> None:
    """Symmetric 4-bit codes span [-8, 7] with scale absmax / 7.5: -absmax is -7.5 and rounds half
    to even to -8, +absmax is clamped to 7 before rounding; 1.5 and 2.5 round to 2."""
    w = torch.tensor([[-1.875, 1.875, 0.375, 0.625]])  # absmax / 7.5 = 0.25 exactly
    qw = rtn(w, parse_scheme("W4A16", 4))
    assert qw.scale.item() == 0.25
    assert qw.codes.tolist() == [[-8, 7, 2, 2]]

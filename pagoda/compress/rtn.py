"""Round-to-nearest quantization, with compressed-tensors' conventions so a checkpoint written from
our codes, scales and zero points decompresses bit-exactly to `QuantizedWeight.dequantize()`.

compressed-tensors (quantization/utils/helpers.py `calculate_qparams`) takes, over the full signed
code range [q_min, q_max] ([-8, 7] at 4 bits, [-128, 127] at 8, [-448, 448] for float8 e4m3):
- symmetric: scale = absmax / ((q_max - q_min) / 2), so absmax / 7.5 at 4 bits, absmax / 127.5 at
  8 and absmax / 448 for float8; no zero point;
- asymmetric: min and max widened to hold 0, scale = (max - min) / (q_max - q_min) and the integer
  zero point z = round(clamp(q_min - min / scale, q_min, q_max)), from the float32 scale;
and codes round(clamp(w / scale + z, q_min, q_max)) (torch.round: half to even) or, for float8,
the clamped quotient cast to float8_e4m3fn; w = (codes - z) * scale. A zero scale becomes the scale
dtype's eps (bf16: 2^-7). Scales are rounded to bfloat16 *before* the codes are computed, because
bf16 is what the checkpoint stores; the codes then fit the stored scale, not a float32 one that is
never written. An asymmetric scale is rounded further, to the 5-8 significant bits that keep
z * scale exact in bfloat16 (8 when z's odd part is 1, 6 when it is 3, 5 when it is 5 or 7): a
kernel folds -z * scale into a bf16 offset (torch's CPU int4 kernel computes (q - 8) * scale +
zero in bf16), and that offset must be the checkpoint's exactly.

Observers choose the range a scale covers: "minmax" takes the group's own (compressed-tensors'
default), "mse" shrinks it by each factor of 1.00, 0.99, ..., 0.80 and keeps, per group, the one
whose quantized group is nearest the original in squared error (LLM Compressor's "mse" observer
and AWQ's clip search; an outlier then no longer stretches its group's step for all the others).
"""

from __future__ import annotations

import torch

from pagoda.compress.scheme import Scheme
from pagoda.engine.quantization.weights import QuantizedWeight

SCALE_DTYPE = torch.bfloat16  # the dtype scales are written in
SCALE_EPS = torch.finfo(SCALE_DTYPE).eps  # compressed-tensors' replacement for a zero scale
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
MSE_SHRINKS = [1.0 - i / 100 for i in range(21)]  # the "mse" observer's range factors: 1.00 .. 0.80


def code_range(scheme: Scheme) -> tuple[float, float]:
    """(q_min, q_max) of the scheme's codes: [-2^(b-1), 2^(b-1) - 1] or [-448, 448] for fp8."""
    if scheme.float_codes:
        return -FP8_MAX, FP8_MAX
    return -(2.0 ** (scheme.bits - 1)), 2.0 ** (scheme.bits - 1) - 1


def _significant_bits(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """`scale` [..., 1] (bf16 values) rounded to the significant bits that keep zero * scale exact
    in bf16: 8 (no change) when |zero|'s odd part is 1 or zero is 0, 6 when it is 3, 5 when 5 or 7."""
    z = zero.abs().to(torch.int32)
    odd = z // (z & -z).clamp(min=1)  # z's odd part (z & -z: its lowest set bit); 0 for z = 0
    bits = torch.where(odd <= 1, 8, torch.where(odd == 3, 6, 5))
    mantissa, exponent = torch.frexp(scale)  # scale = mantissa * 2^exponent, mantissa in [0.5, 1)
    return torch.ldexp(torch.round(torch.ldexp(mantissa, bits)), exponent - bits)


def _minmax_qparams(
    lo: torch.Tensor, hi: torch.Tensor, scheme: Scheme
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scale, zero point or None) for groups spanning [lo, hi] [..., 1], as the module docstring
    states; both float32, the scale bf16-representable, the zero point a whole number."""
    q_min, q_max = code_range(scheme)
    zero = None
    if scheme.symmetric:
        scale = torch.maximum(lo.abs(), hi.abs()) / ((q_max - q_min) / 2)
        scale = scale.to(SCALE_DTYPE).float()
    else:
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        wide = (hi - lo) / (q_max - q_min)
        zero = torch.nan_to_num(q_min - lo / wide).clamp(q_min, q_max).round()  # 0 / 0: an all-zero group
        scale = _significant_bits(wide.to(SCALE_DTYPE).float(), zero)
    return torch.where(scale == 0, torch.full_like(scale, SCALE_EPS), scale), zero


def qparams(w: torch.Tensor, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scale, zero point) of each row of `w` [..., k] over its last dim, by the scheme's observer:
    both [..., 1] float32, the zero point None for a symmetric scheme."""
    w = w.float()
    lo, hi = w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True)
    if scheme.observer == "minmax":
        return _minmax_qparams(lo, hi, scheme)
    assert scheme.observer == "mse", scheme.observer
    best: tuple[torch.Tensor, torch.Tensor | None] = _minmax_qparams(lo, hi, scheme)
    best_err = (fake_quantize(w, *best, scheme) - w).pow(2).sum(dim=-1, keepdim=True)
    for shrink in MSE_SHRINKS[1:]:
        scale, zero = _minmax_qparams(lo * shrink, hi * shrink, scheme)
        err = (fake_quantize(w, scale, zero, scheme) - w).pow(2).sum(dim=-1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_zero = best[1]
        if zero is not None and best_zero is not None:
            best_zero = torch.where(better, zero, best_zero)
        best = (torch.where(better, scale, best[0]), best_zero)
    return best


def to_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: Scheme) -> torch.Tensor:
    """Codes of `w` under `scale` and `zero` (broadcast; None: symmetric): int16 integers in the
    scheme's range, or float8_e4m3fn. Shift, clamp, then round, as compressed-tensors'
    `_quantize` does."""
    q_min, q_max = code_range(scheme)
    scaled = w.float() / scale
    if zero is not None:
        scaled = scaled + zero
    scaled = scaled.clamp(q_min, q_max)
    if scheme.float_codes:
        return scaled.to(torch.float8_e4m3fn)
    return scaled.round().to(torch.int16)


def fake_quantize(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: Scheme
) -> torch.Tensor:
    """`w` quantized and dequantized (float32): (codes - zero) * scale, the value the checkpoint
    will hold."""
    codes = to_codes(w, scale, zero, scheme).float()
    return (codes if zero is None else codes - zero) * scale


def group_size_of(w: torch.Tensor, scheme: Scheme) -> int:
    """The group size the scheme gives `w` [out, in] (in itself when per channel)."""
    if not scheme.quantizes_weights:
        raise ValueError(f"scheme {scheme.name} does not quantize weights")
    in_f = int(w.shape[1])
    g = scheme.group_size or in_f
    if in_f % g:
        raise ValueError(f"group size {g} does not divide the weight's {in_f} inputs")
    return g


def rtn(w: torch.Tensor, scheme: Scheme) -> QuantizedWeight:
    """Round-to-nearest quantization of `w` [out, in]: one bf16 scale (and zero point, if the
    scheme is asymmetric) per output row and group (per row when the scheme has no groups), from
    the scheme's observer. Works for integer and float8 schemes alike."""
    g = group_size_of(w, scheme)
    out_f, in_f = w.shape
    grouped = w.float().reshape(out_f, in_f // g, g)  # [out, groups, g]
    scale, zero = qparams(grouped, scheme)  # [out, groups, 1] each
    codes = to_codes(grouped, scale, zero, scheme).reshape(out_f, in_f)
    offset = None if zero is None else (-zero * scale).squeeze(-1)
    return QuantizedWeight(
        codes=codes, scale=scale.squeeze(-1), offset=offset, bits=scheme.bits, act=scheme.act
    )


def fp8(w: torch.Tensor, scheme: Scheme) -> QuantizedWeight:
    """FP8 (e4m3) quantization of `w` [out, in]: codes float8_e4m3fn, scale absmax / 448 per
    output channel (per group when the scheme has groups), as compressed-tensors' FP8_DYNAMIC."""
    if not scheme.float_codes:
        raise ValueError(f"fp8() takes a float8 scheme (FP8_DYNAMIC), not {scheme.name}; use rtn()")
    return rtn(w, scheme)


def output_error(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """||x w^T - x ŵ^T|| / ||x w^T||: the relative output error a changed weight `w_hat` [out, in]
    causes on activations `x` [n, in], the figure every algorithm here is judged by."""
    ref = x.float() @ w.float().t()
    return float((ref - x.float() @ w_hat.float().t()).norm() / ref.norm())

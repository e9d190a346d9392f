"""Round-to-nearest quantization, with compressed-tensors' conventions so a checkpoint written from
our codes and scales decompresses bit-exactly to `QuantizedWeight.dequantize()`.

compressed-tensors (quantization/utils/helpers.py `calculate_qparams`, symmetric branch) takes
scale = absmax / (bit_range / 2) with bit_range = q_max - q_min over the full signed range, so
scale = absmax / 7.5 at 4 bits ([-8, 7]), absmax / 127.5 at 8 bits ([-128, 127]) and
absmax / 448 for float8 e4m3 ([-448, 448]); codes are round(clamp(w / scale, q_min, q_max))
(torch.round: half to even) or, for float8, the clamped quotient cast to float8_e4m3fn. A zero
scale becomes the scale dtype's eps (bf16: 2^-7). Scales are rounded to bfloat16 *before* the
codes are computed, because bf16 is what the checkpoint stores; the codes then fit the stored
scale, not a float32 one that is never written.
"""

from __future__ import annotations

import torch

from pagoda.compress.scheme import Scheme
from pagoda.engine.quantization.weights import QuantizedWeight

SCALE_DTYPE = torch.bfloat16  # the dtype scales are written in
SCALE_EPS = torch.finfo(SCALE_DTYPE).eps  # compressed-tensors' replacement for a zero scale
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


def code_range(scheme: Scheme) -> tuple[float, float]:
    """(q_min, q_max) of the scheme's codes: [-2^(b-1), 2^(b-1) - 1] or [-448, 448] for fp8."""
    if scheme.float_codes:
        return -FP8_MAX, FP8_MAX
    return -(2.0 ** (scheme.bits - 1)), 2.0 ** (scheme.bits - 1) - 1


def scales_for(w: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """The symmetric scale of each row of `w` [..., k] over its last dim: [..., 1] float32 holding
    bf16 values (absmax / ((q_max - q_min) / 2), rounded to bf16, zero replaced by bf16's eps)."""
    q_min, q_max = code_range(scheme)
    absmax = w.abs().amax(dim=-1, keepdim=True).float()
    scale = (absmax / ((q_max - q_min) / 2)).to(SCALE_DTYPE).float()
    return torch.where(scale == 0, torch.full_like(scale, SCALE_EPS), scale)


def to_codes(w: torch.Tensor, scale: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """Codes of `w` under `scale` (broadcast): int16 integers in the scheme's range, or
    float8_e4m3fn. Clamp then round, as compressed-tensors' `_quantize` does."""
    q_min, q_max = code_range(scheme)
    scaled = (w.float() / scale).clamp(q_min, q_max)
    if scheme.float_codes:
        return scaled.to(torch.float8_e4m3fn)
    return scaled.round().to(torch.int16)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """`w` quantized and dequantized under `scale` (float32), the value the checkpoint will hold."""
    return to_codes(w, scale, scheme).float() * scale


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
    """Round-to-nearest quantization of `w` [out, in]: one bf16 scale per output row and group
    (per row when the scheme has no groups). Works for integer and float8 schemes alike."""
    g = group_size_of(w, scheme)
    out_f, in_f = w.shape
    grouped = w.float().reshape(out_f, in_f // g, g)  # [out, groups, g]
    scale = scales_for(grouped, scheme)  # [out, groups, 1]
    codes = to_codes(grouped, scale, scheme).reshape(out_f, in_f)
    return QuantizedWeight(
        codes=codes, scale=scale.squeeze(-1), offset=None, bits=scheme.bits, act=scheme.act
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

"""Per-input-channel scales s [in] that move quantization difficulty between a linear's input and
its weights without changing its output: x W^T = (x / s) (W s)^T. The division folds into the
operation before the linear (a norm's weight, or the previous linear's output rows), the
multiplication into every linear reading that input (q, k and v share one s).

SmoothQuant (Xiao et al. 2022) picks s for W8A8 in closed form, so that activation outliers
shrink by as much as the weights can absorb; AWQ (Lin et al. 2023) searches s for weight-only
quantization, protecting the weights of inputs with large activations.
"""

from __future__ import annotations

import torch

from pagoda.compress.rtn import rtn
from pagoda.compress.scheme import Scheme

SMOOTH_MIN = 1e-5  # the SmoothQuant reference's clamp on weight ranges and factors
AWQ_MIN = 1e-4  # the AWQ reference's clamp on act_mean^alpha


def weight_absmax(weights: list[torch.Tensor]) -> torch.Tensor:
    """max over every weight [out, in] and output row of |W[:, j]|: [in] float32."""
    return torch.stack([w.float().abs().amax(dim=0) for w in weights]).amax(dim=0)


def smoothquant_factors(
    act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float = 0.5
) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) [in] (the paper's eq. 4): after x / s and W * s,
    input channel j's activation range is max|X_j|^(1-alpha) max|W_j|^alpha and its weight range
    max|X_j|^alpha max|W_j|^(1-alpha); at alpha 0.5 both are sqrt(max|X_j| max|W_j|), so an
    outlier channel's range is split evenly between activation and weight.
    `act_absmax` [in]: max |x_j| over calibration tokens; `weights`: the linears reading x."""
    w_max = weight_absmax(weights).clamp(min=SMOOTH_MIN)
    a_max = act_absmax.float().to(w_max.device)
    return (a_max.pow(alpha) / w_max.pow(1 - alpha)).clamp(min=SMOOTH_MIN)


def _scaled_rtn_error(
    x: torch.Tensor, weights: list[torch.Tensor], refs: list[torch.Tensor], s: torch.Tensor, scheme: Scheme
) -> float:
    """Sum over weights of the mean squared output error of RTN(W * s) / s on `x` [n, in]."""
    total = 0.0
    for w, ref in zip(weights, refs, strict=True):
        w_hat = rtn(w.float() * s[None, :], scheme).dequantize() / s[None, :]
        total += float((x @ w_hat.t() - ref).pow(2).mean())
    return total


def awq_search(x: torch.Tensor, weights: list[torch.Tensor], scheme: Scheme, grid: int = 20) -> torch.Tensor:
    """AWQ's scale search: s = mean|x_j|^alpha, normalized by sqrt(max s * min s), for alpha in
    0, 1/grid, ..., (grid-1)/grid; returns the s [in] float32 whose RTN-quantized scaled weights
    give the smallest output error on `x` [..., in] summed over `weights` (the linears reading x,
    each [out, in]). alpha = 0 is s = 1, plain RTN, so the result is never worse than RTN on `x`.
    (The paper's weight clipping search is not done here.)"""
    x = x.reshape(-1, x.shape[-1]).float()
    act_mean = x.abs().mean(dim=0)  # [in]
    refs = [x @ w.float().t() for w in weights]
    best_s = torch.ones_like(act_mean)
    best_err = float("inf")
    for step in range(grid):
        s = act_mean.pow(step / grid).clamp(min=AWQ_MIN)
        s = s / (s.max() * s.min()).sqrt()
        err = _scaled_rtn_error(x, weights, refs, s, scheme)
        if err < best_err:
            best_err, best_s = err, s
    return best_s

"""RMSNorm, optionally fused with the residual add before it: one read of x (and residual), one
write of the normalized rows (and the new residual)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagoda.kernels.runtime import next_pow2


@triton.jit
def _rms_norm_kernel(  # type: ignore[no-untyped-def]
    out_ptr, x_ptr, res_ptr, res_out_ptr, w_ptr, eps, stride_o, stride_x, stride_r, stride_ro,
    N: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK)
    ok = i < N
    x = tl.load(x_ptr + row * stride_x + i, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        # the sum is rounded to the activation dtype, as `x + residual` in the model is
        x = (x.to(tl.float32) + tl.load(res_ptr + row * stride_r + i, mask=ok, other=0.0).to(tl.float32)).to(
            x.dtype
        )
        tl.store(res_out_ptr + row * stride_ro + i, x, mask=ok)
    x32 = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x32 * x32, 0) / N + eps)
    y = (x32 * inv).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + i, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + i, (y * w).to(out_ptr.dtype.element_ty), mask=ok)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight * normalize(x + residual), x + residual) over the last dim; x: [..., N]."""
    shape = x.shape
    n = shape[-1]
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    res_out = None
    r2 = x2
    if residual is not None:
        r2 = residual.reshape(-1, n)
        res_out = torch.empty_like(x2)
    rows = x2.shape[0]
    if rows:
        _rms_norm_kernel[(rows,)](
            out, x2, r2, res_out if res_out is not None else out, weight, eps,
            out.stride(0), x2.stride(0), r2.stride(0), res_out.stride(0) if res_out is not None else 0,
            N=n, BLOCK=next_pow2(n), HAS_RESIDUAL=residual is not None,
        )  # fmt: skip
    return out.view(shape), None if res_out is None else res_out.view(shape)

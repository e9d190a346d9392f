"""SiLU-and-mul: silu(gate) * up over the gate_up projection's output [tokens, 2 * I] -> [tokens, I]."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_and_mul_kernel(  # type: ignore[no-untyped-def]
    out_ptr, x_ptr, stride_o, stride_x, N, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = i < N
    gate = tl.load(x_ptr + row * stride_x + i, mask=ok, other=0.0)
    up = tl.load(x_ptr + row * stride_x + N + i, mask=ok, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)  # rounded like torch's F.silu output
    tl.store(out_ptr + row * stride_o + i, (act.to(tl.float32) * up.to(tl.float32)).to(gate.dtype), mask=ok)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    shape = x.shape
    n = shape[-1] // 2
    x2 = x.reshape(-1, 2 * n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape[0], n, dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(n))
    if x2.shape[0]:
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(n, block))](
            out, x2, out.stride(0), x2.stride(0), n, BLOCK=block
        )
    return out.view(*shape[:-1], n)

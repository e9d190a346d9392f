"""KV-cache write (vLLM's reshape_and_cache): each new token's K and V rows land in the paged cache
at their slot (slot = block * block_size + offset). A negative slot means padding: skipped."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagoda.kernels.runtime import next_pow2


@triton.jit
def _reshape_and_cache_kernel(  # type: ignore[no-untyped-def]
    k_ptr,  # [num_tokens, kv_heads, head_dim], rows contiguous
    v_ptr,
    k_cache_ptr,  # [num_blocks, block_size, kv_heads, head_dim], contiguous
    v_cache_ptr,
    slot_ptr,  # [num_tokens]
    stride_kt,
    stride_vt,
    ROW: tl.constexpr,  # kv_heads * head_dim
    ROW_PAD: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    i = tl.arange(0, ROW_PAD)
    ok = i < ROW
    # slot = block * BLOCK_SIZE + offset, and the cache's (block, offset) rows are ROW apart
    dst = slot * ROW + i
    tl.store(k_cache_ptr + dst, tl.load(k_ptr + t * stride_kt + i, mask=ok), mask=ok)
    tl.store(v_cache_ptr + dst, tl.load(v_ptr + t * stride_vt + i, mask=ok), mask=ok)


def reshape_and_cache(
    k: torch.Tensor,  # [num_tokens, kv_heads, head_dim]
    v: torch.Tensor,
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens] int
) -> None:
    num_tokens, kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    assert k_cache.is_contiguous() and v_cache.is_contiguous(), "the KV cache must be contiguous"
    for x in (k, v):
        assert x.stride(2) == 1 and x.stride(1) == head_dim, f"K/V rows must be contiguous: {x.stride()}"
    row = kv_heads * head_dim
    _reshape_and_cache_kernel[(num_tokens,)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        k.stride(0),
        v.stride(0),
        ROW=row,
        ROW_PAD=next_pow2(row),
    )

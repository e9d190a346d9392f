"""PyTorch references for every kernel in this package: plain, obviously-right code the kernels'
tests compare against (float32 math where the kernel accumulates in float32)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reshape_and_cache_ref(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor
) -> None:
    keep = slots >= 0
    k_cache.view(-1, *k.shape[1:])[slots[keep]] = k[keep]
    v_cache.view(-1, *v.shape[1:])[slots[keep]] = v[keep]


def paged_attention_ref(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks]
    seq_lens: torch.Tensor,  # [num_seqs]
    query_start_loc: torch.Tensor,  # [num_seqs + 1]
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's queries (the last q_len positions of its seq_len); a
    query at position p sees only keys > p - sliding_window, and scores s become
    softcap * tanh(s / softcap) before the mask."""
    out = torch.empty_like(q)
    _, block_size, kv_heads, head_dim = k_cache.shape
    group = q.shape[1] // kv_heads
    for i in range(seq_lens.shape[0]):
        start, end = int(query_start_loc[i]), int(query_start_loc[i + 1])
        seq_len, q_len = int(seq_lens[i]), end - start
        blocks = block_tables[i, : -(-seq_len // block_size)].long()
        keys = k_cache[blocks].reshape(-1, kv_heads, head_dim)[:seq_len].float()
        vals = v_cache[blocks].reshape(-1, kv_heads, head_dim)[:seq_len].float()
        keys = keys.repeat_interleave(group, dim=1).transpose(0, 1)  # [heads, seq_len, head_dim]
        vals = vals.repeat_interleave(group, dim=1).transpose(0, 1)
        qs = q[start:end].float().transpose(0, 1)  # [heads, q_len, head_dim]
        scores = qs @ keys.transpose(1, 2) * scale
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        pos = torch.arange(q_len, device=q.device)[:, None] + seq_len - q_len
        cols = torch.arange(seq_len, device=q.device)[None, :]
        hidden = cols > pos
        if sliding_window is not None:
            hidden |= cols <= pos - sliding_window
        scores = scores.masked_fill(hidden, float("-inf"))
        out[start:end] = (scores.softmax(-1) @ vals).transpose(0, 1).to(q.dtype)
    return out


def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight * normalize(x + residual), x + residual); the sum in x's dtype, as the model does."""
    if residual is not None:
        x = x + residual
        residual = x
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype), residual


def rotary_ref(
    positions: torch.Tensor,  # [num_tokens]
    x: torch.Tensor,  # [num_tokens, heads, head_dim]
    cos_sin: torch.Tensor,  # [max_position, head_dim] float32: cos half, then sin half
    neox: bool,
) -> torch.Tensor:
    half = x.shape[-1] // 2
    cos = cos_sin[positions, :half][:, None, :]
    sin = cos_sin[positions, half:][:, None, :]
    x32 = x.float()
    if neox:
        x1, x2 = x32[..., :half], x32[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1).to(x.dtype)
    x1, x2 = x32[..., 0::2], x32[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1).flatten(-2).to(x.dtype)


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def dequantize_ref(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int, group_size: int
) -> torch.Tensor:
    """Unpack [K * bits / 32, N] int32 codes to the float32 weight [K, N]: (q - zero) * scale, zero
    2**(bits - 1) when symmetric."""
    per_word = 32 // bits
    shifts = torch.arange(per_word, device=qweight.device, dtype=torch.int32) * bits
    codes = (qweight[:, None, :] >> shifts[None, :, None]) & ((1 << bits) - 1)  # [K/pw, pw, N]
    codes = codes.reshape(-1, qweight.shape[1]).float()
    s = scales.float().repeat_interleave(group_size, 0)
    z = zeros.float().repeat_interleave(group_size, 0) if zeros is not None else float(1 << (bits - 1))
    return (codes - z) * s


def quant_matmul_ref(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    return (x.float() @ dequantize_ref(qweight, scales, zeros, bits, group_size)).to(x.dtype)


def fused_moe_ref(
    x: torch.Tensor,  # [num_tokens, hidden]
    w13: torch.Tensor,  # [num_experts, 2 * inter, hidden]: gate rows, then up rows
    w2: torch.Tensor,  # [num_experts, hidden, inter]
    topk_weights: torch.Tensor,  # [num_tokens, top_k]
    topk_ids: torch.Tensor,  # [num_tokens, top_k]
) -> torch.Tensor:  # [num_tokens, hidden]
    """Each token through each of its experts' gated MLPs, one at a time, weighted and summed in
    float32."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for t in range(x.shape[0]):
        for weight, e in zip(topk_weights[t].tolist(), topk_ids[t].tolist(), strict=True):
            gate, up = (w13[e].float() @ x[t].float()).chunk(2)
            out[t] += weight * (w2[e].float() @ (F.silu(gate) * up))
    return out.to(x.dtype)


def sgmv_ref(
    a: torch.Tensor,  # [T, K]
    w: torch.Tensor,  # [slots, K, N]
    out: torch.Tensor,  # [T, N]
    seg_start: torch.Tensor,
    seg_len: torch.Tensor,
    seg_slot: torch.Tensor,
    accumulate: bool,
) -> None:
    """pagoda/kernels/lora.py's segmented GEMM: out[seg] (+)= a[seg] @ w[slot], per segment."""
    for start, n, slot in zip(seg_start.tolist(), seg_len.tolist(), seg_slot.tolist(), strict=True):
        rows = slice(start, start + n)
        y = a[rows].float() @ w[slot].float()
        out[rows] = (out[rows].float() + y if accumulate else y).to(out.dtype)

"""Attention over the paged KV cache: one unified kernel for a varlen batch (prefill chunks and
decodes in the same step), and a split-K decode kernel (flash-decoding) for decode-only steps.

Layouts (as pagoda/engine/runner/attention.py):
  q, out          [num_tokens, num_heads, head_dim]     (head_dim stride 1)
  k/v cache       [num_blocks, block_size, kv_heads, head_dim], contiguous
  block_tables    [num_seqs, max_blocks] int            (padded rows are never read past seq_len)
  seq_lens        [num_seqs] int: tokens in the cache after this step's write
  query_start_loc [num_seqs + 1] int: sequence i's queries are q[qsl[i]:qsl[i + 1]]
A query at index j of a sequence with query length L and seq_len S sits at position S - L + j and
sees keys 0..S - L + j (causal against the already cached prefix), or with a sliding window W only
the last W of them: keys at positions > S - L + j - W (HF's and the torch backend's convention).
A soft-cap c turns each score s (scaled) into c * tanh(s / c) before the mask and the softmax.
Both are compile-time switches (SLIDING, SOFTCAP): a kernel without them is the plain one.

Each program handles one sequence, one KV head and a tile of query tokens: the query heads sharing
that KV head are rows of the same tile (GQA/MQA without repeating K/V), so a KV tile is loaded
once for all of them. Keys are visited TILE_N tokens at a time, each token's block looked up in
the block table, so any block size works. Online softmax in float32. With a window, key tiles
wholly before the window of a program's queries are skipped, not masked: a decode reads only the
last W keys of its sequence.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pagoda.kernels.runtime import dot_upcast, launch_options, next_pow2


@triton.jit
def _soft_cap(s, cap):  # type: ignore[no-untyped-def]
    """cap * tanh(s / cap), from exp(-2|x|) in (0, 1]: no overflow whatever the score."""
    t = tl.exp(-2.0 * tl.abs(s / cap))
    th = (1.0 - t) / (1.0 + t)
    return cap * tl.where(s < 0, -th, th)


@triton.jit
def _attend_tile(  # type: ignore[no-untyped-def]
    q, acc, m_i, l_i, n, visible, blk, k_cache_ptr, v_cache_ptr, kv_head, d, d_ok,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, scale, softcap,
    BLOCK_SIZE: tl.constexpr, UPCAST: tl.constexpr, SOFTCAP: tl.constexpr,
):  # fmt: skip
    """One online-softmax step over TILE_N keys. q: [M, D]; n, blk: [N]; visible: [M, N]. Keys no
    row sees are not read."""
    off = n % BLOCK_SIZE
    n_ok = tl.max(visible.to(tl.int32), 0) > 0
    k = tl.load(
        k_cache_ptr + blk[None, :] * stride_kb + off[None, :] * stride_ks + kv_head * stride_kh + d[:, None],
        mask=n_ok[None, :] & d_ok[:, None],
        other=0.0,
    )  # [D, N]
    v = tl.load(
        v_cache_ptr + blk[:, None] * stride_vb + off[:, None] * stride_vs + kv_head * stride_vh + d[None, :],
        mask=n_ok[:, None] & d_ok[None, :],
        other=0.0,
    )  # [N, D]
    if UPCAST:
        s = tl.dot(q.to(tl.float32), k.to(tl.float32), input_precision="ieee")
    else:
        s = tl.dot(q, k)
    s = s * scale
    if SOFTCAP:
        s = _soft_cap(s, softcap)
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that see nothing yet
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if UPCAST:
        acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.jit
def _unified_attention_kernel(  # type: ignore[no-untyped-def]
    out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_ptr, scale,
    window, softcap, stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, TILE_N: tl.constexpr,
    UPCAST: tl.constexpr, SLIDING: tl.constexpr, SOFTCAP: tl.constexpr,
):  # fmt: skip
    seq = tl.program_id(0)
    q_block = tl.program_id(1)
    kv_head = tl.program_id(2)
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    if q_block * BLOCK_Q >= q_len:
        return
    ctx_len = tl.load(seq_lens_ptr + seq) - q_len
    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_PAD
    rows = tl.arange(0, BLOCK_M)
    tok = q_block * BLOCK_Q + rows // GROUP_PAD  # query index within the sequence
    head = kv_head * GROUP + rows % GROUP_PAD
    row_ok = (tok < q_len) & (rows % GROUP_PAD < GROUP)
    d = tl.arange(0, HEAD_PAD)
    d_ok = d < HEAD_DIM
    q_rows = (q_start + tok).to(tl.int64)
    q = tl.load(
        q_ptr + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    q_pos = ctx_len + tok
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32)
    kv_end = ctx_len + tl.minimum(q_len, (q_block + 1) * BLOCK_Q)  # keys of the tile's last query
    kv_start = 0
    if SLIDING:  # from the first key the tile's first query sees
        kv_start = tl.maximum(ctx_len + q_block * BLOCK_Q - window + 1, 0)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for start in range(kv_start, kv_end, TILE_N):
        n = start + tl.arange(0, TILE_N)
        blk = tl.load(table + n // BLOCK_SIZE, mask=n < kv_end, other=0).to(tl.int64)
        visible = (n[None, :] <= q_pos[:, None]) & (n[None, :] < kv_end)
        if SLIDING:
            visible = visible & (n[None, :] > q_pos[:, None] - window)
        acc, m_i, l_i = _attend_tile(
            q, acc, m_i, l_i, n, visible, blk, k_cache_ptr, v_cache_ptr, kv_head, d, d_ok,
            stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, scale, softcap,
            BLOCK_SIZE, UPCAST, SOFTCAP,
        )  # fmt: skip
    acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(
        out_ptr + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )


@triton.jit
def _paged_decode_kernel(  # type: ignore[no-untyped-def]
    out_ptr, part_o_ptr, part_lse_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr,
    scale, tiles_per_split, window, softcap,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, TILE_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    UPCAST: tl.constexpr, SLIDING: tl.constexpr, SOFTCAP: tl.constexpr,
):  # fmt: skip
    """Decode-only: sequence i's one query is q[i]. Split s covers keys [first + s *
    tiles_per_split * TILE_N, ...), first 0 or, with a window, seq_len - window: the keys before
    the window are never visited. With one split the result goes straight to out; else each split
    writes its normalized partial output and log-sum-exp for _reduce_splits_kernel."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    rows = tl.arange(0, BLOCK_M)
    head = kv_head * GROUP + rows
    row_ok = rows < GROUP
    d = tl.arange(0, HEAD_PAD)
    d_ok = d < HEAD_DIM
    q = tl.load(
        q_ptr + seq.to(tl.int64) * stride_qt + head[:, None] * stride_qh + d[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32)
    first = 0
    if SLIDING:
        first = tl.maximum(seq_len - window, 0)
    lo = first + split * tiles_per_split * TILE_N
    hi = tl.minimum(seq_len, lo + tiles_per_split * TILE_N)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for start in range(lo, hi, TILE_N):
        n = start + tl.arange(0, TILE_N)
        blk = tl.load(table + n // BLOCK_SIZE, mask=n < hi, other=0).to(tl.int64)
        visible = (rows[:, None] >= 0) & (n[None, :] < hi)
        acc, m_i, l_i = _attend_tile(
            q, acc, m_i, l_i, n, visible, blk, k_cache_ptr, v_cache_ptr, kv_head, d, d_ok,
            stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, scale, softcap,
            BLOCK_SIZE, UPCAST, SOFTCAP,
        )  # fmt: skip
    acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    if NUM_SPLITS == 1:
        tl.store(
            out_ptr + seq.to(tl.int64) * stride_ot + head[:, None] * stride_oh + d[None, :],
            acc.to(out_ptr.dtype.element_ty),
            mask=row_ok[:, None] & d_ok[None, :],
        )
    else:
        # part_o: [num_seqs, num_heads, NUM_SPLITS, HEAD_PAD] float32, part_lse: [.., NUM_SPLITS]
        idx = (seq.to(tl.int64) * (GROUP * tl.num_programs(1)) + head) * NUM_SPLITS + split
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log(tl.maximum(l_i, 1e-30)))
        tl.store(part_lse_ptr + idx, lse, mask=row_ok)
        tl.store(part_o_ptr + idx[:, None] * HEAD_PAD + d[None, :], acc, mask=row_ok[:, None])


@triton.jit
def _reduce_splits_kernel(  # type: ignore[no-untyped-def]
    out_ptr, part_o_ptr, part_lse_ptr, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
):  # fmt: skip
    seq = tl.program_id(0)
    head = tl.program_id(1)
    base = (seq.to(tl.int64) * tl.num_programs(1) + head) * NUM_SPLITS
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, HEAD_PAD)
    lse = tl.load(part_lse_ptr + base + s, mask=s < NUM_SPLITS, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # every split empty: a padding row
    w = tl.where(lse == float("-inf"), 0.0, tl.exp(lse - m))
    o = tl.load(part_o_ptr + (base + s)[:, None] * HEAD_PAD + d[None, :], mask=(s < NUM_SPLITS)[:, None])
    o = tl.sum(o * w[:, None], 0) / tl.maximum(tl.sum(w, 0), 1e-30)  # 0 for a padding row
    tl.store(
        out_ptr + seq.to(tl.int64) * stride_ot + head * stride_oh + d,
        o.to(out_ptr.dtype.element_ty),
        mask=d < HEAD_DIM,
    )


def _window_and_cap(sliding_window: int | None, softcap: float | None) -> tuple[int, float]:
    """The kernels' runtime `window` and `softcap` arguments (placeholders where switched off)."""
    assert sliding_window is None or sliding_window > 0, f"sliding_window {sliding_window}"
    assert softcap is None or softcap > 0, f"softcap {softcap}"
    return sliding_window or 0, softcap or 1.0


def _strides(k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, ...]:
    return (*k_cache.stride()[:3], *v_cache.stride()[:3])


def unified_attention(
    out: torch.Tensor,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> None:
    """Varlen attention for every query of the batch (prefill chunks and decodes), into `out`;
    `sliding_window` and `softcap` as in the module's docstring (None: off)."""
    num_seqs = seq_lens.shape[0]
    _, block_size, kv_heads, head_dim = k_cache.shape
    group = q.shape[1] // kv_heads
    group_pad = next_pow2(group)
    # at least 16 rows per tile (tl.dot's minimum), 64 for long prefill chunks
    block_m = max(16, group_pad, 64 if max_query_len > 16 else 16)
    block_q = block_m // group_pad
    grid = (num_seqs, triton.cdiv(max_query_len, block_q), kv_heads)
    _unified_attention_kernel[grid](
        out, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
        *_window_and_cap(sliding_window, softcap), q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        *_strides(k_cache, v_cache), block_tables.stride(0),
        BLOCK_SIZE=block_size, HEAD_DIM=head_dim, HEAD_PAD=next_pow2(head_dim),
        GROUP=group, GROUP_PAD=group_pad, BLOCK_Q=block_q, TILE_N=32, UPCAST=dot_upcast(q.dtype),
        SLIDING=sliding_window is not None, SOFTCAP=softcap is not None,
    )  # fmt: skip


def decode_num_splits(num_seqs: int, kv_heads: int, max_seq_len: int, num_sms: int) -> int:
    """Split the keys when the batch alone gives fewer than ~4 programs per SM, each split
    covering at least 256 keys. Measured on an H200 (132 SMs, `bench kernels --sweep`): batch 64 x
    4k context with Llama-3-8B heads (512 programs) ran 2 splits at 0.273 ms and 1 at 0.286."""
    busy = num_seqs * kv_heads
    if busy >= 4 * num_sms:
        return 1
    return max(1, min(triton.cdiv(4 * num_sms, busy), triton.cdiv(max_seq_len, 256), 32))


def paged_decode(
    out: torch.Tensor,
    q: torch.Tensor,  # [num_seqs, num_heads, head_dim]: one query per sequence
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    max_seq_len: int,
    scale: float,
    num_splits: int = 1,
    tile_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> None:
    """Decode attention (flash-decoding when num_splits > 1), into `out`; with a sliding window
    only each sequence's last `sliding_window` keys are read. Graph-safe: the launch depends only
    on the shapes, `max_seq_len` and the window, never on the values of `seq_lens`. `tile_n`
    (keys per loop step), `num_warps` and `num_stages` are tuning knobs (`pagoda bench kernels
    --sweep`). Defaults: 128 keys of 256 bytes per head (bf16 x 128) per step, 4 warps, 4 stages,
    the fastest on an H200 at batch 64 x 4k (0.273 ms, 93% of copy bandwidth, against 0.335 with
    32 keys and Triton's defaults); wider rows take fewer keys and stages (shared memory)."""
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    group = num_heads // kv_heads
    head_pad = next_pow2(head_dim)
    row_bytes = head_pad * k_cache.element_size()
    if tile_n is None:
        tile_n = 128 if row_bytes <= 256 else 64 if row_bytes <= 512 else 32
    tune = launch_options(num_warps or 4, num_stages or (4 if row_bytes <= 256 else 2))
    span = max_seq_len if sliding_window is None else min(max_seq_len, sliding_window)  # keys per query
    tiles_per_split = triton.cdiv(triton.cdiv(max(span, 1), tile_n), num_splits)
    part_o = part_lse = out  # unused with one split
    if num_splits > 1:
        part_o = torch.empty(num_seqs, num_heads, num_splits, head_pad, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=q.device)
    _paged_decode_kernel[(num_seqs, kv_heads, num_splits)](
        out, part_o, part_lse, q, k_cache, v_cache, block_tables, seq_lens, scale, tiles_per_split,
        *_window_and_cap(sliding_window, softcap), q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        *_strides(k_cache, v_cache), block_tables.stride(0),
        BLOCK_SIZE=block_size, HEAD_DIM=head_dim, HEAD_PAD=head_pad,
        GROUP=group, BLOCK_M=max(16, next_pow2(group)), TILE_N=tile_n, NUM_SPLITS=num_splits,
        UPCAST=dot_upcast(q.dtype), SLIDING=sliding_window is not None, SOFTCAP=softcap is not None, **tune,
    )  # fmt: skip
    if num_splits > 1:
        _reduce_splits_kernel[(num_seqs, num_heads)](
            out, part_o, part_lse, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, HEAD_PAD=head_pad, NUM_SPLITS=num_splits, SPLITS_PAD=next_pow2(num_splits),
        )  # fmt: skip

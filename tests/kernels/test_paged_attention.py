"""Paged attention kernels against the PyTorch reference: decode (with and without split-K) and the
unified varlen kernel (prefill chunks against a cached prefix, mixed with decodes), the KV write."""

from __future__ import annotations

import pytest
import torch

from pagoda.kernels.kv_cache import reshape_and_cache
from pagoda.kernels.paged_attention import paged_decode, unified_attention
from pagoda.kernels.reference import paged_attention_ref, reshape_and_cache_ref
from tests.kernels import DEV

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _setup(
    q_lens: list[int],
    seq_lens: list[int],
    kv_heads: int,
    group: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(sum(seq_lens) + head_dim + group)
    max_blocks = max(-(-s // block_size) for s in seq_lens) + 1
    num_blocks = len(seq_lens) * max_blocks + 3
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=g).to(dtype)
    v_cache = torch.randn(shape, generator=g).to(dtype)
    # each sequence gets distinct, shuffled blocks; the padding of a row points at block 0
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    for i, s in enumerate(seq_lens):
        n = -(-s // block_size)
        tables[i, :n] = perm[i * max_blocks : i * max_blocks + n]
    q = torch.randn(sum(q_lens), kv_heads * group, head_dim, generator=g).to(dtype)
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    sl = torch.tensor(seq_lens, dtype=torch.int32)
    return tuple(t.to(DEV) for t in (q, k_cache, v_cache, tables, sl, qsl))


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])


F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


@pytest.mark.parametrize(
    ("dtype", "group", "num_splits"),
    [(F32, 1, 1), (F32, 8, 3), (F16, 4, 1), (F16, 4, 3), (BF16, 1, 3), (BF16, 8, 1)],
)
def test_decode(dtype: torch.dtype, group: int, num_splits: int) -> None:
    seq_lens = [1, 16, 17, 70]  # length 1, a full block, one past it, a partial last block
    q, kc, vc, tables, sl, qsl = _setup([1] * 4, seq_lens, 2, group, 64, 16, dtype)
    out = torch.empty_like(q)
    paged_decode(out, q, kc, vc, tables, sl, max(seq_lens), 0.125, num_splits=num_splits)
    _close(out, paged_attention_ref(q, kc, vc, tables, sl, qsl, 0.125), dtype)


@pytest.mark.parametrize(
    ("head_dim", "block_size"), [(64, 16), (80, 32), (96, 16), (128, 32), (256, 16), (64, 8), (64, 64)]
)
def test_decode_head_dims_and_block_sizes(head_dim: int, block_size: int) -> None:
    seq_lens = [5, 33, 64]
    q, kc, vc, tables, sl, qsl = _setup([1] * 3, seq_lens, 1, 4, head_dim, block_size, torch.float16)
    out = torch.empty_like(q)
    paged_decode(out, q, kc, vc, tables, sl, max(seq_lens), head_dim**-0.5, num_splits=2)
    _close(out, paged_attention_ref(q, kc, vc, tables, sl, qsl, head_dim**-0.5), torch.float16)


@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_padding_row_reads_nothing(num_splits: int) -> None:
    """A CUDA-graph padding row (seq_len 0) gives zeros, not NaN, and leaves the others alone."""
    q, kc, vc, tables, sl, qsl = _setup([1, 1], [40, 40], 2, 4, 64, 16, torch.float32)
    sl[0] = 0
    out = torch.full_like(q, float("nan"))
    paged_decode(out, q, kc, vc, tables, sl, 256, 0.125, num_splits=num_splits)  # max_seq_len > batch's
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    want = paged_attention_ref(q[1:], kc, vc, tables[1:], sl[1:], qsl[:2], 0.125)
    _close(out[1:], want, torch.float32)


@pytest.mark.parametrize(
    ("dtype", "group", "head_dim", "block_size"),
    [(F32, 1, 64, 16), (F32, 4, 80, 32), (F32, 8, 96, 16), (F16, 4, 80, 32), (BF16, 8, 96, 16)],
)
def test_unified_mixed_batch(dtype: torch.dtype, group: int, head_dim: int, block_size: int) -> None:
    # two decodes, a chunk behind a cached prefix across block boundaries, a fresh prompt of one
    # token, a fresh prompt longer than one query tile, a chunk ending on a block boundary
    q_lens = [1, 1, 5, 1, 23, 16]
    seq_lens = [9, 32, 17, 1, 23, 48]
    q, kc, vc, tables, sl, qsl = _setup(q_lens, seq_lens, 2, group, head_dim, block_size, dtype)
    out = torch.empty_like(q)
    unified_attention(out, q, kc, vc, tables, sl, qsl, max(q_lens), head_dim**-0.5)
    _close(out, paged_attention_ref(q, kc, vc, tables, sl, qsl, head_dim**-0.5), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reshape_and_cache(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    k = torch.randn(7, 2, 80, generator=g).to(dtype).to(DEV)
    v = torch.randn(7, 2, 80, generator=g).to(dtype).to(DEV)
    slots = torch.tensor([0, 15, 16, 17, 40, -1, 63], device=DEV)  # block edges, and one padding token
    caches = [torch.zeros(4, 16, 2, 80, dtype=dtype, device=DEV) for _ in range(4)]
    reshape_and_cache(k, v, caches[0], caches[1], slots)
    reshape_and_cache_ref(k, v, caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    assert caches[0].view(-1, 2, 80)[slots[0]].abs().sum() > 0


def test_reshape_and_cache_from_fused_qkv() -> None:
    """K/V are strided views of the qkv projection's output, as in the model."""
    qkv = torch.randn(5, 4 * 16 + 2 * 2 * 16, device=DEV)
    k = qkv[:, 64:96].view(5, 2, 16)
    v = qkv[:, 96:].view(5, 2, 16)
    kc, vc = torch.zeros(2, 4, 2, 16, device=DEV), torch.zeros(2, 4, 2, 16, device=DEV)
    reshape_and_cache(k, v, kc, vc, torch.tensor([7, 0, 3, 4, 1], device=DEV))
    assert torch.equal(kc.view(-1, 2, 16)[7], k[0]) and torch.equal(vc.view(-1, 2, 16)[4], v[3])


def _poisoned(
    kc: torch.Tensor,
    vc: torch.Tensor,
    tables: torch.Tensor,
    q_lens: list[int],
    seq_lens: list[int],
    window: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of the caches with NaN at every key no query of its sequence sees (before the window
    of the sequence's first query): a kernel that reads one, even masked out, returns NaN."""
    kc, vc = kc.clone(), vc.clone()
    block_size = kc.shape[1]
    for i, (q_len, seq_len) in enumerate(zip(q_lens, seq_lens, strict=True)):
        for pos in range(max(0, seq_len - q_len - window + 1)):
            blk, off = int(tables[i, pos // block_size]), pos % block_size
            kc[blk, off] = vc[blk, off] = float("nan")
    return kc, vc


# a decode, a chunk crossing the window's edge behind a cached prefix, a fresh prompt longer than
# most windows, chunks ending on block boundaries (16), a one-token prompt
WINDOW_Q_LENS = [1, 7, 20, 16, 1, 5]
WINDOW_SEQ_LENS = [40, 23, 20, 48, 1, 33]


@pytest.mark.parametrize(
    ("dtype", "group", "window", "softcap"),
    [
        (F32, 3, None, 0.8),  # soft-cap alone; 3 query heads per KV head (padded rows)
        (F32, 4, 1, None),  # each query sees itself only
        (F32, 4, 8, None),
        (F32, 1, 16, 0.8),  # a block
        (F32, 4, 17, None),  # a block and one
        (F32, 3, 23, 2.0),  # some sequences' whole context
        (F32, 4, 200, None),  # longer than every context: plain causal
        (BF16, 8, 8, 2.0),
    ],
)
def test_unified_window_and_softcap(
    dtype: torch.dtype, group: int, window: int | None, softcap: float | None
) -> None:
    q, kc, vc, tables, sl, qsl = _setup(WINDOW_Q_LENS, WINDOW_SEQ_LENS, 2, group, 64, 16, dtype)
    want = paged_attention_ref(q, kc, vc, tables, sl, qsl, 0.125, window, softcap)
    if window is not None:
        kc, vc = _poisoned(kc, vc, tables, WINDOW_Q_LENS, WINDOW_SEQ_LENS, window)
    out = torch.empty_like(q)
    unified_attention(out, q, kc, vc, tables, sl, qsl, max(WINDOW_Q_LENS), 0.125, window, softcap)
    _close(out, want, dtype)


@pytest.mark.parametrize(
    ("dtype", "window", "softcap", "num_splits"),
    [
        (F32, None, 0.8, 1),
        (F32, None, 0.8, 3),
        (F32, 1, None, 1),
        (F32, 16, None, 1),  # a block: the window starts mid-block for 17 and 70
        (F32, 17, 2.0, 2),
        (F32, 33, None, 4),  # splits of a window longer than some contexts
        (F32, 100, None, 3),  # longer than every context
        (F16, 20, 0.8, 3),
    ],
)
def test_decode_window_and_softcap(
    dtype: torch.dtype, window: int | None, softcap: float | None, num_splits: int
) -> None:
    """Keys before the window are never read (NaN there leaves the result alone), nor visited:
    the launch covers only `window` keys a query (tiles of 16, each split one tile here)."""
    seq_lens = [1, 16, 17, 33, 70]
    q, kc, vc, tables, sl, qsl = _setup([1] * 5, seq_lens, 2, 4, 64, 16, dtype)
    want = paged_attention_ref(q, kc, vc, tables, sl, qsl, 0.125, window, softcap)
    if window is not None:
        kc, vc = _poisoned(kc, vc, tables, [1] * 5, seq_lens, window)
    out = torch.empty_like(q)
    paged_decode(
        out, q, kc, vc, tables, sl, 70, 0.125, num_splits, 16, sliding_window=window, softcap=softcap
    )
    _close(out, want, dtype)


def test_decode_window_padding_row() -> None:
    """A CUDA-graph padding row (seq_len 0) with a window: zeros, and the other row as without one
    when the window covers it."""
    q, kc, vc, tables, sl, qsl = _setup([1, 1], [40, 40], 2, 4, 64, 16, torch.float32)
    sl[0] = 0
    out = torch.full_like(q, float("nan"))
    paged_decode(out, q, kc, vc, tables, sl, 256, 0.125, num_splits=4, sliding_window=40, softcap=1.5)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    want = paged_attention_ref(q[1:], kc, vc, tables[1:], sl[1:], qsl[:2], 0.125, None, 1.5)
    _close(out[1:], want, torch.float32)

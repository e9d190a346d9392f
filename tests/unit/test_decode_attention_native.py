"""pagoda's CPU decode attention (csrc/attention.cpp, `pagoda_cpu::decode_attention`) against the
arithmetic written out: each sequence's keys read through its shuffled block table, GQA rows, a
sliding window, soft-capping, float32 and bfloat16, a padding row (length 0) left zero, and bad
arguments refused with a message. The shapes cover both kinds of `attend`: unrolled for its rows
and head size (gqa3, mha, gqa4-128) and general (gqa7-window: 7 rows; mqa-softcap: head size 256)."""

from __future__ import annotations

import pytest
import torch

from pagoda.engine.quantization import native
from tests.unit.test_native_kernels import needs_op

pytestmark = needs_op("decode_attention")

BLOCK = 16


@pytest.fixture(autouse=True)
def _built() -> None:
    assert native.runs("decode_attention")


def _reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tables: torch.Tensor,
    lens: list[int],
    scale: float,
    window: int,
    softcap: float,
) -> torch.Tensor:
    n, heads, dim = q.shape
    kv_heads = k_cache.shape[2]
    out = torch.zeros(n, heads, dim, dtype=torch.float64)
    for s, length in enumerate(lens):
        if length == 0:
            continue
        pos = torch.arange(max(0, length - window) if window > 0 else 0, length)
        slots = tables[s, pos // BLOCK] * BLOCK + pos % BLOCK
        k = k_cache.reshape(-1, kv_heads, dim)[slots].double()  # [L, kv_heads, dim]
        v = v_cache.reshape(-1, kv_heads, dim)[slots].double()
        for h in range(heads):
            kh = h // (heads // kv_heads)
            scores = k[:, kh] @ q[s, h].double() * scale
            if softcap > 0:
                scores = softcap * torch.tanh(scores / softcap)
            out[s, h] = torch.softmax(scores, 0) @ v[:, kh]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "window", "softcap"),
    [
        (9, 3, 64, 0, 0.0),
        (4, 4, 128, 0, 0.0),
        (8, 2, 128, 0, 0.0),
        (14, 2, 64, 20, 0.0),
        (8, 1, 256, 0, 30.0),
    ],
    ids=["gqa3", "mha", "gqa4-128", "gqa7-window", "mqa-softcap"],
)
def test_matches_the_arithmetic(
    dtype: torch.dtype, heads: int, kv_heads: int, dim: int, window: int, softcap: float
) -> None:
    g = torch.Generator().manual_seed(heads * dim + window)
    lens = [1, 17, 0, 50, 33, 5]  # one padding row (0)
    max_blocks = 4
    num_blocks = len(lens) * max_blocks + 3
    k_cache = torch.randn(num_blocks, BLOCK, kv_heads, dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, BLOCK, kv_heads, dim, generator=g).to(dtype)
    tables = torch.randperm(num_blocks, generator=g)[: len(lens) * max_blocks].view(len(lens), max_blocks)
    q = torch.randn(len(lens), heads, dim, generator=g).to(dtype)
    scale = dim**-0.5
    lengths = torch.tensor(lens)
    got = torch.ops.pagoda_cpu.decode_attention(q, k_cache, v_cache, tables, lengths, scale, window, softcap)
    want = _reference(q, k_cache, v_cache, tables, lens, scale, window, softcap)
    assert got.dtype == dtype and got.shape == q.shape
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bfloat16: the output's own rounding
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)
    assert got[2].abs().sum() == 0  # the padding row
    # int32 tables and lengths give the same result
    same = torch.ops.pagoda_cpu.decode_attention(
        q, k_cache, v_cache, tables.int(), lengths.int(), scale, window, softcap
    )
    assert torch.equal(same, got)
    # a table cut from a wider one (rows strided), as the compiled decode steps pass it
    wide = torch.cat([tables, torch.zeros_like(tables)], dim=1)[:, :max_blocks]
    assert not wide.is_contiguous()
    op = torch.ops.pagoda_cpu.decode_attention
    assert torch.equal(op(q, k_cache, v_cache, wide, lengths, scale, window, softcap), got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_task_of_every_kv_head_gives_the_same_bits(dtype: torch.dtype) -> None:
    """With sequences at least four times the threads, a task takes every KV head of its sequence
    (attention_rows.h); with fewer, one. Six sequences on one thread and on two take both ways, and
    each head's arithmetic is the same: the outputs are equal bit for bit."""
    g = torch.Generator().manual_seed(5)
    lens = [40, 3, 17, 64, 1, 29]
    k_cache = torch.randn(30, BLOCK, 3, 64, generator=g).to(dtype)
    v_cache = torch.randn(30, BLOCK, 3, 64, generator=g).to(dtype)
    tables = torch.randperm(30, generator=g)[:24].view(6, 4)
    q = torch.randn(6, 9, 64, generator=g).to(dtype)
    op = torch.ops.pagoda_cpu.decode_attention
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # 6 >= 4 x 1: whole sequences
        whole = op(q, k_cache, v_cache, tables, torch.tensor(lens), 0.125, 0, 0.0)
        torch.set_num_threads(2)  # 6 < 4 x 2: one KV head a task
        single = op(q, k_cache, v_cache, tables, torch.tensor(lens), 0.125, 0, 0.0)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(whole, single)
    want = _reference(q, k_cache, v_cache, tables, lens, 0.125, 0, 0.0)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(whole.double(), want, atol=tol, rtol=tol)


def test_bad_arguments_are_refused() -> None:
    q = torch.randn(2, 4, 64)
    cache = torch.randn(4, BLOCK, 2, 64)
    tables, lens = torch.zeros(2, 2, dtype=torch.long), torch.tensor([3, 40])
    op = torch.ops.pagoda_cpu.decode_attention
    with pytest.raises(RuntimeError, match="beyond its block table"):
        op(q, cache, cache, tables, lens, 0.1, 0, 0.0)  # 40 > 2 blocks x 16
    with pytest.raises(RuntimeError, match="multiple of 16"):
        odd = torch.randn(4, BLOCK, 2, 40)
        op(torch.randn(2, 4, 40), odd, odd, tables, lens, 1.0, 0, 0.0)
    with pytest.raises(RuntimeError, match="caches in q's dtype"):
        op(q, cache.bfloat16(), cache.bfloat16(), tables, torch.tensor([3, 4]), 0.1, 0, 0.0)
    with pytest.raises(RuntimeError, match="multiple of kv_heads"):
        op(torch.randn(2, 3, 64), cache, cache, tables, torch.tensor([3, 4]), 0.1, 0, 0.0)

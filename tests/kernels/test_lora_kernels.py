"""Multi-LoRA shrink/expand (segmented GEMMs) against the PyTorch reference: segments of length 1
and across the 16-row block, ranks under the 16-wide dot, column slices of fused outputs, base rows
(in no segment) left alone."""

from __future__ import annotations

import pytest
import torch

from pagoda.kernels.lora import lora_expand, lora_shrink
from pagoda.kernels.reference import sgmv_ref
from tests.kernels import DEV

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _segments(lens: list[int], slots: list[int], gaps: int) -> tuple[torch.Tensor, ...]:
    """Segments of `lens` rows with a gap of `gaps` base rows before each."""
    starts, row = [], 0
    for n in lens:
        row += gaps
        starts.append(row)
        row += n
    as_i32 = [torch.tensor(v, dtype=torch.int32, device=DEV) for v in (starts, lens, slots)]
    return as_i32[0], as_i32[1], as_i32[2], torch.tensor(row)


@pytest.mark.parametrize(
    ("dtype", "lens", "slots", "rank", "fan_in", "out_cols"),
    [
        (torch.float32, [1], [0], 8, 64, (0, 40)),  # one decode token
        (torch.float32, [1, 3, 17, 1], [2, 0, 1, 2], 16, 72, (8, 48)),  # 17 rows: two M blocks; a slice
        (torch.float16, [5, 2], [1, 3], 4, 40, (0, 24)),  # rank under the 16-wide dot, odd K
        (torch.bfloat16, [16, 1], [3, 0], 16, 96, (24, 96)),
    ],
)
def test_shrink_expand_match_reference(
    dtype: torch.dtype, lens: list[int], slots: list[int], rank: int, fan_in: int, out_cols: tuple[int, int]
) -> None:
    g = torch.Generator().manual_seed(sum(lens) + rank)
    seg_start, seg_len, seg_slot, total = _segments(lens, slots, gaps=2)
    t = int(total) + 1  # base rows between segments and one after
    x = torch.randn(t, fan_in, generator=g).to(dtype).to(DEV)
    a = (torch.randn(4, rank, fan_in, generator=g) / fan_in**0.5).to(dtype).to(DEV)
    b_full = torch.randn(4, rank, 96, generator=g).to(dtype).to(DEV)
    lo, hi = out_cols
    b = b_full[:, :, lo:hi]  # a sub-projection's columns of a fused B

    h = torch.zeros(t, 2 * rank, dtype=dtype, device=DEV)[:, rank:]  # the second sub's rank columns
    h_ref = torch.zeros(t, rank, dtype=dtype, device=DEV)
    lora_shrink(x, a, h, seg_start, seg_len, seg_slot, max(lens))
    sgmv_ref(x, a.transpose(1, 2), h_ref, seg_start, seg_len, seg_slot, accumulate=False)
    torch.testing.assert_close(h.float(), h_ref.float(), atol=TOL[dtype] * 4, rtol=TOL[dtype])

    y = torch.randn(t, 96, generator=g).to(dtype).to(DEV)
    y_ref = y.clone()
    lora_expand(h_ref, b, y[:, lo:hi], seg_start, seg_len, seg_slot, max(lens))
    sgmv_ref(h_ref, b, y_ref[:, lo:hi], seg_start, seg_len, seg_slot, accumulate=True)
    scale = y_ref.float().abs().max()
    torch.testing.assert_close(y.float() / scale, y_ref.float() / scale, atol=TOL[dtype], rtol=0)
    untouched = torch.ones(t, dtype=torch.bool, device=DEV)
    for s, n in zip(seg_start.tolist(), lens, strict=True):
        untouched[s : s + n] = False
    assert torch.equal(h[untouched], torch.zeros_like(h[untouched]))  # base rows: no adapter

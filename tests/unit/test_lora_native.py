"""pagoda's CPU multi-LoRA kernel (pagoda/engine/quantization/csrc/lora.cpp): each row against its
own slot's adapter only, in the sub-projections that adapter targets, equal to the arithmetic
written out in torch; base rows untouched; bad arguments refused."""

from __future__ import annotations

import pytest
import torch

from pagoda.engine.quantization import native
from tests.unit.test_native_kernels import needs_kernels

IN, WIDTHS, SLOTS, MAX_RANK = 40, (48, 20, 20), 3, 8  # widths off the kernel's 16 and 64 columns


def _reference(
    y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    row_slot: list[int],
    ranks: torch.Tensor,
) -> torch.Tensor:
    want = y.clone().float()
    first = 0
    for i, width in enumerate(WIDTHS):
        for t, s in enumerate(row_slot):
            r = int(ranks[s, i]) if s >= 0 else 0
            if r:
                h = a[i, s, :r].float() @ x[t].float()
                want[t, first : first + width] += h @ b[s, :r, first : first + width].float()
        first += width
    return want


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [5, 150])  # a decode step inline; a prompt chunk over threads
def test_kernel_adds_each_rows_own_adapter(dtype: torch.dtype, rows: int) -> None:
    assert native.available()
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, IN, generator=g).to(dtype)
    a = torch.randn(len(WIDTHS), SLOTS, MAX_RANK, IN, generator=g).to(dtype)
    b = torch.randn(SLOTS, MAX_RANK, sum(WIDTHS), generator=g).to(dtype)
    # slot 0: rank 8 on every sub; slot 1: rank 5 on the first and last; slot 2: rank 3, middle only
    ranks = torch.tensor([[8, 8, 8], [5, 0, 5], [0, 3, 0]], dtype=torch.int32)
    for s in range(SLOTS):  # rank rows past an adapter's rank hold zeros, as LoRALinear keeps them
        for i in range(len(WIDTHS)):
            a[i, s, int(ranks[s, i]) :] = 0
    # runs of 1 to 6 rows of one slot (the kernel takes up to 4 rows of a slot at once), in turn -1
    # (the base model alone), 0, 1, 2
    row_slot = [s for i in range(rows) for s in [i % 4 - 1] * (i % 6 + 1)][:rows]
    wide = torch.randn(rows, sum(WIDTHS) + 7, generator=g).to(dtype)
    y = wide[:, 3 : 3 + sum(WIDTHS)]  # a column slice: rows strided
    want = _reference(y, x, a, b, row_slot, ranks)
    untouched = wide.clone()
    slots = torch.tensor(row_slot, dtype=torch.int32)
    firsts = [0, WIDTHS[0], WIDTHS[0] + WIDTHS[1]]
    torch.ops.pagoda_cpu.lora_add_(y, x, a, b, slots, ranks, firsts, list(WIDTHS))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.float(), want, rtol=tol, atol=tol * float(want.abs().max()))
    base_rows = slots < 0
    assert torch.equal(y[base_rows], untouched[base_rows, 3 : 3 + sum(WIDTHS)])
    assert torch.equal(wide[:, :3], untouched[:, :3]) and torch.equal(wide[:, -4:], untouched[:, -4:])
    assert not torch.equal(y[~base_rows], untouched[~base_rows, 3 : 3 + sum(WIDTHS)])


@needs_kernels
def test_kernel_refuses_bad_arguments() -> None:
    assert native.available()
    x, y = torch.randn(2, IN), torch.zeros(2, sum(WIDTHS))
    a, b = torch.zeros(3, SLOTS, MAX_RANK, IN), torch.zeros(SLOTS, MAX_RANK, sum(WIDTHS))
    ranks = torch.zeros(SLOTS, 3, dtype=torch.int32)
    firsts, widths = [0, 48, 68], list(WIDTHS)
    op = torch.ops.pagoda_cpu.lora_add_
    with pytest.raises(RuntimeError, match="row_slot out of range"):
        op(y, x, a, b, torch.tensor([0, SLOTS], dtype=torch.int32), ranks, firsts, widths)
    with pytest.raises(RuntimeError, match="rank out of range"):
        op(y, x, a, b, torch.zeros(2, dtype=torch.int32), ranks + MAX_RANK + 1, firsts, widths)
    with pytest.raises(RuntimeError, match="columns"):
        op(y, x, a, b, torch.zeros(2, dtype=torch.int32), ranks, [0, 48, 70], widths)
    with pytest.raises(RuntimeError, match="dtype"):
        op(y, x, a.bfloat16(), b, torch.zeros(2, dtype=torch.int32), ranks, firsts, widths)

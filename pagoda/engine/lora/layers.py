"""The model side of multi-LoRA: a wrapper around a decoder's projections that adds each token's
adapter, `y = base(x) + (x @ A[slot]^T) @ B[slot]`, on top of whatever the base linear is (dense,
int8/int4 quantized, oneDNN-packed).

Each wrapped projection holds `max_loras` slots of stacked weights in the run dtype, B scaled by
alpha / r already (zeros past an adapter's rank, and for sub-projections it does not target):

  lora_a [subs, slots, max_rank, in]      subs: q, k, v of qkv_proj; gate, up of gate_up_proj
  lora_b [slots, max_rank, out]           sub i's B in its own columns of the fused output

The runner sets one `LoRAStep` per step on the model's `LoRAContext` (None: no token has an
adapter, and the projections are the base's alone). A step's tokens come as segments, runs of
rows with one slot (sequences are contiguous in a step and sorted by adapter), so every Python
loop below is over segments or sub-projections, never over tokens:

- GPU: the SGMV kernels (pagoda/kernels/lora.py), one shrink and one expand per sub-projection.
- CPU with pagoda's kernels (AVX512-VNNI; csrc/lora.cpp): one op per projection, each row against
  its own slot's adapter only, in the sub-projections that adapter targets. On 2 cores (demo model,
  16 decode rows over 8 rank-8 adapters on all seven projections, one thread) it adds 6 ms to a
  30 ms step, against 13 ms for the masked path below; at these sizes the adapters' bytes
  (39 MB a step for 8 such adapters, against the base's ~80 MB of 4-bit weights) set the floor.
- CPU otherwise, few rows (decode steps): the rank columns of every slot in use at once, one
  batched matmul `x @ A^T` over the sub-projections [subs, T, used slots x rank], rows masked to
  their own slot's columns, then one addmm per sub-projection into its columns: 2 + subs ops per
  projection however many adapters, 8x the useful flops at 8 adapters. These ops run on one
  thread: a 2-thread OpenMP region per tiny matmul took 0.5-8 ms whenever another process held a
  core.
- CPU otherwise, many rows (prefill chunks): a shrink and an expand per segment and sub-projection.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from pagoda.engine.models.arch_config import ModelArchConfig

# HF target module -> (the engine's projection, its sub-projection index)
TARGET_SLICES = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "o_proj": ("o_proj", 0),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
    "down_proj": ("down_proj", 0),
}
# CPU: the masked path while rows x slots stay within this (its flops grow with both)
MASKED_MAX_ROW_SLOTS = 512


@dataclass
class LoRAStep:
    """One step's adapter rows: segments (first row, rows, slot) in row order; base rows are in
    none. `mask` [tokens, 3 x slots x max_rank] (CPU masked path): 1 in the row's own slot's rank
    columns, 0 elsewhere, repeated for up to three sub-projections."""

    num_tokens: int
    segments: list[tuple[int, int, int]]
    mask: torch.Tensor | None = None
    row_slot: torch.Tensor | None = None  # CPU with pagoda's kernels: each row's slot, -1: none
    seg_tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # GPU: start, len, slot
    max_len: int = 0

    @classmethod
    def build(
        cls,
        segments: list[tuple[int, int, int]],
        num_tokens: int,
        num_slots: int,
        max_rank: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> LoRAStep:
        step = cls(num_tokens, segments, max_len=max(n for _, n, _ in segments))
        if use_sgmv(device):
            cols = [torch.tensor(c, dtype=torch.int32) for c in zip(*segments, strict=True)]
            starts, lengths, slots = (c.to(device, non_blocking=True) for c in cols)
            step.seg_tensors = (starts, lengths, slots)
        elif use_native(device, dtype):
            row_slot = torch.full((num_tokens,), -1, dtype=torch.int32)
            for first, n, slot in segments:
                row_slot[first : first + n] = slot
            step.row_slot = row_slot
        elif num_tokens * num_slots <= MASKED_MAX_ROW_SLOTS:
            mask = torch.zeros(num_tokens, num_slots, max_rank, dtype=dtype)
            for first, n, slot in segments:
                mask[first : first + n, slot] = 1
            step.mask = mask.view(num_tokens, -1).repeat(1, 3).to(device)
        return step


def no_adapter_rows(num_tokens: int) -> LoRAStep:
    """A step none of whose rows has an adapter, as the compiled decode graphs of a model with
    adapters take it (they read each row's slot whatever the step; csrc/lora.cpp skips these)."""
    return LoRAStep(num_tokens, [], row_slot=torch.full((num_tokens,), -1, dtype=torch.int32))


def use_sgmv(device: torch.device) -> bool:
    """The Triton kernels run on CUDA only (tests run them under the interpreter too)."""
    return device.type == "cuda"


def use_native(device: torch.device, dtype: torch.dtype) -> bool:
    """pagoda's CPU kernel (csrc/lora.cpp: one op per projection, each row against its own
    adapter only) where the CPU has it, for float32 and bfloat16."""
    if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return False
    from pagoda.engine.quantization.linear import native_kernels

    return native_kernels()


class LoRAContext:
    """The step's adapter rows, shared by every LoRALinear of one model; the runner owns it and
    sets `step` before each forward."""

    def __init__(self) -> None:
        self.step: LoRAStep | None = None


class LoRALinear(nn.Module):
    def __init__(
        self,
        base: nn.Module,
        fan_in: int,
        out_sizes: tuple[int, ...],  # the sub-projections' widths, in output order
        max_loras: int,
        max_rank: int,
        ctx: LoRAContext,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.base = base
        self.ctx = ctx
        self.fan_in = fan_in
        self.max_rank = max_rank
        offsets = [sum(out_sizes[:i]) for i in range(len(out_sizes))]
        self.slices = list(zip(offsets, out_sizes, strict=True))  # (first column, width) per sub
        self.columns = (offsets, list(out_sizes))  # the same as two lists, for the CPU kernel
        subs, out = len(out_sizes), sum(out_sizes)
        # buffers, so that compiled decode graphs read them at each call (set_slot writes in place)
        self.lora_a: torch.Tensor
        self.lora_b: torch.Tensor
        self.ranks: torch.Tensor  # (slot, sub)'s adapter rank, 0: none
        a = torch.zeros(subs, max_loras, max_rank, fan_in, dtype=dtype, device=device)
        self.register_buffer("lora_a", a, persistent=False)
        self.register_buffer(
            "lora_b", torch.zeros(max_loras, max_rank, out, dtype=dtype, device=device), persistent=False
        )
        self.register_buffer("ranks", torch.zeros(max_loras, subs, dtype=torch.int32), persistent=False)
        self._filled: set[tuple[int, int]] = set()  # (slot, sub) holding an adapter's weights

    def set_slot(self, slot: int, sub: int, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        """Put sub-projection `sub`'s A [r, in] and scaled B [out, r] in `slot` (None: zeros)."""
        first, width = self.slices[sub]
        self.lora_a[sub, slot].zero_()
        self.lora_b[slot, :, first : first + width].zero_()
        self._filled.discard((slot, sub))
        self.ranks[slot, sub] = 0
        if a is not None and b is not None:
            self._filled.add((slot, sub))
            r = a.shape[0]
            self.ranks[slot, sub] = r
            self.lora_a[sub, slot, :r] = a.to(self.lora_a.dtype)
            self.lora_b[slot, :r, first : first + width] = b.t().to(self.lora_b.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [T, in] -> [T, out]
        y: torch.Tensor = self.base(x)
        step = self.ctx.step
        if step is not None and step.row_slot is not None:  # also in compiled graphs, slots empty or not
            torch.ops.pagoda_cpu.lora_add_(
                y, x.contiguous(), self.lora_a, self.lora_b, step.row_slot, self.ranks, *self.columns
            )
            return y
        if step is None or not self._filled:  # no adapter in any slot targets this projection
            return y
        if step.seg_tensors is not None:
            self._sgmv(x, y, step)
        elif step.mask is not None:
            self._masked(x, y, step.mask)
        else:
            self._segments(x, y, step.segments)
        return y

    def _masked(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> None:
        subs, slots, rank, _ = self.lora_a.shape
        cols = slots * rank
        b = self.lora_b.view(cols, -1)  # [slots x rank, out]
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            h = (x @ self.lora_a.view(subs * cols, self.fan_in).t()).mul_(mask[:, : subs * cols])
            for i, (first, width) in enumerate(self.slices):
                y[:, first : first + width].addmm_(
                    h[:, i * cols : (i + 1) * cols], b[:, first : first + width]
                )
        finally:
            torch.set_num_threads(threads)

    def _segments(self, x: torch.Tensor, y: torch.Tensor, segments: list[tuple[int, int, int]]) -> None:
        for first_row, n, slot in segments:
            rows = slice(first_row, first_row + n)
            for i, (first, width) in enumerate(self.slices):
                cols = slice(first, first + width)
                y[rows, cols].addmm_(x[rows] @ self.lora_a[i, slot].t(), self.lora_b[slot, :, cols])

    def _sgmv(self, x: torch.Tensor, y: torch.Tensor, step: LoRAStep) -> None:
        from pagoda.kernels.lora import lora_expand, lora_shrink

        assert step.seg_tensors is not None
        start, length, slot = step.seg_tensors
        rank = self.max_rank
        h = torch.empty(x.shape[0], len(self.slices) * rank, dtype=x.dtype, device=x.device)
        for i, (first, width) in enumerate(self.slices):
            hi = h[:, i * rank : (i + 1) * rank]
            lora_shrink(x, self.lora_a[i], hi, start, length, slot, step.max_len)
            cols = slice(first, first + width)
            lora_expand(hi, self.lora_b[:, :, cols], y[:, cols], start, length, slot, step.max_len)

    def extra_repr(self) -> str:
        subs, slots, rank, _ = self.lora_a.shape
        return f"slots={slots}, max_rank={rank}, sub_projections={subs}"


def add_lora_layers(
    cfg: ModelArchConfig,
    layers: Iterable[nn.Module],
    max_loras: int,
    max_rank: int,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[LoRAContext, list[dict[str, LoRALinear]]]:
    """Wrap each decoder layer's qkv, o, gate/up and down projections (those it has); returns the
    context the runner sets each step and, per layer, the engine's projection name -> wrapper."""
    q, kv, inter = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    plan = {
        "qkv_proj": ("self_attn", cfg.hidden_size, (q, kv, kv)),
        "o_proj": ("self_attn", q, (cfg.hidden_size,)),
        "gate_up_proj": ("mlp", cfg.hidden_size, (inter, inter)),
        "down_proj": ("mlp", inter, (cfg.hidden_size,)),
    }
    ctx = LoRAContext()
    wrapped: list[dict[str, LoRALinear]] = []
    for layer in layers:
        mods: dict[str, LoRALinear] = {}
        for name, (parent_name, fan_in, outs) in plan.items():
            parent = getattr(layer, parent_name, None)
            base = getattr(parent, name, None)
            if parent is None or base is None:
                continue
            mods[name] = LoRALinear(base, fan_in, outs, max_loras, max_rank, ctx, dtype, device)
            setattr(parent, name, mods[name])
        wrapped.append(mods)
    return ctx, wrapped

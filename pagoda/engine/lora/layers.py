"""The model side of multi-LoRA: a wrapper around a decoder's projections that adds each token's
adapter, `y = base(x) + (x @ A[slot]^T) @ B[slot]`, on top of whatever the base linear is (dense,
int8/int4 quantized, oneDNN-packed).

Each wrapped projection holds `max_loras` slots of stacked weights in the run dtype, B scaled by
alpha / r already (zeros past an adapter's rank, and for sub-projections it does not target):

  lora_a [subs, slots, max_rank, in]      subs: q, k, v of qkv_proj; gate, up of gate_up_proj
  lora_b [slots, max_rank, out]           sub i's B writes its own columns of the fused output

The runner sets one `LoRAStep` per step on the model's `LoRAContext` (None: no token has an
adapter, and the projections are the base's alone). A step's tokens come as segments, runs of
rows with one slot (sequences are contiguous in a step and sorted by adapter), so every loop
below is over segments or sub-projections, never over tokens:

- GPU: the SGMV kernels (pagoda/kernels/lora.py), one shrink and one expand per sub-projection.
- CPU, short segments (decode steps): every used slot at once, `x @ A_all^T`, rows masked to
  their own slot's rank columns, then `@ B_all`: 2 + sub-projections ops per projection however
  many adapters.
- CPU, long segments (prefill chunks): a shrink and an expand per segment.
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
# CPU: segments shorter than this on average take the masked path, whose extra flops (every used
# slot's rank for every row) cost less than a per-segment loop's ops up to prompt-sized segments
DENSE_MAX_MEAN_SEGMENT = 64


@dataclass
class LoRAStep:
    """One step's adapter rows: segments (first row, rows, slot) in row order; base rows are in
    none. `mask` [tokens, used slots x max_rank] (CPU masked path): 1 in the row's own slot's
    rank columns, 0 elsewhere."""

    num_tokens: int
    segments: list[tuple[int, int, int]]
    mask: torch.Tensor | None = None
    seg_tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # GPU: start, len, slot
    max_len: int = 0

    @classmethod
    def build(
        cls,
        segments: list[tuple[int, int, int]],
        num_tokens: int,
        max_rank: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> LoRAStep:
        step = cls(num_tokens, segments, max_len=max(n for _, n, _ in segments))
        if use_sgmv(device):
            cols = [torch.tensor(c, dtype=torch.int32) for c in zip(*segments, strict=True)]
            starts, lengths, slots = (c.to(device, non_blocking=True) for c in cols)
            step.seg_tensors = (starts, lengths, slots)
        elif num_tokens < DENSE_MAX_MEAN_SEGMENT * len(segments):
            used = max(s for _, _, s in segments) + 1
            mask = torch.zeros(num_tokens, used, max_rank, dtype=dtype)
            for first, n, slot in segments:
                mask[first : first + n, slot] = 1
            step.mask = mask.view(num_tokens, used * max_rank).to(device)
        return step


def use_sgmv(device: torch.device) -> bool:
    """The Triton kernels run on CUDA only (tests run them under the interpreter too)."""
    return device.type == "cuda"


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
        subs, out = len(out_sizes), sum(out_sizes)
        self.lora_a = torch.zeros(subs, max_loras, max_rank, fan_in, dtype=dtype, device=device)
        self.lora_b = torch.zeros(max_loras, max_rank, out, dtype=dtype, device=device)

    def set_slot(self, slot: int, sub: int, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        """Put sub-projection `sub`'s A [r, in] and scaled B [out, r] in `slot` (None: zeros)."""
        first, width = self.slices[sub]
        self.lora_a[sub, slot].zero_()
        self.lora_b[slot, :, first : first + width].zero_()
        if a is not None and b is not None:
            r = a.shape[0]
            self.lora_a[sub, slot, :r] = a.to(self.lora_a.dtype)
            self.lora_b[slot, :r, first : first + width] = b.t().to(self.lora_b.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [T, in] -> [T, out]
        y: torch.Tensor = self.base(x)
        step = self.ctx.step
        if step is None:
            return y
        if step.seg_tensors is not None:
            self._sgmv(x, y, step)
        elif step.mask is not None:
            self._masked(x, y, step.mask)
        else:
            self._segments(x, y, step.segments)
        return y

    def _masked(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> None:
        """Every used slot's shrink at once, each row keeping its own slot's rank columns: one
        batched matmul over the sub-projections, one multiply, one addmm per sub-projection."""
        cols = mask.shape[1]  # used slots x max_rank
        used, subs = cols // self.max_rank, len(self.slices)
        a = self.lora_a[:, :used].view(subs, cols, self.fan_in)
        h = torch.matmul(x, a.transpose(1, 2)).mul_(mask)  # [subs, T, used * rank]
        b = self.lora_b[:used].view(cols, -1)
        if subs == 1:
            y.addmm_(h[0], b)
            return
        for i, (first, width) in enumerate(self.slices):
            y[:, first : first + width].addmm_(h[i], b[:, first : first + width])

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

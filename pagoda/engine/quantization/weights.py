"""`QuantizedWeight`: one linear's quantized weight in a format-free form, the meeting point of
every quantized source (GGUF blocks, compressed-tensors, GPTQ, AWQ, `pagoda quantize`) and every
quantized linear layer (pagoda/engine/quantization/linear.py).

    w[o, i] = codes[o, i] * scale[o, i // group] + offset[o, i // group]     (integer codes)
    w[o, i] = codes[o, i] * scale[o, i // group]                             (float8 codes)

Offsets are in weight units, not code units (a zero point z is offset = -z * scale): GGUF's
Q4_1/Q4_K store a block minimum that is not a whole number of steps. Codes are kept as small
integers (int16 in transit, so any 8-bit signed or unsigned range fits); a layer packs them once
into the layout its kernel wants.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch

# activation quantization at run time, dynamic: "int8" and "fp8" per token (W8A8, FP8 checkpoints);
# "int8_group" to 8 bits per block of the weight's groups, as llama.cpp, vLLM and SGLang run GGUF
# blocks (their Q8 activations); None: the weight alone is quantized
ActQuant = Literal["int8", "int8_group", "fp8"] | None


@dataclass(frozen=True)
class QuantizedWeight:
    codes: torch.Tensor  # [out, in]: int16 integers within `bits` bits, or torch.float8_e4m3fn
    scale: torch.Tensor  # [out, in // group_size] float32 (in // group_size == 1: per channel)
    offset: torch.Tensor | None  # like scale, or None (symmetric: w = codes * scale)
    bits: int  # 4 or 8 (the code range: [0, 15] or [-8, 7] at 4 bits, int8/uint8 at 8)
    act: ActQuant = None  # how activations are quantized at run time (ActQuant)
    sparse_24: bool = False  # 2:4 structured sparsity (stored dense; the layer may exploit it)

    def __post_init__(self) -> None:
        out_f, in_f = self.codes.shape
        if self.scale.dim() != 2 or self.scale.shape[0] != out_f or in_f % self.scale.shape[1]:
            raise ValueError(
                f"scale {tuple(self.scale.shape)} does not group codes {tuple(self.codes.shape)}"
            )
        if self.offset is not None and self.offset.shape != self.scale.shape:
            raise ValueError(
                f"offset {tuple(self.offset.shape)} differs from scale {tuple(self.scale.shape)}"
            )

    @property
    def out_features(self) -> int:
        return int(self.codes.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.codes.shape[1])

    @property
    def group_size(self) -> int:
        return self.in_features // int(self.scale.shape[1])

    @property
    def is_float(self) -> bool:
        return self.codes.dtype.is_floating_point

    def dequantize(self) -> torch.Tensor:
        """The weight [out, in] in float32, by the formula in the module docstring."""
        g = self.group_size
        w = self.codes.float().view(self.out_features, -1, g) * self.scale.float()[..., None]
        if self.offset is not None:
            w = w + self.offset.float()[..., None]
        return w.view(self.out_features, self.in_features)

    def regroup(self, group_size: int) -> QuantizedWeight:
        """The same weight with groups of `group_size` (a divisor of this one's): each scale and
        offset repeated, so the values are unchanged (this weight itself if its groups are those)."""
        if group_size == self.group_size:
            return self
        if self.group_size % group_size:
            raise ValueError(f"cannot regroup groups of {self.group_size} into groups of {group_size}")
        k = self.group_size // group_size
        offset = None if self.offset is None else self.offset.repeat_interleave(k, 1)
        return replace(self, scale=self.scale.repeat_interleave(k, 1), offset=offset)

    def rows(self, start: int, n: int) -> QuantizedWeight:
        """Output rows [start, start + n) (a column-parallel shard)."""
        part = slice(start, start + n)
        offset = None if self.offset is None else self.offset[part].contiguous()
        return replace(
            self, codes=self.codes[part].contiguous(), scale=self.scale[part].contiguous(), offset=offset
        )

    def columns(self, start: int, n: int) -> QuantizedWeight:
        """Input columns [start, start + n) (a row-parallel shard): whole groups only, or any
        columns of a weight with one scale per row; ValueError otherwise."""
        g = self.group_size
        codes = self.codes[:, start : start + n].contiguous()
        if g == self.in_features:  # per channel: every shard keeps the row's scale
            return replace(self, codes=codes)
        if start % g or n % g:
            raise ValueError(
                f"a weight quantized in groups of {g} inputs cannot be split at columns {start}..{start + n} "
                "across tensor-parallel ranks; use fewer ranks, a checkpoint quantized in smaller "
                "groups, or --quantization none"
            )
        groups = slice(start // g, (start + n) // g)
        offset = None if self.offset is None else self.offset[:, groups].contiguous()
        return replace(self, codes=codes, scale=self.scale[:, groups].contiguous(), offset=offset)


def concat_rows(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """Stack weights along the output dimension (q, k, v into qkv; gate, up into gate_up). Parts
    may differ in group size (the common divisor is used) and bits (the widest); they must agree
    on integer or float codes and on activation quantization."""
    first = parts[0]
    if any(p.is_float != first.is_float or p.act != first.act for p in parts):
        raise ValueError("cannot fuse weights quantized with different schemes into one linear")
    group = min(p.group_size for p in parts)
    parts = [p.regroup(group) for p in parts]
    offsets = None
    if any(p.offset is not None for p in parts):
        offsets = torch.cat([p.offset if p.offset is not None else torch.zeros_like(p.scale) for p in parts])
    return QuantizedWeight(
        codes=torch.cat([p.codes for p in parts]),
        scale=torch.cat([p.scale for p in parts]),
        offset=offsets,
        bits=max(p.bits for p in parts),
        act=first.act,
        sparse_24=all(p.sparse_24 for p in parts),
    )

"""RoPE frequencies as Hugging Face computes them (`modeling_rope_utils`), for each `rope_scaling`
type pagoda runs: default, linear, llama3, yarn and longrope.

Every type gives inverse frequencies [rotary_dim / 2] and an attention factor, the number HF
multiplies cos and sin by (YaRN's and LongRoPE's mscale; 1.0 for the others). The numbers are
computed with HF's operations in HF's order, so the tables match it bitwise. Always on the CPU
(models are built under a "meta" device context).
"""

from __future__ import annotations

import math
from typing import Any

import torch

SCALING_TYPES = ("default", "linear", "llama3", "yarn", "longrope")


def _base_inv_freq(dim: int, base: float) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    factor = float(scaling["factor"])
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    old_len = float(scaling.get("original_max_position_embeddings", 8192))
    low_wavelen = old_len / low
    high_wavelen = old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature (its eq. 21): 0.1 * mscale * ln(factor) + 1."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn(dim: int, base: float, scaling: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """YaRN (NTK-by-parts): dims that turn many times within the original context keep their
    frequency (extrapolation), slow dims are divided by `factor` (interpolation), a linear ramp
    between; cos/sin are scaled by the attention factor."""
    factor = float(scaling["factor"])
    original = float(scaling["original_max_position_embeddings"])
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:  # the dim that turns `rotations` times in `original`
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no division by zero
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    extrapolated = 1 - ramp
    pos_freqs = base ** (torch.arange(0, dim, 2, device="cpu").to(dtype=torch.float) / dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolated) + (1.0 / pos_freqs) * extrapolated
    return inv_freq, float(attention_factor)


def _longrope(
    dim: int, base: float, scaling: dict[str, Any], max_position: int
) -> tuple[torch.Tensor, float]:
    """LongRoPE (Phi-3/4): per-dim divisors, `short_factor` within the original context and
    `long_factor` beyond it. HF picks the set per forward pass from the longest sequence in it,
    so a sequence's keys change frequencies when it grows past the original context; a paged
    cache cannot follow that, so one set serves every position, chosen from the engine's
    max_model_len (`max_position`): short when it fits the original context (HF's numbers for
    every sequence), else long (HF's numbers past the original context, as vLLM does)."""
    original = int(scaling["original_max_position_embeddings"])
    factor = float(scaling["factor"])
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    ext = scaling["long_factor"] if max_position > original else scaling["short_factor"]
    if len(ext) != dim // 2:
        raise ValueError(f"longrope factors have {len(ext)} entries, the rotary dims need {dim // 2}")
    shape = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    return 1.0 / (torch.tensor(ext, dtype=torch.float32, device="cpu") * base**shape), float(attention_factor)


def rope_parameters(
    dim: int, base: float, scaling: dict[str, Any] | None, max_position: int
) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [dim / 2] on the CPU, attention factor) of a RoPE over `dim` dims;
    `max_position`: the longest sequence the tables serve (LongRoPE picks its factors by it)."""
    scaling = scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "yarn":
        return _yarn(dim, base, scaling)
    if rope_type == "longrope":
        return _longrope(dim, base, scaling, max_position)
    inv_freq = _base_inv_freq(dim, base)
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling), 1.0
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"]), 1.0
    if rope_type not in ("default", None):
        raise ValueError(f"rope_scaling type {rope_type!r} is not supported ({', '.join(SCALING_TYPES)})")
    return inv_freq, 1.0


def rope_inv_freq(head_dim: int, base: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] on the CPU, as HF computes them (types whose attention
    factor is 1: default, linear, llama3)."""
    inv_freq, attention_factor = rope_parameters(head_dim, base, scaling, 0)
    assert attention_factor == 1.0, f"rope_inv_freq drops an attention factor of {attention_factor}"
    return inv_freq

"""Folding SmoothQuant / AWQ per-channel factors into the weights, so the model computes the same
function with no extra op at run time (LLM Compressor's mappings for the Llama family).

A factor s [in] at a linear's input means x' = x / s and W' = W * s (columns): W' x' = W x. The
division is folded into whatever produced x:

    input_layernorm          -> q, k, v        norm(x) * g: g / s
    post_attention_layernorm -> gate, up       likewise
    up_proj                  -> down_proj      silu(gate) * (up / s) = (silu(gate) * up) / s: up's rows / s
    v_proj                   -> o_proj (AWQ)   attention output = sum_t p_t v_t, a convex mix of v rows of
                                               the same channel: v's rows (and bias) / s

v -> o needs one v channel per o input, so it is applied only without grouped-query attention
(num_kv_heads == num_heads), as LLM Compressor skips it for GQA. Every identity is checked on the
engine's model in tests/unit/test_compress_smoothing.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagoda.engine.models.arch_config import ModelArchConfig


@dataclass(frozen=True)
class Smoothing:
    """One place a factor goes: `source` (a norm, or a linear whose rows produce the input) and the
    linears that read that input; `site` is the engine linear whose calibration stats apply."""

    source: str  # HF module name: "model.layers.0.input_layernorm" or "model.layers.0.mlp.up_proj"
    source_is_norm: bool
    linears: tuple[str, ...]  # HF linear names reading the smoothed input
    site: str  # engine linear name: "layers.0.self_attn.qkv_proj"


def layer_smoothings(arch: ModelArchConfig, i: int, with_v_to_o: bool) -> list[Smoothing]:
    """Layer i's smoothings in LLM Compressor's order (qkv, o, gate/up, down)."""
    p = f"model.layers.{i}."
    attn, mlp = p + "self_attn.", p + "mlp."
    out = [
        Smoothing(p + "input_layernorm", True, (attn + "q_proj", attn + "k_proj", attn + "v_proj"),
                  f"layers.{i}.self_attn.qkv_proj"),
    ]  # fmt: skip
    if with_v_to_o and arch.num_kv_heads == arch.num_heads:
        out.append(Smoothing(attn + "v_proj", False, (attn + "o_proj",), f"layers.{i}.self_attn.o_proj"))
    out.append(
        Smoothing(p + "post_attention_layernorm", True, (mlp + "gate_proj", mlp + "up_proj"),
                  f"layers.{i}.mlp.gate_up_proj")
    )  # fmt: skip
    out.append(Smoothing(mlp + "up_proj", False, (mlp + "down_proj",), f"layers.{i}.mlp.down_proj"))
    return out


def fold(weights: dict[str, torch.Tensor], smoothing: Smoothing, s: torch.Tensor) -> None:
    """Apply x' = x / s at `smoothing`'s input and W' = W * s to its linears, in place in
    `weights` (HF names, float32)."""
    s = s.float()
    if smoothing.source_is_norm:
        name = smoothing.source + ".weight"
        weights[name] = weights[name] / s
    else:
        name = smoothing.source + ".weight"
        weights[name] = weights[name] / s[:, None]  # [out, in]: rows
        bias = smoothing.source + ".bias"
        if bias in weights:
            weights[bias] = weights[bias] / s
    for linear in smoothing.linears:
        name = linear + ".weight"
        weights[name] = weights[name] * s  # [out, in] * [in]: columns


def smoothed_hessian(h: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The Hessian of x / s from that of x: H / (s s^T), in H's dtype."""
    inv = 1.0 / s.double()
    return (h.double() * inv[:, None] * inv[None, :]).to(h.dtype)

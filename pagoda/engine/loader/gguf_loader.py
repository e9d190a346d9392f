"""GGUF -> Checkpoint: hyperparameters from `{arch}.*` metadata; quantized weights (Q4_0, Q4_1, Q8_0,
Q4_K, Q5_K, Q6_K) as QuantizedWeight, kept packed (pagoda/engine/quantization/gguf.py), the rest
as float32.

llama.cpp names tensors `blk.{i}.attn_q.weight` and, for Llama-family models, permutes the rows of
attn_q/attn_k so its rotary embedding can rotate adjacent pairs; we undo that so weights match
Hugging Face's layout (rotate-half). GGUF dims are listed fastest-first ([in, out]); numpy/torch
see [out, in].
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from pagoda.engine.loader import Checkpoint, ModelLoadError, gguf_model_name
from pagoda.engine.loader.gguf_file import GgufFile, GgufTensor
from pagoda.engine.loader.model_info import gguf_context_length, gguf_tokenizer, open_gguf
from pagoda.engine.loader.pooling_info import gguf_pooler
from pagoda.engine.models.arch_config import ModelArchConfig
from pagoda.engine.quantization.gguf import QUANTIZED_TYPES, gguf_quantized_weight
from pagoda.engine.quantization.weights import QuantizedWeight
from pagoda.engine.tokenization.tokenizer import Tokenizer

SUPPORTED_QUANT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")
_SUPPORTED_QTYPES = frozenset(GGMLQuantizationType[name] for name in SUPPORTED_QUANT_TYPES)

# general.architecture -> (ModelArchConfig.architecture, q/k rows permuted by llama.cpp)
_ARCHITECTURES = {
    "llama": ("llama", True),
    "mistral": ("llama", True),
    "granite": ("llama", True),
    "qwen2": ("qwen2", False),
    "qwen3": ("qwen3", False),
}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_SKIPPED = ("rope_freqs.weight",)  # folded into arch.rope_scaling


def load_gguf(path: Path) -> Checkpoint:
    reader = open_gguf(path)
    gguf_arch = reader.get("general.architecture")
    if reader.get(f"{gguf_arch}.expert_count") or "moe" in str(gguf_arch):
        raise ModelLoadError(
            f"{path.name} is a mixture-of-experts GGUF ({gguf_arch}); pagoda runs MoE models "
            "(Mixtral, Qwen2-MoE, Qwen3-MoE, Granite-MoE) from Hugging Face safetensors only"
        )
    if gguf_arch not in _ARCHITECTURES:
        raise ModelLoadError(
            f"GGUF architecture {gguf_arch!r} in {path.name} is not supported; pagoda loads "
            f"{', '.join(_ARCHITECTURES)} GGUF models"
        )
    _check_quant_types(reader, path)
    tokenizer = gguf_tokenizer(reader)
    arch = arch_from_gguf(reader, tokenizer)
    permuted = _ARCHITECTURES[gguf_arch][1]
    return Checkpoint(
        name=gguf_model_name(path),
        arch=arch,
        tokenizer=tokenizer,
        path=str(path),
        _weights=lambda: _iter_weights(reader, arch, permuted),
        quantization="gguf" if any(t.tensor_type in QUANTIZED_TYPES for t in reader.tensors) else None,
        pooler=gguf_pooler(reader.get(f"{reader.get('general.architecture')}.pooling_type")),
    )


def arch_from_gguf(reader: GgufFile, tokenizer: Tokenizer | None = None) -> ModelArchConfig:
    gguf_arch = reader.get("general.architecture")
    architecture = _ARCHITECTURES[gguf_arch][0]

    def key(suffix: str, default: Any = None) -> Any:
        return reader.get(f"{gguf_arch}.{suffix}", default)

    tensor_names = {t.name for t in reader.tensors}
    hidden = int(key("embedding_length"))
    num_heads = int(key("attention.head_count"))
    num_kv_heads = int(key("attention.head_count_kv", num_heads))
    head_dim = int(key("attention.key_length", hidden // num_heads))
    rope_dim = key("rope.dimension_count")
    if rope_dim is not None and int(rope_dim) != head_dim:
        raise ModelLoadError(
            f"GGUF model rotates {rope_dim} of {head_dim} head dims (partial RoPE); "
            "pagoda supports full RoPE only"
        )
    intermediate = key("feed_forward_length")
    if isinstance(intermediate, list):
        intermediate = max(intermediate)
    vocab = key("vocab_size")
    if vocab is None:
        tokens = reader.get("tokenizer.ggml.tokens")
        vocab = len(tokens) if tokens is not None else None
    if vocab is None:
        raise ModelLoadError("GGUF file states no vocab_size and carries no tokenizer.ggml.tokens")
    context = gguf_context_length(reader)
    eos_ids = tokenizer.eos_token_ids if tokenizer is not None else ()
    bos = tokenizer.bos_token_id if tokenizer is not None else reader.get("tokenizer.ggml.bos_token_id")
    return ModelArchConfig(
        architecture=architecture,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(intermediate),
        num_layers=int(key("block_count")),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(reader, gguf_arch, head_dim, context),
        max_position_embeddings=context,
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
        embedding_multiplier=float(key("embedding_scale", 1.0)),
        residual_multiplier=float(key("residual_scale", 1.0)),
        attention_multiplier=None if key("attention.scale") is None else float(key("attention.scale")),
        logits_scaling=float(key("logit_scale", 1.0)),
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=tuple(eos_ids),
    )


def _rope_scaling(reader: GgufFile, gguf_arch: str, head_dim: int, context: int) -> dict[str, Any] | None:
    prefix = f"{gguf_arch}.rope.scaling."
    kind = reader.get(prefix + "type")
    factor = reader.get(prefix + "factor") or reader.get(f"{gguf_arch}.rope.scale_linear")
    original = reader.get(prefix + "original_context_length")
    if kind in ("linear", None) and factor and float(factor) != 1.0:
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        scaling: dict[str, Any] = {"rope_type": "yarn", "factor": float(factor or 1.0)}
        if original:
            scaling["original_max_position_embeddings"] = int(original)
        for name in ("beta_fast", "beta_slow"):
            value = reader.get(prefix + "yarn_" + name)
            if value is not None:
                scaling[name] = float(value)
        return scaling
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is not None:  # Llama 3.1+: per-frequency divisors instead of the rope_scaling dict
        theta = float(reader.get(f"{gguf_arch}.rope.freq_base", 10000.0))
        return _llama3_scaling_from_factors(np.asarray(freqs.data, dtype=np.float64), theta, head_dim)
    if kind not in (None, "none", "linear"):
        raise ModelLoadError(f"GGUF rope scaling type {kind!r} is not supported (linear, yarn, llama3 are)")
    return None


def _llama3_scaling_from_factors(factors: np.ndarray, theta: float, head_dim: int) -> dict[str, Any]:
    """Recover HF's llama3 rope_scaling from llama.cpp's rope_freqs (freq_i / factors_i).

    HF: wavelen < L/high -> factor 1; wavelen > L/low -> `factor`; between, 1/f = (1-s)/factor + s with
    s = (L/wavelen - low)/(high - low). Only the ratios L/low and L/high matter, so L is fixed at 8192.
    """
    factor = float(factors.max())
    original = 8192
    wavelen = 2 * math.pi * theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    mid = (factors > 1.0 + 1e-6) & (factors < factor - 1e-6)
    if factor <= 1.0 or mid.sum() < 2:
        # no smooth band: put the band edges between the last unscaled and first scaled wavelength
        unscaled, scaled = wavelen[factors <= 1.0 + 1e-6], wavelen[factors >= factor - 1e-6]
        hi_edge = float(unscaled.max()) if unscaled.size else float(wavelen.min()) / 2
        lo_edge = float(scaled.min()) if scaled.size else float(wavelen.max()) * 2
        return {
            "rope_type": "llama3",
            "factor": factor,
            "low_freq_factor": original / lo_edge * (1 + 1e-9),
            "high_freq_factor": original / hi_edge * (1 - 1e-9),
            "original_max_position_embeddings": original,
        }
    s = (1.0 / factors[mid] - 1.0 / factor) / (1.0 - 1.0 / factor)
    x = original / wavelen[mid]
    slope, intercept = np.polyfit(x, s, 1)  # s = x/(high-low) - low/(high-low)
    span = 1.0 / slope
    low = -intercept * span
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": float(round(low, 6)),
        "high_freq_factor": float(round(low + span, 6)),
        "original_max_position_embeddings": original,
    }


def _check_quant_types(reader: GgufFile, path: Path) -> None:
    for t in reader.tensors:
        if t.tensor_type not in _SUPPORTED_QTYPES:
            raise ModelLoadError(
                f"tensor {t.name} in {path.name} uses GGUF type {t.tensor_type.name}, which pagoda cannot "
                f"dequantize; supported: {'/'.join(SUPPORTED_QUANT_TYPES)}. "
                "Use a file quantized with one of these"
            )


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor, or None for one that has no HF counterpart."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK_RE.match(gguf_name)
    if m is None or m.group(2) not in _BLOCK_NAMES:
        return None
    return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"


def dequantize_tensor(t: GgufTensor) -> torch.Tensor:
    """A GGUF tensor as float32 in torch order (GGUF dims reversed)."""
    shape = tuple(reversed(t.shape))
    if t.tensor_type == GGMLQuantizationType.F32:
        array = np.array(t.data, dtype=np.float32)  # copy: the file's mapping is read-only
    else:
        array = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
    return torch.from_numpy(array.reshape(shape))


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation: per head, rows (pair, 2) -> (2, half).

    w: [n_heads * head_dim, ...] (a weight or a bias).
    """
    rest = w.shape[1:]
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *rest).transpose(1, 2).reshape(w.shape).contiguous()


def _iter_weights(
    reader: GgufFile, arch: ModelArchConfig, permuted: bool
) -> Iterator[tuple[str, torch.Tensor | QuantizedWeight]]:
    for t in reader.tensors:
        if t.name in _SKIPPED:
            continue
        name = hf_name(t.name)
        if name is None:
            raise ModelLoadError(
                f"GGUF tensor {t.name!r} has no place in a {arch.architecture} model; the file may be "
                "a variant pagoda does not support"
            )
        tensor: torch.Tensor | QuantizedWeight
        if t.tensor_type in QUANTIZED_TYPES and len(t.shape) == 2:
            tensor = gguf_quantized_weight(t.data, t.tensor_type, (t.shape[1], t.shape[0]))
            if not name.startswith(("lm_head.", "model.embed_tokens.")):
                # 8-bit activations per block, as llama.cpp and vLLM run GGUF linears; the head
                # (tied or not) keeps 16-bit ones: logits near a tie decide greedy tokens
                tensor = replace(tensor, act="int8_group")
        else:
            tensor = dequantize_tensor(t)
        heads = arch.num_heads if ".self_attn.q_proj." in name else arch.num_kv_heads
        if permuted and (".self_attn.q_proj." in name or ".self_attn.k_proj." in name):
            tensor = _unpermuted(tensor, heads)
        yield name, tensor


def _unpermuted(tensor: torch.Tensor | QuantizedWeight, heads: int) -> torch.Tensor | QuantizedWeight:
    if isinstance(tensor, torch.Tensor):
        return unpermute_rope_rows(tensor, heads)
    offset = None if tensor.offset is None else unpermute_rope_rows(tensor.offset, heads)
    return replace(
        tensor,
        codes=unpermute_rope_rows(tensor.codes, heads),
        scale=unpermute_rope_rows(tensor.scale, heads),
        offset=offset,
    )

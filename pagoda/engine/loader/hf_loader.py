"""Hugging Face directory -> Checkpoint: config.json + *.safetensors + tokenizer files.

Weights keep their stored names and dtypes; config.json of transformers 4.x (rope_theta +
rope_scaling) and 5.x (rope_parameters) both map onto ModelArchConfig. A config.json with
`quantization_config` selects a CheckpointFormat (pagoda/engine/quantization/formats.py) that turns
each quantized linear's stored parts into one QuantizedWeight.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from safetensors import safe_open

from pagoda.engine.loader import Checkpoint, ModelLoadError
from pagoda.engine.loader.hf_moe import moe_fields
from pagoda.engine.loader.model_info import hf_context_length, hf_tokenizer, read_hf_config
from pagoda.engine.loader.pooling_info import hf_pooler
from pagoda.engine.models.arch_config import ModelArchConfig
from pagoda.engine.models.rope_scaling import SCALING_TYPES
from pagoda.engine.quantization.formats import CheckpointFormat, WeightTensor, checkpoint_format
from pagoda.engine.tokenization.tokenizer import Tokenizer

# config.json model_type -> ModelArchConfig.architecture
_MODEL_TYPES = {
    "llama": "llama",
    "mistral": "llama",
    "granite": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "phi3": "phi3",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "bert": "bert",
    "mixtral": "mixtral",
    "qwen2_moe": "qwen2_moe",
    "qwen3_moe": "qwen3_moe",
    "granitemoe": "granitemoe",
}
# Gemma's local layers when config.json lists no layer_types: Gemma 2 alternates (even layers
# local), Gemma 3 makes five of each six local (sliding_window_pattern)
_GEMMA_PATTERN = {"gemma2": 2, "gemma3_text": 6}
_SCALED_ROPE = ("llama3", "yarn", "longrope")  # rope types that read original_max_position_embeddings
_SKIPPED_SUFFIXES = ("rotary_emb.inv_freq",)


def load_hf_dir(path: Path, name: str) -> Checkpoint:
    config = read_hf_config(path)
    quant = checkpoint_format(config)
    tokenizer = hf_tokenizer(path)
    files = _safetensors_files(path)
    stored = _stored_names(files)
    has_lm_head = any(n.startswith("lm_head.") for n in stored)  # lm_head.weight, or a quantized head's parts
    arch = arch_from_hf_config(config, tokenizer, has_lm_head=has_lm_head)
    return Checkpoint(
        name=name,
        arch=arch,
        tokenizer=tokenizer,
        path=str(path),
        _weights=lambda: _iter_weights(files, arch, quant),
        quantization=None if quant is None else quant.method,
        pooler=hf_pooler(path, config),
    )


def arch_from_hf_config(
    config: dict[str, Any], tokenizer: Tokenizer | None = None, has_lm_head: bool = True
) -> ModelArchConfig:
    model_type = config.get("model_type")
    if model_type not in _MODEL_TYPES:
        raise ModelLoadError(
            f"model_type {model_type!r} (architectures {config.get('architectures')}) is not supported; "
            f"pagoda loads {', '.join(_MODEL_TYPES)} checkpoints"
        )
    if model_type == "bert":
        return _bert_arch(config)
    if config.get("mlp_bias"):
        raise ModelLoadError("checkpoints with mlp_bias=true are not supported; pagoda's MLP has no bias")
    architecture = _MODEL_TYPES[model_type]
    hidden = int(config["hidden_size"])
    num_heads = int(config["num_attention_heads"])
    rope_theta, rope_scaling, partial_rotary = _rope(config)
    tie = bool(config.get("tie_word_embeddings", False)) or not has_lm_head
    eos = _as_ids(config.get("eos_token_id"))
    if tokenizer is not None:
        eos = list(dict.fromkeys([*tokenizer.eos_token_ids, *eos]))
    bos = config.get("bos_token_id")
    if bos is None and tokenizer is not None:
        bos = tokenizer.bos_token_id
    granite = model_type in ("granite", "granitemoe")
    attention_multiplier = config.get("attention_multiplier") if granite else None
    window = config.get("sliding_window") if model_type in ("mistral", "phi3", "mixtral") else None
    fields: dict[str, Any] = dict(
        architecture=architecture,
        vocab_size=int(config["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(config["intermediate_size"]),
        num_layers=int(config["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(config.get("num_key_value_heads") or num_heads),
        head_dim=int(config.get("head_dim") or hidden // num_heads),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=hf_context_length(config),
        tie_word_embeddings=tie,
        attention_bias=architecture == "qwen2" or bool(config.get("attention_bias", False)),
        qk_norm=architecture in ("qwen3", "gemma3", "qwen3_moe"),
        embedding_multiplier=float(config.get("embedding_multiplier", 1.0)),
        residual_multiplier=float(config.get("residual_multiplier", 1.0)),
        attention_multiplier=None if attention_multiplier is None else float(attention_multiplier),
        logits_scaling=float(config.get("logits_scaling", 1.0)),
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=tuple(eos),
        partial_rotary_factor=partial_rotary,
        sliding_window=None if window is None else int(window),
    )
    if model_type in _GEMMA_PATTERN:
        fields.update(_gemma_fields(config))
    fields.update(moe_fields(config))
    return ModelArchConfig(**fields)


def _rope(config: dict[str, Any]) -> tuple[float, dict[str, Any] | None, float]:
    """(rope_theta, rope_scaling or None for plain RoPE, partial_rotary_factor) from a config.json
    of transformers 4 (rope_theta + rope_scaling) or 5 (rope_parameters, per layer type for
    Gemma 3: its full-attention layers' here, the sliding layers' in _gemma_fields)."""
    rope = dict(config.get("rope_parameters") or {})  # transformers 5
    rope = dict(rope.get("full_attention") or {}) if "full_attention" in rope else rope
    rope_theta = float(rope.pop("rope_theta", config.get("rope_theta", 10000.0)))
    partial = float(rope.pop("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)))
    scaling = rope or dict(config.get("rope_scaling") or {})
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    rope_type = scaling.get("rope_type", "default")
    if config.get("model_type") == "phi3" and rope_type in ("su", "yarn"):  # Phi-3's old names for LongRoPE
        rope_type = scaling["rope_type"] = "longrope"
    if rope_type in _SCALED_ROPE:  # as transformers fills them in
        if "original_max_position_embeddings" in config:  # Phi-3 keeps it outside rope_scaling
            scaling["original_max_position_embeddings"] = config["original_max_position_embeddings"]
        scaling.setdefault("original_max_position_embeddings", config.get("max_position_embeddings"))
    if rope_type in ("yarn", "longrope") and scaling.get("factor") is None:
        scaling["factor"] = int(config["max_position_embeddings"]) / int(
            scaling["original_max_position_embeddings"]
        )
    if rope_type not in SCALING_TYPES:
        raise ModelLoadError(
            f"rope_scaling type {rope_type!r} is not supported; pagoda runs {', '.join(SCALING_TYPES)}"
        )
    return rope_theta, None if rope_type == "default" else scaling, partial


def _gemma_fields(config: dict[str, Any]) -> dict[str, Any]:
    """ModelArchConfig fields of Gemma 2 / Gemma 3 (text): local layers, soft-caps, the softmax
    scale, the activation, and Gemma 3's RoPE base for local layers."""
    model_type = str(config["model_type"])
    if config.get("use_bidirectional_attention"):
        raise ModelLoadError("Gemma with use_bidirectional_attention (an embedding model) is not supported")
    n = int(config["num_hidden_layers"])
    pattern = int(config.get("sliding_window_pattern") or _GEMMA_PATTERN[model_type])
    layer_types = config.get("layer_types") or [
        "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)
    ]
    act = str(config.get("hidden_activation") or config.get("hidden_act") or "gelu_pytorch_tanh")
    if act not in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu"):
        raise ModelLoadError(f"Gemma hidden_activation {act!r} is not supported (gelu_pytorch_tanh, gelu)")
    local_theta = None
    if model_type == "gemma3_text":
        local = dict((config.get("rope_parameters") or {}).get("sliding_attention") or {})
        if local.get("rope_type", "default") != "default":
            raise ModelLoadError(f"Gemma 3 local-layer rope type {local['rope_type']!r} is not supported")
        local_theta = float(local.get("rope_theta", config.get("rope_local_base_freq", 10000.0)))
    attn_cap, final_cap = config.get("attn_logit_softcapping"), config.get("final_logit_softcapping")
    window = config.get("sliding_window")
    return {
        "sliding_window": None if window is None else int(window),
        "layer_types": tuple(str(t) for t in layer_types),
        "local_rope_theta": local_theta,
        # Gemma 3 keeps attn_logit_softcapping in its config but does not apply it (as HF)
        "attn_logit_softcap": float(attn_cap) if attn_cap is not None and model_type == "gemma2" else None,
        "final_logit_softcap": None if final_cap is None else float(final_cap),
        "attention_multiplier": float(config.get("query_pre_attn_scalar", 256)) ** -0.5,
        "hidden_act": act,
    }


def _bert_arch(config: dict[str, Any]) -> ModelArchConfig:
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise ModelLoadError(
            f"BERT position_embedding_type {config['position_embedding_type']!r} is not supported; "
            "pagoda runs absolute position embeddings"
        )
    hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    return ModelArchConfig(
        architecture="bert",
        vocab_size=int(config["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(config["intermediate_size"]),
        num_layers=int(config["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        rms_norm_eps=float(config.get("layer_norm_eps", 1e-12)),
        max_position_embeddings=hf_context_length(config),
        type_vocab_size=int(config.get("type_vocab_size", 2)),
        hidden_act=str(config.get("hidden_act", "gelu")),
    )


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        files = [path / f for f in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{str(path)!r} is missing shards listed in its index: {', '.join(missing)}")
        return files
    return sorted(path.glob("*.safetensors"))


def _stored_names(files: list[Path]) -> set[str]:
    names: set[str] = set()
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            names.update(_normalize(k) for k in handle.keys())
    return names


def _normalize(name: str) -> str:
    """Stored name -> HF causal-LM name (checkpoints of a bare `LlamaModel` lack the `model.` prefix)."""
    if name.startswith(("model.", "lm_head.")):
        return name
    return "model." + name


def _iter_weights(
    files: list[Path], arch: ModelArchConfig, quant: CheckpointFormat | None
) -> Iterator[tuple[str, WeightTensor]]:
    """Stored tensors in file order; a quantized linear's parts (which may sit in several shards)
    become one QuantizedWeight, yielded where its first part is met."""
    with ExitStack() as stack:
        handles = {f: stack.enter_context(safe_open(str(f), framework="pt")) for f in files}
        owner = {key: f for f, handle in handles.items() for key in handle.keys()}
        linears = quant.linear_parts(owner) if quant is not None else {}
        part_of = {stored: prefix for prefix, parts in linears.items() for stored in parts.values()}
        for handle in handles.values():
            for key in handle.keys():
                prefix = part_of.get(key)
                name = _normalize(key if prefix is None else prefix + ".weight")
                if name.endswith(_SKIPPED_SUFFIXES) or (
                    arch.tie_word_embeddings and name == "lm_head.weight"
                ):
                    continue
                if prefix is None:
                    yield name, handle.get_tensor(key)
                elif quant is not None and (parts := linears.pop(prefix, None)) is not None:  # first part met
                    yield (
                        name,
                        quant.read(prefix, {p: handles[owner[k]].get_tensor(k) for p, k in parts.items()}),
                    )


def _as_ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, list) else [value])]

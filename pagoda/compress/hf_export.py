"""The non-weight files of a quantized Hugging Face directory: config.json and the tokenizer.

A Hugging Face source keeps its own config.json, tokenizer files and generation_config.json. A
GGUF source has none: config.json is written with transformers' config class for the model's
family, from the ModelArchConfig the GGUF loader read (so `arch_from_hf_config` gives that config
back), and the tokenizer is saved from the GGUF vocabulary and merges by pagoda's `Tokenizer`
(tokenizer.json with the same pre-tokenizer, post-processor and special tokens, plus
tokenizer_config.json with the chat template and bos/eos), which `Tokenizer.from_hf_dir` reads
back to the same token ids.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from pagoda.engine.loader import Checkpoint
from pagoda.engine.loader.catalog import generation_defaults
from pagoda.engine.models.arch_config import ModelArchConfig

# the tokenizer and generation files a Hugging Face model directory may carry
HF_SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
STORED_DTYPE = "bfloat16"  # the unquantized tensors (embeddings, norms, lm_head)


def write_config(ckpt: Checkpoint, source_is_gguf: bool, output: Path) -> None:
    """config.json without quantization_config (the writer adds it): the source's own, or one
    built from the architecture for a GGUF source."""
    if source_is_gguf:
        config = hf_config_from_arch(ckpt.arch)
    else:
        config = json.loads((Path(ckpt.path) / "config.json").read_text(encoding="utf-8"))
        config.pop("quantization_config", None)
        if "torch_dtype" in config:
            config["torch_dtype"] = STORED_DTYPE
    config["dtype"] = STORED_DTYPE
    (output / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def hf_config_from_arch(arch: ModelArchConfig) -> dict[str, Any]:
    """A transformers config.json for `arch` (Llama, Granite, Qwen2 or Qwen3)."""
    import transformers as tf

    rope = {"rope_type": "default", **(arch.rope_scaling or {}), "rope_theta": arch.rope_theta}
    eos = list(arch.eos_token_ids)
    common: dict[str, Any] = dict(
        vocab_size=arch.vocab_size,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_heads,
        num_key_value_heads=arch.num_kv_heads,
        head_dim=arch.head_dim,
        rms_norm_eps=arch.rms_norm_eps,
        max_position_embeddings=arch.max_position_embeddings,
        tie_word_embeddings=arch.tie_word_embeddings,
        bos_token_id=arch.bos_token_id,
        eos_token_id=eos[0] if len(eos) == 1 else (eos or None),
        rope_parameters=rope,
    )
    granite = (arch.embedding_multiplier, arch.residual_multiplier, arch.logits_scaling) != (1.0, 1.0, 1.0)
    config: Any
    if arch.architecture == "qwen3":
        config, cls = tf.Qwen3Config(**common), "Qwen3ForCausalLM"
    elif arch.architecture == "qwen2":
        config, cls = tf.Qwen2Config(**common), "Qwen2ForCausalLM"
    elif granite or arch.attention_multiplier is not None:
        config = tf.GraniteConfig(
            **common,
            attention_bias=arch.attention_bias,
            embedding_multiplier=arch.embedding_multiplier,
            residual_multiplier=arch.residual_multiplier,
            attention_multiplier=arch.softmax_scale,
            logits_scaling=arch.logits_scaling,
        )
        cls = "GraniteForCausalLM"
    else:
        config, cls = tf.LlamaConfig(**common, attention_bias=arch.attention_bias), "LlamaForCausalLM"
    config.architectures = [cls]
    out: dict[str, Any] = config.to_diff_dict()
    for key in ("head_dim", "rms_norm_eps", "tie_word_embeddings", "max_position_embeddings"):
        out[key] = common[key]  # stated even where they equal the class default
    return out


def write_tokenizer(ckpt: Checkpoint, source_is_gguf: bool, output: Path) -> list[str]:
    """The tokenizer (and generation_config.json) beside the weights; returns the file names."""
    if not source_is_gguf:
        copied = []
        for name in HF_SIDE_FILES:
            src = Path(ckpt.path) / name
            if src.is_file():
                shutil.copyfile(src, output / name)
                copied.append(name)
        return copied
    ckpt.tokenizer.save_pretrained(output)
    arch = ckpt.arch
    generation: dict[str, Any] = {"bos_token_id": arch.bos_token_id}
    if arch.eos_token_ids:
        eos = list(arch.eos_token_ids)
        generation["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    sampling = generation_defaults(ckpt.path)  # the demo model's recommended sampling
    if sampling:
        generation.update(do_sample=True, **sampling)
    (output / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
    return ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]

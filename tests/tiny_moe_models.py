"""Tiny random-weight mixture-of-experts models of each family HF transformers runs, saved as
save_pretrained writes them (per-expert tensors; Granite-MoE's stacked input/output linears)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tests.tiny_models import save_tiny_tokenizer, tiny_config

# mixtral: 4 experts, top-2, renormalised; qwen2_moe: top-2 of 4 not renormalised, a shared expert,
# layer 1 dense (mlp_only_layers); qwen3_moe: top-3 of 8 renormalised, q/k norms; granitemoe:
# Granite's multipliers, softmax over the top-2 logits
MOE_KINDS = ("mixtral", "qwen2_moe", "qwen3_moe", "granitemoe")


def make_tiny_moe(kind: str, path: Path, num_layers: int = 2, **overrides: Any) -> Any:
    """Build, randomize and save a tiny MoE model of `kind`; returns the HF model (eval, float32).
    `overrides` go into its config."""
    import transformers as tf

    common = {**tiny_config(num_layers), **overrides}
    torch.manual_seed(0)
    model: Any
    config: Any
    if kind == "mixtral":
        config = tf.MixtralConfig(**{"num_local_experts": 4, "num_experts_per_tok": 2, **common})
        model = tf.MixtralForCausalLM(config)
    elif kind == "qwen2_moe":
        config = tf.Qwen2MoeConfig(
            **{
                "num_experts": 4,
                "num_experts_per_tok": 2,
                "moe_intermediate_size": 32,
                "shared_expert_intermediate_size": 48,
                "mlp_only_layers": [1],
                **common,
            }
        )
        model = tf.Qwen2MoeForCausalLM(config)
    elif kind == "qwen3_moe":
        config = tf.Qwen3MoeConfig(
            **{
                "head_dim": 32,
                "num_experts": 8,
                "num_experts_per_tok": 3,
                "moe_intermediate_size": 32,
                "norm_topk_prob": True,
                "tie_word_embeddings": True,
                **common,
            }
        )
        model = tf.Qwen3MoeForCausalLM(config)
    elif kind == "granitemoe":
        config = tf.GraniteMoeConfig(
            **{
                "num_local_experts": 4,
                "num_experts_per_tok": 2,
                "embedding_multiplier": 12.0,
                "residual_multiplier": 0.22,
                "attention_multiplier": 0.0078125,
                "logits_scaling": 8.0,
                **common,
            }
        )
        model = tf.GraniteMoeForCausalLM(config)
    else:
        raise ValueError(kind)
    with torch.no_grad():  # norms start at 1.0 and the router at 0: randomize so a mixup would show
        for tensor in model.parameters():
            tensor.add_(torch.randn_like(tensor) * 0.1)
    model.save_pretrained(str(path))
    save_tiny_tokenizer(path)
    return model.eval()

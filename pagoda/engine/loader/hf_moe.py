"""config.json of the mixture-of-experts families -> ModelArchConfig's MoE fields.

| model_type           | experts                       | expert size           | top-k renormalised |
|----------------------|-------------------------------|-----------------------|--------------------|
| mixtral, granitemoe  | num_local_experts             | intermediate_size     | always             |
| qwen2_moe, qwen3_moe | num_experts (5.x: ..._local_) | moe_intermediate_size | norm_topk_prob     |

Qwen2-MoE adds a shared expert (shared_expert_intermediate_size) and both Qwens keep the dense
MLP (intermediate_size) on mlp_only_layers and on layers off decoder_sparse_step.
"""

from __future__ import annotations

from typing import Any

from pagoda.engine.loader import ModelLoadError

_MOE_TYPES = ("mixtral", "granitemoe", "qwen2_moe", "qwen3_moe")


def moe_fields(config: dict[str, Any]) -> dict[str, Any]:
    """The MoE fields of ModelArchConfig for `config` ({} for a dense model); raises
    ModelLoadError for what pagoda's MoE layers do not run."""
    model_type = config.get("model_type")
    if model_type not in _MOE_TYPES:
        return {}
    _check_supported(config, str(model_type))
    n = int(config["num_hidden_layers"])
    fields: dict[str, Any] = {"num_experts_per_tok": int(config.get("num_experts_per_tok", 2))}
    if model_type in ("mixtral", "granitemoe"):
        fields["num_experts"] = int(config.get("num_local_experts", 8))
        fields["moe_intermediate_size"] = int(config["intermediate_size"])
        fields["norm_topk_prob"] = True
        return fields
    experts = int(config.get("num_experts") or config.get("num_local_experts") or 0)  # 4.x / 5.x
    step = int(config.get("decoder_sparse_step", 1) or 1)
    only = {int(i) for i in config.get("mlp_only_layers") or ()}
    dense = tuple(i for i in range(n) if i in only or (i + 1) % step or not experts)
    fields.update(
        num_experts=experts,
        moe_intermediate_size=int(config["moe_intermediate_size"]),
        norm_topk_prob=bool(config.get("norm_topk_prob", False)),
        dense_mlp_layers=dense,
    )
    if model_type == "qwen2_moe":
        fields["shared_expert_intermediate_size"] = int(config.get("shared_expert_intermediate_size") or 0)
        fields["attention_bias"] = bool(config.get("qkv_bias", True))  # q/k/v only, as Qwen2's
    return fields


def _check_supported(config: dict[str, Any], model_type: str) -> None:
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise ModelLoadError(
            f"{model_type} with hidden_act {act!r} is not supported; pagoda's experts run silu"
        )
    if model_type != "qwen2_moe" and config.get("attention_bias"):
        raise ModelLoadError(f"{model_type} with attention_bias=true (a bias on o_proj too) is not supported")
    if model_type in ("qwen2_moe", "qwen3_moe") and config.get("use_sliding_window"):
        raise ModelLoadError(f"{model_type} with use_sliding_window=true is not supported")

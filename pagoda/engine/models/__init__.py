"""Model registry: architecture name -> model class."""

from __future__ import annotations

from torch import nn

from pagoda.engine.models.arch_config import ModelArchConfig
from pagoda.engine.models.llama import LlamaForCausalLM

_REGISTRY: dict[str, type[LlamaForCausalLM]] = {
    "llama": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
    "qwen3": LlamaForCausalLM,
}


def build_model(cfg: ModelArchConfig, max_position: int) -> LlamaForCausalLM:
    cls = _REGISTRY[cfg.architecture]
    model = cls(cfg, max_position)
    assert isinstance(model, nn.Module)
    return model

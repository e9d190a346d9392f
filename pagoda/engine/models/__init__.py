"""Model registry: architecture name -> model class."""

from __future__ import annotations

from torch import nn

from pagoda.engine.distributed.tensor_parallel import SINGLE, TensorParallel
from pagoda.engine.models.arch_config import ModelArchConfig
from pagoda.engine.models.bert import BertModel
from pagoda.engine.models.gemma import GemmaForCausalLM
from pagoda.engine.models.llama import LlamaForCausalLM
from pagoda.engine.models.moe import MoeForCausalLM

# the decoders: a causal forward over the paged KV cache, logits, decode steps (graphs, compiled)
DecoderModel = LlamaForCausalLM | GemmaForCausalLM
Model = DecoderModel | BertModel

_REGISTRY: dict[str, type[LlamaForCausalLM] | type[GemmaForCausalLM] | type[BertModel]] = {
    "llama": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
    "qwen3": LlamaForCausalLM,
    "phi3": LlamaForCausalLM,
    "gemma2": GemmaForCausalLM,
    "gemma3": GemmaForCausalLM,
    "bert": BertModel,
    "mixtral": MoeForCausalLM,
    "qwen2_moe": MoeForCausalLM,
    "qwen3_moe": MoeForCausalLM,
    "granitemoe": MoeForCausalLM,
}


def build_model(cfg: ModelArchConfig, max_position: int, tp: TensorParallel = SINGLE) -> Model:
    """The model of `cfg`; with `tp`, that rank's shard (the Llama family: sharding.py checks)."""
    cls = _REGISTRY[cfg.architecture]
    if cls is MoeForCausalLM:  # a rank of any parallel layout (moe.py)
        model: Model = MoeForCausalLM(cfg, max_position, tp)
    elif tp.enabled:
        from pagoda.engine.distributed.sharding import check_tensor_parallel

        check_tensor_parallel(cfg, tp.size)
        assert cls is LlamaForCausalLM, cls
        model = LlamaForCausalLM(cfg, max_position, tp)
    else:
        model = cls(cfg, max_position)
    assert isinstance(model, nn.Module)
    return model

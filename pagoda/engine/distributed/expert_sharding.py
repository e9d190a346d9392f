"""Checkpoint tensors of a mixture-of-experts model -> one rank's part (expert_parallel.py's
plan), as they load: attention, dense MLPs and embeddings as the Llama family's shards
(sharding.py); of the experts only this rank's, renumbered from 0, each whole (expert parallel) or
its slice of the intermediate units (tensor parallel); the shared expert's slice of its units.
Per-expert tensors (Mixtral's w1/w2/w3, Qwen's gate/up/down_proj) and stacked ones (Granite,
transformers 5) alike."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from pagoda.engine.distributed.expert_parallel import MoePlan, moe_plan
from pagoda.engine.distributed.sharding import LlamaShards
from pagoda.engine.models.moe_weights import _EXPERT, _PART, MoeLoader, canonical_name
from pagoda.engine.models.weight_loading import Weight, fused_parts

if TYPE_CHECKING:
    from pagoda.engine.models.moe import MoeForCausalLM


def _narrow(value: Weight, dim: int, start: int, n: int) -> Weight:
    """A slice of a tensor, or a quantized linear's rows (dim 0) or columns (dim 1)."""
    if isinstance(value, torch.Tensor):
        return value.narrow(dim, start, n)
    return value.rows(start, n) if dim == 0 else value.columns(start, n)


class ParallelMoeLoader(MoeLoader):
    """MoeLoader of one rank: sizes of its shard, and each tensor cut to it as it arrives."""

    def __init__(
        self, model: MoeForCausalLM, device: torch.device, dtype: torch.dtype, keep_quantized: bool
    ) -> None:
        super().__init__(model, device, dtype, keep_quantized)
        cfg, tp = model.cfg, model.tp
        plan = moe_plan(cfg, tp)
        assert plan is not None, tp
        self.plan: MoePlan = plan
        heads, kv_heads = tp.heads(cfg.num_heads)[1], tp.kv_heads(cfg.num_kv_heads)[1]
        self.fused = fused_parts(heads, kv_heads, cfg.head_dim, tp.split(cfg.intermediate_size)[1])
        self.dense = LlamaShards(cfg, tp) if tp.enabled else None
        self.shard = self._shard
        self.num_experts = plan.num_local
        self.inter = plan.expert_inter
        self.shared_inter = plan.shared_inter

    def _shard(self, name: str, value: Weight) -> Weight:
        """Everything but the per-expert tensors (MoeLoader._one places those itself)."""
        plan = self.plan
        if ".shared_expert." in name:  # gate/up rows, down columns: this rank's units
            dim = 1 if ".down_proj." in name else 0
            return _narrow(value, dim, plan.shared_inter_start, plan.shared_inter)
        if name.endswith(".mlp.experts.gate_up_proj") or name.endswith(".mlp.experts.down_proj"):
            return self._stacked(name, value)
        return value if self.dense is None else self.dense(name, value)

    def _stacked(self, name: str, value: Weight) -> Weight:
        """[E, 2I, H] gate_up (gate rows first) or [E, H, I] down -> this rank's experts and units."""
        plan = self.plan
        if not isinstance(value, torch.Tensor):  # stacked experts are dense or int8 at load
            value = value.dequantize()
        value = value.narrow(0, plan.first_expert, plan.num_local)
        start, n = plan.expert_inter_start, plan.expert_inter
        if name.endswith("down_proj"):
            return value.narrow(2, start, n)
        half = value.shape[1] // 2
        return torch.cat([value.narrow(1, start, n), value.narrow(1, half + start, n)], dim=1)

    def _one(self, name: str, value: Weight) -> None:
        match = _EXPERT.match(canonical_name(name))
        if match is None:
            super()._one(name, value)
            return
        plan = self.plan
        expert = int(match.group(2)) - plan.first_expert
        if not 0 <= expert < plan.num_local:
            return  # another rank's expert
        dim = 1 if _PART[match.group(3)] == 2 else 0  # down: columns; gate, up: rows
        value = _narrow(value, dim, plan.expert_inter_start, plan.expert_inter)
        super()._one(f"{match.group(1)}.{expert}.{match.group(3)}.weight", value)

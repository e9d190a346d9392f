"""Mixture-of-experts decoders: Mixtral, Qwen2-MoE, Qwen3-MoE and Granite-MoE. Each is its dense
sibling of the Llama family (Mistral's window, Qwen2's qkv bias, Qwen3's q/k norms, Granite's
multipliers: flags in ModelArchConfig) with a SparseMoeBlock in place of the MLP of each MoE
layer (every layer but cfg.dense_mlp_layers).

Routing, per token: router logits [E] -> softmax in float32 -> the top k experts -> their
weights, renormalised to sum to 1 where cfg.norm_topk_prob (Mixtral and Granite always; Granite's
softmax over the top-k logits is the same renormalisation). Qwen2-MoE adds a shared expert, a
dense gated MLP every token takes, scaled by sigmoid(shared_expert_gate(x)).

Tokens come flattened: hidden states [num_tokens, hidden].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagoda.engine.distributed.tensor_parallel import SINGLE, TensorParallel
from pagoda.engine.models.arch_config import ModelArchConfig
from pagoda.engine.models.layers import GatedMLP
from pagoda.engine.models.llama import LlamaForCausalLM
from pagoda.engine.models.moe_experts import StackedExperts
from pagoda.engine.models.moe_weights import MoeLoader
from pagoda.engine.models.weight_loading import ModelLoader


class Router(nn.Module):
    """x @ weight.T kept in the checkpoint's precision: routing picks experts by comparing logits,
    which int8 weights would perturb (quantize_linears and adapters replace nn.Linear only)."""

    def __init__(self, hidden: int, out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out, hidden), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def route(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (weights [T, k] float32, expert ids [T, k] int64)."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class SparseMoeBlock(nn.Module):
    def __init__(self, cfg: ModelArchConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.top_k = cfg.num_experts_per_tok
        self.renormalize = cfg.norm_topk_prob
        self.gate = Router(h, cfg.num_experts)
        self.experts: nn.Module = StackedExperts(cfg.num_experts, h, cfg.moe_intermediate_size)
        shared = cfg.shared_expert_intermediate_size
        self.shared_expert = GatedMLP(h, shared) if shared else None
        self.shared_expert_gate = Router(h, 1) if shared else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, hidden] -> [T, hidden]
        weights, ids = route(self.gate(x), self.top_k, self.renormalize)
        out = self.experts(x, weights, ids)
        if self.shared_expert is not None and self.shared_expert_gate is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out  # type: ignore[no-any-return]


class MoeForCausalLM(LlamaForCausalLM):
    def __init__(self, cfg: ModelArchConfig, max_position: int, tp: TensorParallel = SINGLE) -> None:
        """`tp`: one rank's part (pagoda/engine/distributed/expert_parallel.py)."""
        super().__init__(cfg, max_position, tp)
        parallel = tp.enabled or tp.data_parallel is not None
        if parallel:
            from pagoda.engine.distributed.expert_parallel import moe_block

        for i, layer in enumerate(self.layers):
            if cfg.is_moe_layer(i):
                layer.mlp = moe_block(cfg, tp) if parallel else SparseMoeBlock(cfg)

    def weight_loader(self, device: torch.device, dtype: torch.dtype, keep_quantized: bool) -> ModelLoader:
        """The Llama family's names, plus the experts' (per-expert tensors stacked into place, or
        stacked already) under any family's names (moe_weights.py)."""
        if self.tp.enabled or self.tp.data_parallel is not None:
            from pagoda.engine.distributed.expert_sharding import ParallelMoeLoader

            return ParallelMoeLoader(self, device, dtype, keep_quantized)
        return MoeLoader(self, device, dtype, keep_quantized)

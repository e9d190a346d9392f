"""Mixture-of-experts layers over several ranks.

Two layouts, vLLM's meanings:

- tensor parallel (`--tensor-parallel-size N`): every rank holds every expert, each sharded like a
  dense MLP (its slice of the intermediate units); the partial outputs are summed.
- expert parallel (`--enable-expert-parallel`): rank r of N holds experts [r*E/N, (r+1)*E/N) whole.
  Attention stays tensor-parallel, so after o_proj's all-reduce every rank holds the same hidden
  states of all the step's tokens: each rank runs its experts over the tokens routed to them and
  one all-reduce sums the ranks' contributions (on the CPU with a few ranks the simplest correct
  dispatch and combine: no all-to-all, since the tokens are everywhere already).

A shared expert (Qwen2-MoE) is a dense gated MLP: sharded over the tensor-parallel ranks like any
MLP in both layouts, its partial output added to this rank's tokens' rows before the one
all-reduce. With data parallelism (data_parallel.py, data_parallel_group.py) the tokens are not
everywhere: `ExpertRoute.dispatch` gathers them from the data-parallel engines first, the experts
split over every engine's every rank, and `combine` hands each rank back its engine's rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from pagoda.engine.models.layers import GatedMLP
from pagoda.engine.models.moe import Router, route
from pagoda.engine.models.moe_experts import StackedExperts

if TYPE_CHECKING:
    from pagoda.engine.distributed.tensor_parallel import TensorParallel
    from pagoda.engine.models.arch_config import ModelArchConfig


class ExpertRoute(Protocol):
    """How a MoE layer's tokens reach this rank's experts and come back."""

    def dispatch(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's tokens [T, hidden] -> all the tokens its experts serve [T_all, hidden]."""
        ...

    def combine(self, partial: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """This rank's contribution [T_all, hidden] -> the sum over the ranks of this rank's rows
        [T, hidden] (x: this rank's tokens)."""
        ...

    def own_rows(self, partial: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The rows of `partial` [T_all, hidden] that are this rank's tokens x (a view)."""
        ...


@dataclass(frozen=True)
class AllReduceRoute:
    """Tensor parallelism: every rank holds every token; the ranks' contributions are summed."""

    tp: TensorParallel

    def dispatch(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def own_rows(self, partial: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return partial

    def combine(self, partial: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(partial)


@dataclass(frozen=True)
class MoePlan:
    """This rank's part of each MoE layer."""

    first_expert: int  # experts [first_expert, first_expert + num_local) are this rank's
    num_local: int
    expert_inter: int  # intermediate units of each local expert (a slice where sharded)
    expert_inter_start: int
    shared_inter: int  # this rank's units of the shared expert
    shared_inter_start: int
    route: ExpertRoute


def moe_plan(cfg: ModelArchConfig, tp: TensorParallel) -> MoePlan | None:
    """This rank's plan, or None for one rank (the plain SparseMoeBlock)."""
    dp = tp.data_parallel
    if not tp.enabled and dp is None:
        return None
    route: ExpertRoute = AllReduceRoute(tp) if dp is None else dp.route()
    # with data parallelism the experts split over every engine's every rank (data_parallel_group.py)
    ep_rank, ep_size = (tp.rank, tp.size) if dp is None else (dp.expert_rank, dp.expert_size)
    per = cfg.num_experts // ep_size
    i0, ni = tp.split(cfg.moe_intermediate_size)
    s0, ns = tp.split(cfg.shared_expert_intermediate_size)
    if dp is not None or tp.expert_parallel:
        return MoePlan(ep_rank * per, per, cfg.moe_intermediate_size, 0, ns, s0, route)
    return MoePlan(0, cfg.num_experts, ni, i0, ns, s0, route)


class ParallelMoeBlock(nn.Module):
    """SparseMoeBlock (moe.py) of one rank: the router whole, its experts (`plan`), and its
    slice of the shared expert; the same names, so quantization and loading find them."""

    def __init__(self, cfg: ModelArchConfig, plan: MoePlan) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.plan = plan
        self.num_experts = cfg.num_experts
        self.top_k = cfg.num_experts_per_tok
        self.renormalize = cfg.norm_topk_prob
        self.gate = Router(h, cfg.num_experts)
        self.experts: nn.Module = StackedExperts(plan.num_local, h, plan.expert_inter)
        shared = cfg.shared_expert_intermediate_size
        self.shared_expert = GatedMLP(h, plan.shared_inter) if shared else None
        self.shared_expert_gate = Router(h, 1) if shared else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, hidden] -> [T, hidden]
        xs = self.plan.route.dispatch(x)  # [T_all, hidden]
        weights, ids = route(self.gate(xs), self.top_k, self.renormalize)
        partial = self._local_experts(xs, weights, ids)
        if self.shared_expert is not None and self.shared_expert_gate is not None:
            shared = torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)  # this rank's units
            self.plan.route.own_rows(partial, x).add_(shared)  # summed with the experts' parts
        return self.plan.route.combine(partial, x)

    def _local_experts(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """This rank's experts' weighted sum over the tokens routed to them [T, hidden]; zero rows
        for tokens none of them took."""
        if self.plan.num_local == self.num_experts:  # each expert sharded: every (token, slot) here
            return self.experts(x, weights, ids)  # type: ignore[no-any-return]
        k = ids.shape[1]
        local = ids.reshape(-1) - self.plan.first_expert  # [T * k]
        pos = ((local >= 0) & (local < self.plan.num_local)).nonzero().squeeze(1)  # (token, slot)s here
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        if pos.numel():
            token = pos // k
            rows = self.experts(x[token], weights.reshape(-1)[pos, None], local[pos, None])  # one slot each
            out.index_add_(0, token, rows.float())
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        p = self.plan
        return f"experts {p.first_expert}..{p.first_expert + p.num_local - 1} of {self.num_experts}"


def moe_block(cfg: ModelArchConfig, tp: TensorParallel) -> ParallelMoeBlock:
    """The MoE block of this rank of several."""
    plan = moe_plan(cfg, tp)
    assert plan is not None, tp
    return ParallelMoeBlock(cfg, plan)

"""Checkpoint names of the MoE families -> the stacked expert weights of pagoda's MoE layers.

Each family names its experts its own way; all land in `layers.N.mlp`:

- Mixtral `block_sparse_moe.experts.E.w1/w3/w2` and Qwen-MoE `mlp.experts.E.gate_proj/up_proj/
  down_proj`: expert E's rows of `experts.gate_up_proj` (gate, then up) and `experts.down_proj`;
- Granite-MoE `block_sparse_moe.input_linear` [E, 2I, H] and `output_linear` [E, H, I], and
  transformers 5's own names (`save_original_format=False`: `mlp.experts.gate_up_proj`,
  `down_proj`): whole, as stored;
- the router: Mixtral's and Qwen's `gate`, Granite's `router.layer` (5.x: `router`) -> `gate`.

Per-expert tensors are copied into their expert's slice of the stacked parameter as they arrive
(the parameter gets memory on the first). Quantized expert tensors (a GPTQ/AWQ MoE) are
dequantized: the stacked experts are dense or int8 (`--quantization int8`).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import TYPE_CHECKING

import torch

from pagoda.engine.models.weight_loading import ModelLoader, Weight, copy_checked, fused_parts
from pagoda.engine.quantization.weights import QuantizedWeight

if TYPE_CHECKING:
    from pagoda.engine.models.moe import MoeForCausalLM

# (pattern, replacement) applied in order to each checkpoint name
_RENAMES = (
    (re.compile(r"\.block_sparse_moe\."), ".mlp."),
    (re.compile(r"\.mlp\.router\.(layer\.)?weight$"), ".mlp.gate.weight"),
    (re.compile(r"\.mlp\.input_linear\.weight$"), ".mlp.experts.gate_up_proj"),
    (re.compile(r"\.mlp\.output_linear\.weight$"), ".mlp.experts.down_proj"),
)
_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_PART = {"w1": 0, "gate_proj": 0, "w3": 1, "up_proj": 1, "w2": 2, "down_proj": 2}  # gate, up, down


def canonical_name(name: str) -> str:
    for pattern, replacement in _RENAMES:
        name = pattern.sub(replacement, name)
    return name


class MoeLoader(ModelLoader):
    """ModelLoader for MoeForCausalLM: q/k/v and gate/up fused as the Llama family's (the shared
    expert's gate/up at its own size), experts stacked."""

    def __init__(
        self, model: MoeForCausalLM, device: torch.device, dtype: torch.dtype, keep_quantized: bool
    ) -> None:
        cfg = model.cfg
        fused = fused_parts(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size)
        super().__init__(model, fused, device, dtype, keep_quantized, cfg.tie_word_embeddings)
        self.num_experts = cfg.num_experts
        self.inter = cfg.moe_intermediate_size
        self.shared_inter = cfg.shared_expert_intermediate_size
        self.expert_parts: Counter[str] = Counter()  # stacked parameter -> per-expert parts loaded

    def _target(self, name: str) -> tuple[str, int, int]:
        if ".shared_expert." in name:  # Qwen2-MoE's shared expert: a gated MLP of its own size
            for part, offset in (("gate_proj", 0), ("up_proj", self.shared_inter)):
                if f".{part}." in name:
                    return name.replace(part, "gate_up_proj"), offset, self.shared_inter
        return super()._target(name)

    def _one(self, name: str, value: Weight) -> None:
        name = canonical_name(name)
        match = _EXPERT.match(name)
        if match is None:
            super()._one(name, value)
            return
        prefix, expert, part = (
            match.group(1).removeprefix("model."),
            int(match.group(2)),
            _PART[match.group(3)],
        )
        target = f"{prefix}.{'down_proj' if part == 2 else 'gate_up_proj'}"
        if target not in self.params or expert >= self.num_experts:
            raise ValueError(f"checkpoint tensor {name!r} has no place in the model")
        if isinstance(value, QuantizedWeight):
            value = value.dequantize()
        param = self._materialized(target)  # [E, out, in]
        dest = param.data[expert]
        if part < 2:
            dest = dest.narrow(0, part * self.inter, self.inter)
        copy_checked(name, dest, value)
        self.loaded.add(f"{target}:{expert}:{part}")
        self.expert_parts[target] += 1
        self.report.dense += 1

    def _check_complete(self) -> None:
        super()._check_complete()
        for target, got in self.expert_parts.items():
            want = self.num_experts * (1 if target.endswith("down_proj") else 2)
            if got != want:
                raise ValueError(f"checkpoint is incomplete: {got} of {want} expert tensors of {target}")

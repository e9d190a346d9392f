"""Checkpoint tensors -> this rank's shard, as they load (dense tensors or QuantizedWeights: a
quantized layer is built from its shard's codes, so every quantized linear kind shards alike).

HF names decide the split: q/k/v and gate/up rows (column-parallel), o_proj and down columns
(row-parallel), embedding and LM head rows (vocabulary ranges); the rest is replicated.
"""

from __future__ import annotations

import torch

from pagoda.engine.distributed.tensor_parallel import TensorParallel
from pagoda.engine.models.arch_config import MOE_ARCHITECTURES, ModelArchConfig
from pagoda.engine.quantization.weights import QuantizedWeight

Weight = torch.Tensor | QuantizedWeight
TP_ARCHITECTURES = (
    "llama",
    "qwen2",
    "qwen3",
)  # the Llama family's definition (mistral, granite load as llama)


def check_tensor_parallel(cfg: ModelArchConfig, size: int, expert_parallel: bool = False) -> None:
    """Raise ValueError, naming the flag, when `cfg` cannot be split over `size` ranks (its
    experts split whole with `expert_parallel`, else each sharded)."""
    flag = f"--tensor-parallel-size {size}"
    if cfg.architecture in MOE_ARCHITECTURES:
        from pagoda.engine.distributed.moe_checks import check_moe_split

        check_moe_split(cfg, size, expert_parallel, flag)
    elif cfg.architecture not in TP_ARCHITECTURES:
        raise ValueError(
            f"{flag} splits the {', '.join(TP_ARCHITECTURES)} architectures; this model is "
            f"{cfg.architecture}: use --tensor-parallel-size 1"
        )
    divides = {"attention heads": cfg.num_heads, "intermediate size": cfg.intermediate_size}
    for what, n in divides.items():
        if n % size:
            raise ValueError(f"{flag} must divide the model's {n} {what}; pick a divisor of {n}")
    kv = cfg.num_kv_heads
    if kv % size and size % kv:
        raise ValueError(
            f"{flag} and the model's {kv} KV heads: one must divide the other (heads are split, "
            "or each shared by several ranks)"
        )


def _split(value: Weight, dim: int, start: int, n: int) -> Weight:
    if isinstance(value, torch.Tensor):
        return value.narrow(dim, start, n)
    return value.rows(start, n) if dim == 0 else value.columns(start, n)


class LlamaShards:
    """This rank's slice of each Llama-family checkpoint tensor (HF names, `model.` stripped)."""

    def __init__(self, cfg: ModelArchConfig, tp: TensorParallel) -> None:
        hd = cfg.head_dim
        q0, nq = tp.heads(cfg.num_heads)
        kv0, nkv = tp.kv_heads(cfg.num_kv_heads)
        i0, ni = tp.split(cfg.intermediate_size)
        v0, nv = tp.vocab(cfg.vocab_size)
        # part of a name -> (dim, first index, length)
        self.plan = {
            "q_proj": (0, q0 * hd, nq * hd),
            "k_proj": (0, kv0 * hd, nkv * hd),
            "v_proj": (0, kv0 * hd, nkv * hd),
            "gate_proj": (0, i0, ni),
            "up_proj": (0, i0, ni),
            "o_proj": (1, q0 * hd, nq * hd),
            "down_proj": (1, i0, ni),
            "embed_tokens": (0, v0, nv),
            "lm_head": (0, v0, nv),
        }

    def __call__(self, name: str, value: Weight) -> Weight:
        for part, (dim, start, n) in self.plan.items():
            if f"{part}." in name:
                if dim == 1 and name.endswith(".bias"):  # a row-parallel bias: added once, on the sum
                    raise ValueError(f"{name}: a row-parallel projection with a bias is not split yet")
                return _split(value, dim, start, n)
        return value

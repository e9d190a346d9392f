"""Sequential calibration: layer by layer, each decoder layer is calibrated on the outputs of the
layers before it *as quantized* (GPTQ's reference and LLM Compressor's sequential pipeline), so
a layer's method corrects the error the earlier layers left, and only one layer's statistics are
held at a time (a one-pass Hessian of every layer would be 64 GB in float64 for an 8B model).

The sequences enter through `forward_tokens` (embeddings and the attention metadata of one
prefill): a pre-hook on layer 0 keeps each sequence's arguments there and stops the pass. From
then on each layer runs alone on the kept hidden states: once in float with hooks on its linears
(`collect`), once more with its quantized weights loaded (`advance`) to give the next layer's
inputs. One KV cache per sequence serves every layer: a prefill writes all its positions before
attention reads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from pagoda.compress.algorithms import HessianAccumulator
from pagoda.compress.calibration import FUSED_PARTS, InputStats, Needs, recorder
from pagoda.engine.models.llama import LlamaForCausalLM
from pagoda.engine.runner.forward import forward_tokens


class _Captured(Exception):
    """Raised by the layer-0 pre-hook: the rest of the forward pass is not needed."""


@dataclass
class _Sequence:
    h: torch.Tensor  # [tokens, hidden]: the next layer's input
    residual: torch.Tensor | None  # the residual stream before h is added (None before layer 0)
    rest: tuple[Any, ...]  # (positions, kv_cache, meta, backend): the layer's other arguments


class LayerRunner:
    def __init__(
        self, model: LlamaForCausalLM, samples: list[list[int]], needs: Needs, progress: bool
    ) -> None:
        self.model = model
        self.needs = needs
        self.sequences: list[_Sequence] = []

        def capture(module: nn.Module, args: tuple[Any, ...]) -> None:
            h, residual, *rest = args
            self.sequences.append(_Sequence(h, residual, tuple(rest)))
            raise _Captured

        handle = model.layers[0].register_forward_pre_hook(capture)
        try:
            for ids in tqdm(samples, desc="embedding", unit="sample", disable=not progress):
                try:
                    forward_tokens(model, ids)
                except _Captured:
                    pass
        finally:
            handle.remove()

    @torch.no_grad()
    def collect(self, i: int) -> dict[str, InputStats]:
        """Layer i's input statistics per engine linear ("layers.{i}.self_attn.qkv_proj"), from
        the float layer on the current hidden states."""
        layer = self.model.layers[i]
        stats: dict[str, InputStats] = {}
        handles = []
        for suffix in FUSED_PARTS:
            linear = layer.get_submodule(suffix)
            assert isinstance(linear, nn.Linear), suffix
            record = stats[f"layers.{i}.{suffix}"] = InputStats(linear.in_features)
            if self.needs.hessian:
                record.hessian = HessianAccumulator(linear.in_features, dtype=torch.float64)
            handles.append(linear.register_forward_hook(recorder(record, self.needs)))
        try:
            for seq in self.sequences:
                layer(seq.h, seq.residual, *seq.rest)
        finally:
            for handle in handles:
                handle.remove()
        return stats

    @torch.no_grad()
    def advance(self, i: int, tensors: dict[str, torch.Tensor]) -> None:
        """Load layer i's new tensors (HF names under `model.layers.{i}.`, float32: smoothed norms,
        dequantized or pruned linears) and run it: its outputs become layer i+1's inputs."""
        load_layer(self.model, i, tensors)
        layer = self.model.layers[i]
        for seq in self.sequences:
            seq.h, seq.residual = layer(seq.h, seq.residual, *seq.rest)


def load_layer(model: LlamaForCausalLM, i: int, tensors: dict[str, torch.Tensor]) -> None:
    """Copy HF-named tensors of layer i into the engine's (fused) parameters of that layer."""
    cfg = model.cfg
    q, kv, inter = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    fused = {
        "q_proj": ("qkv_proj", 0, q),
        "k_proj": ("qkv_proj", q, kv),
        "v_proj": ("qkv_proj", q + kv, kv),
        "gate_proj": ("gate_up_proj", 0, inter),
        "up_proj": ("gate_up_proj", inter, inter),
    }
    params = dict(model.layers[i].named_parameters())
    prefix = f"model.layers.{i}."
    for name, tensor in tensors.items():
        assert name.startswith(prefix), (name, i)
        module, _, kind = name[len(prefix) :].rpartition(".")  # "self_attn.q_proj", "weight"
        parent, _, part = module.rpartition(".")
        if part in fused:
            target, start, size = fused[part]
            dest = params[f"{parent}.{target}.{kind}"].data.narrow(0, start, size)
        else:
            dest = params[f"{module}.{kind}"].data
        assert dest.shape == tensor.shape, (name, tuple(dest.shape), tuple(tensor.shape))
        dest.copy_(tensor)

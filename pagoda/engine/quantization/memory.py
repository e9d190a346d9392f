"""How many bytes a loaded model's weights hold: what `resident weight memory` in the load log
line and `pagoda bench` mean (the KV cache is reported apart)."""

from __future__ import annotations

import torch
from torch import nn


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every tensor the model's modules hold (parameters, buffers and plain tensor
    attributes such as packed codes), each storage counted once; opaque packed matrices (oneDNN
    bf16, fbgemm int8) count as their elements."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        tensors += [v for v in vars(module).values() if isinstance(v, torch.Tensor)]
        for t in tensors:
            if t.is_meta:
                continue
            if t.layout != torch.strided or t.is_mkldnn:  # opaque (oneDNN-packed): no storage to share
                total += t.numel() * t.element_size()
                continue
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
        if hasattr(module, "_packed") and not isinstance(module._packed, torch.Tensor):
            out_f, in_f = int(getattr(module, "out_features", 0)), int(getattr(module, "in_features", 0))
            total += out_f * in_f + 8 * out_f
    return total

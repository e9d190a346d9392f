"""Weight quantization applied after loading.

`int8`: dynamic int8 linears on CPU (fbgemm/x86): weights int8 per output channel, activations
quantized per call, int32 accumulation. The same numerics llama.cpp uses for GGUF models on CPU
(Q8 activations against quantized weights); measured 2x bf16 and 4x fp32 F.linear at 64 tokens
on an AVX512-VNNI EPYC. Relative error per matmul is about 1%.

It is opt-in, not what `auto` picks: activations get one scale per call, so a request's numerics
depend on the other requests in its batch (greedy output is not batch-invariant), and on the
135M demo model the text visibly degrades (repetition) where bfloat16 stays close to float32.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.config import cpu_flags

METHODS = ("auto", "none", "int8")


def int8_supported(device: torch.device) -> bool:
    engines = torch.backends.quantized.supported_engines
    return device.type == "cpu" and ("x86" in engines or "fbgemm" in engines)


def resolve_quantization(method: str, device: torch.device) -> str:
    """`auto` is `none` for now (see the module docstring for why not int8)."""
    if method not in METHODS:
        raise ValueError(f"quantization must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "int8" and not int8_supported(device):
        raise ValueError(f"--quantization int8 runs on CPU only (device is {device.type}); use none")
    return "none" if method == "auto" else method


class Int8DynamicLinear(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()  # [out, in]
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        scales = (w.abs().amax(dim=1).clamp(min=1e-8) / 127.0).double()
        zeros = torch.zeros(w.shape[0], dtype=torch.int64)
        qweight = torch.quantize_per_channel(w, scales, zeros, 0, torch.qint8)
        bias = linear.bias.detach().float() if linear.bias is not None else None
        self._packed = torch.ops.quantized.linear_prepack(qweight, bias)
        # Without VNNI, fbgemm's u8*s8 pair-sums can saturate: use 7-bit activations there.
        flags = cpu_flags()
        self._reduce_range = not ("avx512_vnni" in flags or "avx_vnni" in flags or "amx_int8" in flags)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.quantized.linear_dynamic(
            x.reshape(-1, self.in_features).float(), self._packed, self._reduce_range
        )
        return y.view(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 dynamic"


def quantize_linears(model: nn.Module) -> int:
    """Replace every nn.Linear in the model by its int8 dynamic twin; returns how many."""
    count = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, Int8DynamicLinear(child))
                count += 1
    return count

"""bf16 linears with oneDNN-packed weights on the CPU.

`F.linear` hands oneDNN a plain [out, in] matrix, which oneDNN reorders into its blocked layout
on every call; packing once at load (`mkldnn._reorder_linear_weight`, what inductor's freezing
pass and IPEX do) skips that. On a 2-core AVX512-BF16 EPYC, the demo model's 120 decoder linears
(212 MB, cold): 29.0 -> 16.6 ms at 16 rows, 18.3 -> 14.6 ms at 1 row, equal at 256 (prefill),
with identical results. fp32 gains nothing from MKL's packed path, so only bf16 is packed.

A packed weight is an opaque mkldnn tensor that dynamo cannot carry into a graph, so under
`torch.compile` each linear is the custom op `pagoda::onednn_linear`, which finds its weight by
a handle (an int the graph holds as a constant) in a registry of live linears.
"""

from __future__ import annotations

import itertools
import weakref

import torch
from torch import nn

from pagoda.engine.config import cpu_has_fast_bf16
from pagoda.engine.models.layers import replace_linears

_LIVE: weakref.WeakValueDictionary[int, OneDnnLinear] = weakref.WeakValueDictionary()
_HANDLES = itertools.count()


def start_handles_at(first: int) -> None:
    """The next linear packed gets handle `first` (a process that rebuilds another's model and
    compiles its graphs numbers the linears as that process did)."""
    global _HANDLES
    _HANDLES = itertools.count(first)


def onednn_bf16_supported() -> bool:
    """Whether OneDnnLinear can run here: oneDNN has a bf16 matmul on this CPU."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def onednn_bf16_available() -> bool:
    """Whether the engine packs its bf16 linears: oneDNN's bf16 matmul on native bf16 hardware."""
    return onednn_bf16_supported() and cpu_has_fast_bf16()


class OneDnnLinear(nn.Module):
    """An nn.Linear's bf16 weight packed once for oneDNN; the same results as `F.linear`."""

    def __init__(self, linear: nn.Linear, batch_hint: int = 16) -> None:
        super().__init__()
        weight = linear.weight.detach()
        assert weight.dtype == torch.bfloat16 and weight.device.type == "cpu", (weight.dtype, weight.device)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # the packing is chosen for `batch_hint` rows (decode); measured the same at 1-256 rows
        self._packed = torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), False)
        self.handle = next(_HANDLES)
        _LIVE[self.handle] = self

    def run(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if not x.is_contiguous():
            x = x.contiguous()
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, bias, "none", [], "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return torch.ops.pagoda.onednn_linear(x, self.handle, self.bias)  # type: ignore[no-any-return]
        return self.run(x, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bf16 onednn-packed"


@torch.library.custom_op("pagoda::onednn_linear", mutates_args=())
def _onednn_linear(x: torch.Tensor, handle: int, bias: torch.Tensor | None) -> torch.Tensor:
    return _LIVE[handle].run(x, bias)


@_onednn_linear.register_fake
def _(x: torch.Tensor, handle: int, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], _LIVE[handle].out_features))


def pack_linears(model: nn.Module) -> int:
    """Replace the model's bf16 CPU nn.Linear layers by oneDNN-packed twins; returns how many.
    A tied LM head gets a packed copy (the embedding keeps the plain matrix)."""

    def twin(_: str, linear: nn.Linear) -> nn.Module | None:
        bf16_cpu = linear.weight.dtype == torch.bfloat16 and linear.weight.device.type == "cpu"
        return OneDnnLinear(linear) if bf16_cpu else None

    return replace_linears(model, twin)

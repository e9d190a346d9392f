"""Weight quantization applied after loading.

`int8`: dynamic int8 linears on CPU (fbgemm/x86): weights int8 per output channel, activations
quantized per row, int32 accumulation. The same numerics llama.cpp uses for GGUF models on CPU
(Q8 activations against quantized weights); measured 2x bf16 and 4x fp32 F.linear at 64 tokens
on an AVX512-VNNI EPYC. Relative error per matmul is about 1%.

It is opt-in, not what `auto` picks: on the 135M demo model the text visibly degrades
(repetition) where bfloat16 stays close to float32 (seen when activations had one scale per
call; they now have one per row, and a request's numerics no longer depend on its batch).
"""

from __future__ import annotations

import torch
from torch import nn

from pagoda.engine.config import cpu_flags
from pagoda.engine.models.layers import replace_linears
from pagoda.engine.quantization.linear import Int4Linear
from pagoda.engine.quantization.weights import QuantizedWeight

METHODS = ("auto", "none", "int8", "int4")
# a checkpoint's own quantization, served as it is (what `auto` picks for such a checkpoint)
CHECKPOINT_FORMATS = ("gguf", "compressed-tensors", "gptq", "awq")
INT4_GROUP = 32  # GGUF Q4_0/Q4_1 block size


def int8_supported(device: torch.device) -> bool:
    engines = torch.backends.quantized.supported_engines
    return device.type == "cpu" and ("x86" in engines or "fbgemm" in engines)


def resolve_quantization(method: str, device: torch.device, checkpoint: str | None = None) -> str:
    """What `--quantization` means for a checkpoint quantized as `checkpoint` (None: dense).
    `auto`: the checkpoint's own quantization, served as it is (a GGUF stays packed), else `none`
    (see the module docstring for why not int8). A format name must be the checkpoint's own;
    `none` dequantizes; `int8`/`int4` quantize the (dequantized) weights at load."""
    choices = (*METHODS, *CHECKPOINT_FORMATS)
    if method not in choices:
        raise ValueError(f"quantization must be one of {', '.join(choices)}, got {method!r}")
    if method in CHECKPOINT_FORMATS and method != checkpoint:
        raise ValueError(
            f"--quantization {method} does not match the model, which is "
            f"{checkpoint + '-quantized' if checkpoint else 'not quantized'}; use auto"
        )
    if method in ("int8", "int4") and device.type == "cuda":
        from pagoda.kernels.runtime import triton_installed

        if not triton_installed():
            raise ValueError(f"--quantization {method} on a GPU needs triton: pip install 'pagoda[triton]'")
    elif method in ("int8", "int4") and not int8_supported(device):
        raise ValueError(f"--quantization {method} is not available on {device.type}; use none")
    if method == "auto":
        return checkpoint or "none"
    return method


def _per_channel_qint8(weight: torch.Tensor) -> torch.Tensor:
    """weight [out, in] as qint8, symmetric, one scale per output channel."""
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1).clamp(min=1e-8) / 127.0).double()
    zeros = torch.zeros(w.shape[0], dtype=torch.int64)
    return torch.quantize_per_channel(w, scales, zeros, 0, torch.qint8)


class Int8DynamicLinear(nn.Module):
    """int8 weights per output channel against int8 activations (fbgemm, int32 accumulation).

    fbgemm quantizes a call's activations with one scale and zero point from the whole tensor's
    range, which would make a row's result depend on the other rows of its batch. So each row is
    first divided by its largest magnitude, and a constant row [1, -1, 0, ...] is appended: every
    call then has the range [-1, 1] and the same quantization, each row its own effective scale
    (as llama.cpp quantizes activations per block), and the outputs are multiplied back.

    One scale per row is coarse where a row has outliers, as the final hidden states feeding an
    LM head do: on the demo's head, 8-bit (7-bit without VNNI) activations were 6.6% off in
    relative norm and changed 1 greedy token in 12. A weight-only layer (`digits=2`: a tied head of
    a GGUF or the int4 model's head) therefore sends its activations as two digits: the row on the
    8-bit grid, then what that grid missed, rescaled to [-1, 1], in a second call (as the VNNI
    kernels send 16-bit activations as two int8 digits): twice the head's time, ~100x less error."""

    def __init__(self, linear: nn.Linear, digits: int = 1) -> None:
        super().__init__()
        self._pack(_per_channel_qint8(linear.weight), linear.bias, digits)

    @classmethod
    def from_weight(
        cls, weight: torch.Tensor, bias: torch.Tensor | None, digits: int = 1
    ) -> Int8DynamicLinear:
        """From a dense weight [out, in] with no nn.Linear around it (a tied head built from a
        quantized embedding: no 28M-parameter module to allocate and initialize first)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._pack(_per_channel_qint8(weight), bias, digits)
        return self

    @classmethod
    def from_codes(
        cls, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
    ) -> Int8DynamicLinear:
        """From given int8 codes [out, in] and per-channel scales [out] (a W8A8 checkpoint's), as
        they are: w = codes * scale."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        zeros = torch.zeros(codes.shape[0], dtype=torch.int64)
        self._pack(
            torch._make_per_channel_quantized_tensor(codes.to(torch.int8), scales.double(), zeros, 0), bias
        )
        return self

    float_logits = True  # it sums in float32: as an LM head, its logits stay float32 (llama.py)

    def _pack(self, qweight: torch.Tensor, bias: torch.Tensor | None, digits: int = 1) -> None:
        assert digits in (1, 2), digits
        self.digits = digits
        self.out_features, self.in_features = qweight.shape
        self._packed = torch.ops.quantized.linear_prepack(qweight, None)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), False)
        self._anchor = torch.zeros(1, self.in_features)
        self._anchor[0, :2] = torch.tensor([1.0, -1.0])
        # Without VNNI, fbgemm's u8*s8 pair-sums can saturate: use 7-bit activations there.
        flags = cpu_flags()
        self._reduce_range = not ("avx512_vnni" in flags or "avx_vnni" in flags or "amx_int8" in flags)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).float()
        peak = torch.linalg.vector_norm(rows, float("inf"), -1, keepdim=True).clamp_(min=1e-30)
        unit = rows / peak
        y = self._unit_rows(unit)
        if self.digits == 2:  # the part of each row the 8-bit grid of [-1, 1] missed, exactly once more
            step = 2.0 / (127 if self._reduce_range else 255)
            y = y + self._unit_rows((unit - torch.round(unit / step) * step) / step) * step
        y = y * peak
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def _unit_rows(self, unit: torch.Tensor) -> torch.Tensor:
        """W @ rows for rows within [-1, 1], the anchor row giving every call that range."""
        return torch.ops.quantized.linear_dynamic(  # type: ignore[no-any-return]
            torch.cat([unit, self._anchor]), self._packed, self._reduce_range
        )[:-1]

    def dequantized_weight(self) -> torch.Tensor:  # [out, in] float32
        """The weights the int8 GEMM multiplies by: each int8 code times its channel's scale (the
        per-row activation quantization is not part of it)."""
        qweight, _ = torch.ops.quantized.linear_unpack(self._packed)
        return qweight.dequantize()  # type: ignore[no-any-return]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 dynamic"


class Int4WeightOnlyLinear(Int4Linear):
    """Load-time int4 (`--quantization int4`): a dense linear rounded to 4 bits in groups of 32
    inputs with a scale and a minimum each (asymmetric, the layout of GGUF's Q4_1), then run as
    any int4 weight (pagoda/engine/quantization/linear.py: bf16 activations,
    `_weight_int4pack_mm_for_cpu`).

    A decode step at small batch reads every weight once, so its time is the weight bytes over
    memory bandwidth: int4 reads a quarter of bf16's. Measured on 30 cold 576x3072 matrices: 0.056
    ms per matmul at 1 token against 0.233 ms in bf16 (4.2x), 0.37 vs 0.44 ms at 16 tokens, but
    1.36 vs 0.88 ms at 64 tokens (the per-group dequantization becomes the cost). Batch-invariant:
    the weights do not depend on the batch."""

    def __init__(self, linear: nn.Linear, group_size: int = INT4_GROUP) -> None:
        w = linear.weight.detach().float()  # [out, in]
        out_f, in_f = w.shape
        if in_f % group_size:
            raise ValueError(f"int4 needs in_features divisible by {group_size}, got {in_f}")
        groups = w.view(out_f, in_f // group_size, group_size)
        lo, hi = groups.amin(-1), groups.amax(-1)
        scale = ((hi - lo) / 15).clamp(min=1e-8)
        q = ((groups - lo[..., None]) / scale[..., None]).round().clamp(0, 15)
        qw = QuantizedWeight(q.view(out_f, in_f).to(torch.int16), scale, lo, bits=4)
        bias = None if linear.bias is None else linear.bias.detach().bfloat16()
        super().__init__(qw, bias, linear.weight.device, torch.bfloat16)


def quantize_linears(model: nn.Module, method: str = "int8") -> int:
    """Replace the model's nn.Linear layers by quantized twins; returns how many. Under int4 the
    LM head (`lm_head`) gets int8 weights instead (GGUF keeps token embeddings, tied to the head,
    at 8 bits, and 4-bit logits visibly hurt the demo model's answers), with int8 activations:
    at 1 row fbgemm's int8 GEMM takes the demo's head in 0.75 ms, where bf16 activations against
    int8 weights (`_weight_int8pack_mm`) took 2.3 ms. On a GPU every linear becomes a Triton
    weight-only GEMM (pagoda/kernels/quant_gemm.py: groups of 128, symmetric) of that many bits.
    A mixture-of-experts model's stacked experts become Int8Experts under int8 (weight-only, per
    expert and channel; moe_experts.py); int4 refuses them, before any linear is replaced."""

    def twin(name: str, linear: nn.Linear) -> nn.Module:
        if linear.weight.device.type == "cuda":
            from pagoda.kernels.quant_gemm import QuantLinear

            bits = 8 if method == "int8" or name == "lm_head" else 4
            return QuantLinear(linear, bits, 128 if linear.in_features % 128 == 0 else 32)
        if method == "int8":
            return Int8DynamicLinear(linear)
        if name == "lm_head":  # int4 is weight-only: the head's activations go at 16 bits
            return Int8DynamicLinear(linear, digits=2)
        return Int4WeightOnlyLinear(linear)

    from pagoda.engine.models.moe_experts import quantize_experts  # MoE experts: int8, or refused

    return quantize_experts(model, method) + replace_linears(model, twin)

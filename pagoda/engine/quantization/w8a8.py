"""W8A8 on the CPU: int8 weights (symmetric, per channel) against int8 activations quantized per
row at run time, int32 accumulation (VNNI where the CPU has it).

Two kernels: oneDNN's `onednn::qlinear_pointwise` (what inductor's x86 int8 path calls) and
fbgemm's `quantized::linear_dynamic`. Both take one activation scale per call, so each row is
divided by its own peak first and multiplied back after (a row's result never depends on its
batch), and the call gets the fixed scale 1/127 with zero point 128 (1/63 and 64 without VNNI,
where u8 * s8 pair sums would saturate). fbgemm is the default: on a 2-core AVX512-VNNI EPYC
(hot weights, 576 -> 3072) it took 0.080 / 0.188 / 0.480 ms at 1 / 16 / 64 rows against oneDNN's
0.097 / 0.196 / 0.454, and both trail bf16 oneDNN (0.049 / 0.152 / 0.533) on shapes this small:
quantizing each call's activations (about six elementwise ops) costs as much as the GEMM.
"""

from __future__ import annotations

import torch

from pagoda.engine.config import cpu_flags
from pagoda.engine.quantization.linear import QuantizedLinear
from pagoda.engine.quantization.weights import QuantizedWeight


def onednn_int8_available() -> bool:
    return bool(torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise"))


class W8A8Linear(QuantizedLinear):
    kind = "w8a8 int8"

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None, kernel: str | None = None) -> None:
        super().__init__(qw, bias)
        if qw.group_size != qw.in_features or qw.offset is not None:
            raise ValueError("W8A8 takes symmetric per-channel int8 weights")
        if kernel is None:
            from pagoda.engine.models.quantization import int8_supported

            kernel = (
                "fbgemm" if int8_supported(torch.device("cpu")) or not onednn_int8_available() else "onednn"
            )
        self.kernel = kernel
        codes, scales = qw.codes.to(torch.int8), qw.scale[:, 0].float()
        if self.kernel == "fbgemm":
            from pagoda.engine.models.quantization import Int8DynamicLinear

            self.impl = Int8DynamicLinear.from_codes(codes, scales.double(), self.bias)
            self.kind = "w8a8 int8 (fbgemm)"
            return
        flags = cpu_flags()
        vnni = "avx512_vnni" in flags or "avx_vnni" in flags or "amx_int8" in flags
        self.levels, self.zero_point = (127.0, 128) if vnni else (63.0, 64)
        self.codes = codes.contiguous()  # kept for dequantized_weight (the packed copy is opaque)
        self.packed = torch.ops.onednn.qlinear_prepack(self.codes, None)
        self.scales = scales.contiguous()
        self.zeros = torch.zeros(qw.out_features, dtype=torch.int64)
        self.kind = "w8a8 int8 (oneDNN)"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "fbgemm":
            return self.impl(x)  # type: ignore[no-any-return]
        rows = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        peak = torch.linalg.vector_norm(rows, float("inf"), -1, keepdim=True).float().clamp_(min=1e-30)
        q = (rows.float() * (self.levels / peak)).round_().add_(self.zero_point).to(torch.uint8)
        y = torch.ops.onednn.qlinear_pointwise(
            q, 1.0 / self.levels, self.zero_point, self.packed, self.scales, self.zeros,
            None, 1.0, 0, torch.float32, "none", [], "",
        )  # fmt: skip
        return self._finish(y * peak, x)

    def dequantized_weight(self) -> torch.Tensor:
        if self.kernel == "fbgemm":
            return self.impl.dequantized_weight()  # type: ignore[no-any-return]
        return self.codes.float() * self.scales[:, None]

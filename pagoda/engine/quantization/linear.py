"""The quantized linear layers: each takes a QuantizedWeight once, packs it into its kernel's
layout, and keeps nothing else (so resident weight memory is the packed codes plus scales).

On CPUs with AVX512-VNNI or AVX2, `make_linear` gives every integer weight (and the tied LM head of
a quantized embedding) to VnniLinear (vnni.py: pagoda's kernel), fp8 ones on AVX512-VNNI to its
per-tile kernel. The layers below are what other CPUs (and GPUs) run.

- Int4Linear: 4-bit codes in groups of 32..256; CPU `_weight_int4pack_mm_for_cpu`, GPU Triton
  `quant_matmul`.
- Int8Linear: 8-bit codes; CPU `_weight_int8pack_mm` (symmetric per channel) or two int4 passes
  over the codes' high and low nibbles (groups, offsets); GPU Triton `quant_matmul`.
- W8A8Linear: int8 per channel against int8 activations per token; fbgemm (CPU; a GPU runs the
  weights through Int8Linear).
- Fp8Linear: float8_e4m3fn weights (fp8 activations per token), dequantized per call: CPUs have
  no fp8 math.
- DequantLinear: anything no kernel takes (groups of 16: GGUF Q6_K), dequantized per call.

Weight-only layers are batch-invariant: a row's result does not depend on the other rows. Hot
576 -> 1536 weights on a 2-core Xeon (docs/perf.md): bf16 oneDNN 0.069 ms at 1 row, 0.073 at 16;
int4pack 0.031 / 0.193; pagoda's kernel 0.020 / 0.103 (16-bit activations), 0.017 / 0.062 (8).
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from pagoda.engine.quantization.weights import QuantizedWeight

if TYPE_CHECKING:
    from pagoda.kernels.quant_gemm import QuantizedWeight as TritonWeight

logger = logging.getLogger(__name__)

CPU_INT4_GROUPS = (256, 128, 64, 32)  # what _weight_int4pack_mm_for_cpu takes
FP8_MAX = 448.0
FP8_TILE_ROWS = 1024  # outputs dequantized at a time without pagoda's kernel


class QuantizedLinear(nn.Module):
    """Base: y = x @ W^T (+ bias) for a W held quantized; `dequantized_weight()` is the W the
    kernel multiplies by, in float32 (what tests compare against)."""

    kind = "quantized"

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = qw.in_features, qw.out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def dequantized_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def _finish(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.bias is not None:
            y = y + self.bias
        if x.dim() != 2:
            y = y.view(*x.shape[:-1], self.out_features)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.kind}"


def _rows(x: torch.Tensor, in_features: int) -> torch.Tensor:
    return x if x.dim() == 2 else x.reshape(-1, in_features)


def _bf16(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.bfloat16 else x.to(torch.bfloat16)


def _cpu_group(qw: QuantizedWeight) -> int | None:
    """The largest group the CPU int4 kernel takes that divides qw's groups (regrouping repeats
    scales: exact), or None."""
    return next((g for g in CPU_INT4_GROUPS if qw.group_size % g == 0), None)


def _unsigned(qw: QuantizedWeight, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes as 0 .. 2**bits - 1, offset in weight units) for qw: signed codes shifted up by
    2**(bits-1), their offset moved down by as many steps."""
    offset = qw.offset.float() if qw.offset is not None else torch.zeros_like(qw.scale, dtype=torch.float32)
    codes = qw.codes.to(torch.int32)
    if int(codes.min()) < 0:
        half = 1 << (bits - 1)
        codes, offset = codes + half, offset - half * qw.scale.float()
    if int(codes.max()) >= 1 << bits or int(codes.min()) < 0:
        raise ValueError(f"codes do not fit {bits} bits")
    return codes, offset


class _Int4Pack(nn.Module):
    """One CPU int4 matrix: codes 0..15 packed for `_weight_int4pack_mm_for_cpu`, which computes
    (q - 8) * scale + zero per group, so zero = offset + 8 * scale. Always bf16 activations: the
    CPU int4 and int8 weight-only kernels take float32 ones 20-70x slower (576 -> 3072 at 16 rows:
    0.73 ms in bf16, 50 ms in float32), which would make a float32 model's quantized path its
    slowest."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group: int) -> None:
        super().__init__()
        self.group = group
        self.packed = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 2)
        zero = offset + 8 * scale
        self.scales_zeros = torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(torch.bfloat16)

    def forward(self, x2: torch.Tensor) -> torch.Tensor:
        return torch._weight_int4pack_mm_for_cpu(_bf16(x2), self.packed, self.group, self.scales_zeros)

    def dequantized(self, in_features: int) -> torch.Tensor:  # [out, in] float32
        """Codes read back through the kernel itself (its packed layout is per ISA and not
        documented) with unit scales and zero offsets, then this module's scales applied."""
        unit = torch.zeros_like(self.scales_zeros)
        unit[..., 0] = 1
        codes = (
            torch._weight_int4pack_mm_for_cpu(
                torch.eye(in_features, dtype=unit.dtype), self.packed, self.group, unit
            )
            .float()
            .t()
        )  # [out, in]: q - 8
        scale, zero = self.scales_zeros.float().unbind(-1)  # [groups, out]
        out_f = codes.shape[0]
        w = codes.view(out_f, -1, self.group) * scale.t()[..., None] + zero.t()[..., None]
        return w.view(out_f, in_features)


class _WeightOnlyLinear(QuantizedLinear):
    """Integer weights against float activations: the CPU kernels of a subclass, or on a GPU the
    Triton GEMM (`triton=True` forces it, as the interpreter tests do)."""

    bits = 4

    def __init__(
        self,
        qw: QuantizedWeight,
        bias: torch.Tensor | None,
        device: torch.device,
        dtype: torch.dtype,
        triton: bool | None = None,  # the Triton kernel (default: on a GPU)
    ) -> None:
        super().__init__(qw, bias)
        self.on_cpu = device.type == "cpu" if triton is None else not triton
        if self.on_cpu:
            self._pack_cpu(qw)
        else:
            codes, offset = _unsigned(qw, self.bits)
            scale = qw.scale.float()
            self.gpu_weight = _triton_weight(codes, scale, offset, self.bits, qw.group_size, dtype, device)
            self.kind = f"int{self.bits} g{qw.group_size} (Triton)"

    def _pack_cpu(self, qw: QuantizedWeight) -> None:
        raise NotImplementedError

    def _cpu_forward(self, x2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _cpu_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.on_cpu:
            return self._finish(self._cpu_forward(_rows(x, self.in_features)), x)
        from pagoda.kernels.quant_gemm import quant_matmul

        return self._finish(quant_matmul(x, self.gpu_weight), x)

    def dequantized_weight(self) -> torch.Tensor:
        if self.on_cpu:
            return self._cpu_weight()
        from pagoda.kernels.quant_gemm import dequantize_weight

        return dequantize_weight(self.gpu_weight).t().float()


class Int4Linear(_WeightOnlyLinear):
    kind = "int4"
    bits = 4

    def _pack_cpu(self, qw: QuantizedWeight) -> None:
        group = _cpu_group(qw)
        if group is None:
            raise ValueError(f"int4 groups of {qw.group_size} do not fit the CPU kernel ({CPU_INT4_GROUPS})")
        qw = qw.regroup(group)
        codes, offset = _unsigned(qw, 4)
        self.kind = f"int4 g{group}"
        self.mat = _Int4Pack(codes, qw.scale.float(), offset, group)

    def _cpu_forward(self, x2: torch.Tensor) -> torch.Tensor:
        return self.mat(x2)  # type: ignore[no-any-return]

    def _cpu_weight(self) -> torch.Tensor:
        return self.mat.dequantized(self.in_features)


class Int8Linear(_WeightOnlyLinear):
    """8-bit weight-only. Symmetric per-channel signed codes run `_weight_int8pack_mm`; any other
    8-bit form (groups, offsets: GGUF Q8_0, Q5_K/Q6_K codes) as two int4 passes over the high and
    low nibbles of the code: exact, at the cost of two kernel calls."""

    kind = "int8"
    bits = 8

    def _pack_cpu(self, qw: QuantizedWeight) -> None:
        lo, hi = int(qw.codes.min()), int(qw.codes.max())
        self.per_channel = qw.group_size == qw.in_features and qw.offset is None and -128 <= lo <= hi <= 127
        if self.per_channel:
            self.codes = qw.codes.to(torch.int8).contiguous()
            self.scales = qw.scale[:, 0].to(torch.bfloat16).contiguous()  # bf16: see _Int4Pack
            self.kind = "int8 per channel"
            return
        group = _cpu_group(qw)
        if group is None:
            raise ValueError(f"int8 groups of {qw.group_size} do not fit the CPU kernel")
        qw = qw.regroup(group)
        codes, scale = qw.codes.to(torch.int32), qw.scale.float()
        offset = qw.offset.float() if qw.offset is not None else torch.zeros_like(scale)
        # w = s * q + o = 16 s * h + s * l + o with h = q >> 4 (arithmetic: -8..7 for signed
        # codes, 0..15 unsigned) and l = q & 15; the kernel computes (u - 8) * scale + zero, so
        # signed high nibbles go in as h + 8 with zero 0, unsigned ones with zero 128 s: both
        # exact in bf16, and signed codes without offsets (Q8_0, W8A16) stay exact throughout
        high, low = codes >> 4, codes & 15
        signed = lo < 0
        high_zero = torch.zeros_like(scale) if signed else 128 * scale
        self.high = _Int4Pack(high + 8 if signed else high, 16 * scale, high_zero - 8 * 16 * scale, group)
        self.low = _Int4Pack(low, scale, offset, group)
        self.kind = f"int8 g{group} (two int4 passes)"

    def _cpu_forward(self, x2: torch.Tensor) -> torch.Tensor:
        if self.per_channel:
            return torch._weight_int8pack_mm(_bf16(x2), self.codes, self.scales)
        return self.high(x2) + self.low(x2)  # type: ignore[no-any-return]

    def _cpu_weight(self) -> torch.Tensor:
        if self.per_channel:
            return self.codes.float() * self.scales.float()[:, None]
        return self.high.dequantized(self.in_features) + self.low.dequantized(self.in_features)


class Fp8Linear(QuantizedLinear):
    """float8_e4m3fn weights with per-tensor or per-channel scales. CPUs have no fp8 math, so the
    weight is dequantized a tile at a time and never whole: on pagoda's CPU kernel
    (`pagoda_cpu::fp8_gemm`) 16 outputs at a time into a buffer the size of L1/L2, elsewhere
    FP8_TILE_ROWS outputs at a time. With `act="fp8"`, activations are rounded through fp8 per
    token first, as FP8_DYNAMIC checkpoints are run by servers with fp8 GEMMs."""

    kind = "fp8"

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__(qw, bias)
        if qw.group_size != qw.in_features:
            raise ValueError("fp8 weights take per-tensor or per-channel scales")
        self.act_fp8 = qw.act == "fp8"
        self.native = qw.codes.device.type == "cpu" and native_kernels()
        scale = qw.scale[:, 0].float()
        if self.native:
            from pagoda.engine.quantization.vnni import TILE, pad_rows, tile_rows

            rows = tile_rows(qw.out_features)
            codes = pad_rows(qw.codes.view(torch.uint8), rows)
            self.codes = codes.view(rows // TILE, TILE, -1).transpose(1, 2).contiguous()  # [tiles, in, 16]
            self.scales = pad_rows(scale, rows)
            self.kind = "fp8 (pagoda, dequantized per tile)"
        else:
            self.codes = qw.codes.contiguous()
            self.scales = scale.to(dtype)

    def _codes(self) -> torch.Tensor:  # [out, in] float8_e4m3fn
        if not self.native:
            return self.codes
        rows = self.codes.transpose(1, 2).reshape(-1, self.in_features)[: self.out_features]
        return rows.contiguous().view(torch.float8_e4m3fn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_fp8:
            peak = x.abs().amax(-1, keepdim=True).float().clamp_(min=1e-12) / FP8_MAX
            x = ((x.float() / peak).to(torch.float8_e4m3fn).float() * peak).to(x.dtype)
        rows = _rows(x, self.in_features)
        if self.native:
            if rows.dtype not in (torch.float32, torch.bfloat16):
                rows = rows.float()
            y = torch.ops.pagoda_cpu.fp8_gemm(rows.contiguous(), self.codes, self.scales)
            return self._finish(y[:, : self.out_features], x)
        tiles = []
        for start in range(0, self.out_features, FP8_TILE_ROWS):
            part = slice(start, start + FP8_TILE_ROWS)
            w = self.codes[part].to(x.dtype) * self.scales[part, None].to(x.dtype)
            tiles.append(F.linear(rows, w))
        return self._finish(torch.cat(tiles, -1), x)

    def dequantized_weight(self) -> torch.Tensor:
        return self._codes().float() * self.scales[: self.out_features, None].float()


class DequantLinear(QuantizedLinear):
    """Any QuantizedWeight no kernel takes (e.g. groups of 16): codes kept at 8 bits, dequantized
    per call. Memory as quantized, speed below dense."""

    kind = "dequantized per call"

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__(qw, bias)
        codes, offset = _unsigned(qw, 8) if not qw.is_float else (qw.codes, None)
        self.codes = codes.to(torch.uint8) if not qw.is_float else codes
        self.scale = qw.scale.to(dtype)
        self.offset = None if offset is None else offset.to(dtype)
        self.group = qw.group_size

    def dequantized_weight(self) -> torch.Tensor:
        w = self.codes.float().view(self.out_features, -1, self.group) * self.scale.float()[..., None]
        if self.offset is not None:
            w = w + self.offset.float()[..., None]
        return w.view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._finish(F.linear(x, self.dequantized_weight().to(x.dtype)), x)


def _triton_weight(
    codes: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    bits: int,
    group: int,
    dtype: torch.dtype,
    device: torch.device,
) -> TritonWeight:
    """The Triton kernel's QuantizedWeight: codes packed along K in int32 words, scales and zero
    points (code units: zero = -offset / scale) as [K / group, N]."""
    from pagoda.kernels.quant_gemm import QuantizedWeight as TritonWeight
    from pagoda.kernels.quant_gemm import pack_codes

    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    zero = torch.where(scale == 0, torch.zeros_like(scale), -offset / safe)
    half = dtype if dtype != torch.float32 else torch.float16
    return TritonWeight(
        pack_codes(codes.t().contiguous(), bits).to(device),
        scale.t().contiguous().to(device, half),
        zero.t().contiguous().to(device, half),
        bits,
        group,
    )


def native_kernels(op: str | None = None) -> bool:
    """Whether pagoda's own CPU kernels run here (native.py; off with PAGODA_NATIVE_KERNELS=0): all of
    them, or `op` alone (on AVX2 CPUs the GEMM and the decode attention run, not the others)."""
    if os.environ.get("PAGODA_NATIVE_KERNELS", "1") == "0":
        return False
    from pagoda.engine.quantization import native

    return native.available() if op is None else native.runs(op)


def native_linear(
    qw: QuantizedWeight, bias: torch.Tensor | None, device: torch.device
) -> QuantizedLinear | None:
    """qw on pagoda's own kernel (a VnniLinear, its activations' bits by vnni.activation_bits), or
    None where it cannot run: not on a CPU, the kernel unavailable, or groups it does not take."""
    if device.type != "cpu" or qw.is_float or not native_kernels("qgemm"):
        return None
    from pagoda.engine.quantization.vnni import VnniLinear, act_block

    if act_block(qw) is None:
        return None
    return VnniLinear(qw, bias)


def make_linear(
    qw: QuantizedWeight, bias: torch.Tensor | None, device: torch.device, dtype: torch.dtype
) -> QuantizedLinear:
    """The layer that runs qw fastest here; DequantLinear where no kernel takes its shape."""
    try:
        if qw.is_float:
            return Fp8Linear(qw, bias, dtype)
        native = native_linear(qw, bias, device)
        if native is not None:
            return native
        if qw.act == "int8" and device.type == "cpu":
            from pagoda.engine.quantization.w8a8 import W8A8Linear

            return W8A8Linear(qw, bias)
        if qw.bits <= 4:
            return Int4Linear(qw, bias, device, dtype)
        return Int8Linear(qw, bias, device, dtype)
    except ValueError as e:
        logger.debug("no kernel for %s: %s; dequantizing per call", tuple(qw.codes.shape), e)
        return DequantLinear(qw, bias, dtype)

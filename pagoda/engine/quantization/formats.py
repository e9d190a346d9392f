"""Quantized Hugging Face checkpoints -> `QuantizedWeight`: the reading side of GPTQ, AWQ and
compressed-tensors (the latter in compressed_tensors_format.py).

A format is chosen by config.json's `quantization_config.quant_method` through `REGISTRY`. The HF
loader asks it which stored tensors make up each quantized linear (`linear_parts`), hands it those
tensors, and yields what `read` returns under the linear's `<prefix>.weight` name; every other
tensor passes through unchanged. Nothing here imports the formats' own libraries: they are an
optional extra, and the packing rules are a few shifts and masks.

Integer codes leave here as stored (unsigned with an offset, or signed when the format is
symmetric) and offsets as -zero * scale in float32. With fp16/bf16 scales (every published GPTQ,
AWQ and llm-compressor checkpoint) both `codes * scale` and `zero * scale` are exact in float32
(8-bit code x 11-bit mantissa < 24 bits), so `dequantize()` is the exact value of the format's
`(q - z) * s`, and the format's own fp16/bf16 result is that value rounded once. (Zero points with
float32 scales, which no published checkpoint we know has, are within a rounding of it.)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch

from pagoda.engine.loader import ModelLoadError
from pagoda.engine.quantization.weights import QuantizedWeight

WeightTensor = torch.Tensor | QuantizedWeight  # what a quantized checkpoint's weights() yields


class CheckpointFormat(ABC):
    """One on-disk layout of quantized linears. Built from `quantization_config` (the constructor
    validates it and raises ModelLoadError naming what is supported), then used read-only:
    `linear_parts` once over all stored names, `read` once per quantized linear."""

    method: ClassVar[str]  # quantization_config.quant_method, also Checkpoint.quantization

    @abstractmethod
    def __init__(self, qconfig: Mapping[str, Any]) -> None: ...

    @abstractmethod
    def linear_parts(self, names: Iterable[str]) -> dict[str, dict[str, str]]:
        """{linear prefix: {part: stored name}} for every linear stored in this format's parts
        (the prefix is the stored module name, `<prefix>.weight` the name `read`'s result gets).
        Stored names not listed here are yielded unchanged."""

    @abstractmethod
    def read(self, prefix: str, parts: Mapping[str, torch.Tensor]) -> WeightTensor:
        """The linear's weight from its parts (keyed as in `linear_parts`): a QuantizedWeight, or
        a dense tensor where the format only compresses (2:4 sparsity without quantization)."""


REGISTRY: dict[str, type[CheckpointFormat]] = {}


def register(cls: type[CheckpointFormat]) -> type[CheckpointFormat]:
    REGISTRY[cls.method] = cls
    return cls


def checkpoint_format(config: Mapping[str, Any]) -> CheckpointFormat | None:
    """The format config.json's `quantization_config` names, or None for a plain checkpoint."""
    import pagoda.engine.quantization.compressed_tensors_format  # noqa: F401  (registers itself)

    qconfig = config.get("quantization_config")
    if not qconfig:
        return None
    method = str(qconfig.get("quant_method", "")).lower()
    if method not in REGISTRY:
        raise ModelLoadError(
            f"quantization_config.quant_method {method!r} is not supported; pagoda reads "
            f"{', '.join(sorted(REGISTRY))} checkpoints (or GGUF files)"
        )
    return REGISTRY[method](qconfig)


def unpack_int32(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Codes packed little-end first along the last dim: element k of int32 word j is
    `(word >> (bits * k)) & (2**bits - 1)`, 32 // bits per word -> int16 [..., count], unsigned."""
    if packed.dtype != torch.int32:
        raise ModelLoadError(f"packed codes are {packed.dtype}, expected torch.int32")
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [..., words, 32 // bits]
    codes = codes.flatten(-2)
    if codes.shape[-1] < count:
        raise ModelLoadError(f"{packed.shape[-1]} int32 words hold fewer than {count} {bits}-bit codes")
    return codes[..., :count].to(torch.int16)


def is_trivial_g_idx(g_idx: torch.Tensor, group_size: int) -> bool:
    """g_idx[i] == i // group_size: groups are runs of consecutive inputs (no act-order)."""
    return torch.equal(g_idx.long(), torch.arange(g_idx.numel()) // group_size)


def integer_weight(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int, signed_zero: int
) -> QuantizedWeight:
    """w = (codes - zero) * scale, all [out, in] / [out, groups]. A zero equal everywhere to
    `signed_zero` (2**(bits-1), a symmetric quantization's midpoint) is folded into the codes, which
    become signed and offset-free: the cheaper form for a kernel, and the same values."""
    scale = scale.float()
    if zero is not None and bool((zero == signed_zero).all()):
        return QuantizedWeight(codes=codes - signed_zero, scale=scale, offset=None, bits=bits)
    offset = None if zero is None or not zero.any() else -zero.float() * scale
    return QuantizedWeight(codes=codes, scale=scale, offset=offset, bits=bits)


def _prefixes_with(names: Iterable[str], anchor: str, parts: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """{prefix: {part: name}} for every stored `<prefix>.<anchor>`, with those of `parts` stored."""
    stored = set(names)
    groups: dict[str, dict[str, str]] = {}
    for name in stored:
        if name.endswith("." + anchor):
            prefix = name[: -len(anchor) - 1]
            groups[prefix] = {p: f"{prefix}.{p}" for p in parts if f"{prefix}.{p}" in stored}
    return groups


@register
class GptqFormat(CheckpointFormat):
    """AutoGPTQ / GPTQModel (quant_method "gptq"), 4 or 8 bits, pack_dtype int32:

        qweight int32 [in / (32/bits), out]   codes packed along the input dim, lowest bits first
        qzeros  int32 [groups, out / (32/bits)] zero points packed along the output dim
        scales  fp16  [groups, out]
        g_idx   int32 [in]                     the group of each input (i // group_size unless act-order)

    w[o, i] = (q[i, o] - z[g, o]) * scales[g, o], g = g_idx[i], where the classic format (checkpoint
    format "gptq", v1) stores z - 1 and "gptq_v2" stores z.
    """

    method = "gptq"
    _PARTS = ("qweight", "qzeros", "scales", "g_idx")

    def __init__(self, qconfig: Mapping[str, Any]) -> None:
        self.bits = int(qconfig.get("bits", 4))
        if self.bits not in (4, 8):
            raise ModelLoadError(
                f"GPTQ with bits={self.bits} is not supported; pagoda reads 4- and 8-bit GPTQ"
            )
        fmt = str(qconfig.get("checkpoint_format") or qconfig.get("format") or "gptq").lower()
        if fmt not in ("gptq", "gptq_v2") or qconfig.get("is_marlin_format"):
            raise ModelLoadError(
                f"GPTQ checkpoint format {fmt!r} is not supported; pagoda reads the gptq and gptq_v2 formats"
            )
        pack_dtype = str(qconfig.get("pack_dtype", "int32")).removeprefix("torch.")
        if pack_dtype != "int32":
            raise ModelLoadError(f"GPTQ pack_dtype {pack_dtype} is not supported; pagoda reads int32 packing")
        self.zero_plus_one = fmt == "gptq"
        self.desc_act = bool(qconfig.get("desc_act", False))

    def linear_parts(self, names: Iterable[str]) -> dict[str, dict[str, str]]:
        return _prefixes_with(names, "qweight", self._PARTS)

    def read(self, prefix: str, parts: Mapping[str, torch.Tensor]) -> WeightTensor:
        qweight, scales = parts["qweight"], parts["scales"]  # [in / pack, out], [groups, out]
        in_features = qweight.shape[0] * (32 // self.bits)
        out_features = scales.shape[1]
        group = in_features // scales.shape[0]  # the stored groups, whatever group_size says
        g_idx = parts.get("g_idx")
        if g_idx is not None and not is_trivial_g_idx(g_idx, group):
            raise ModelLoadError(
                f"{prefix}: GPTQ act-order (desc_act={self.desc_act}, a permuted g_idx) is not supported; "
                "pagoda reads GPTQ checkpoints quantized with desc_act=false (or static_groups=true)"
            )
        if "qzeros" not in parts:
            raise ModelLoadError(f"{prefix}: GPTQ linear without qzeros; the checkpoint is incomplete")
        codes = unpack_int32(qweight.t(), self.bits, in_features)  # [out, in]
        zero = unpack_int32(parts["qzeros"], self.bits, out_features).t().to(torch.int16)  # [out, groups]
        if self.zero_plus_one:
            zero = zero + 1
        return integer_weight(codes, scales.t(), zero, self.bits, 1 << (self.bits - 1))


@register
class AwqFormat(CheckpointFormat):
    """AutoAWQ GEMM (quant_method "awq", version "gemm"), 4 bits with zero points:

        qweight int32 [in, out / 8]      codes packed along the OUTPUT dim, interleaved: nibble k
        qzeros  int32 [groups, out / 8]  of word j holds output column 8 * j + [0, 2, 4, 6, 1, 3, 5, 7][k]
        scales  fp16  [groups, out]

    w[o, i] = (q[i, o] - z[i // group, o]) * scales[i // group, o].
    """

    method = "awq"
    _PARTS = ("qweight", "qzeros", "scales")
    _ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble k -> column within its 8; argsort gives the inverse

    def __init__(self, qconfig: Mapping[str, Any]) -> None:
        bits = int(qconfig.get("bits", qconfig.get("w_bit", 4)))
        version = str(qconfig.get("version") or qconfig.get("format") or "gemm").lower()
        if bits != 4 or version != "gemm":
            raise ModelLoadError(
                f"AWQ with bits={bits}, version={version!r} is not supported; pagoda reads 4-bit AWQ "
                "of the GEMM version"
            )
        if not qconfig.get("zero_point", True):
            raise ModelLoadError(
                "AWQ with zero_point=false is not supported; pagoda reads AWQ with zero points"
            )

    def linear_parts(self, names: Iterable[str]) -> dict[str, dict[str, str]]:
        return _prefixes_with(names, "qweight", self._PARTS)

    def read(self, prefix: str, parts: Mapping[str, torch.Tensor]) -> WeightTensor:
        if len(parts) != len(self._PARTS):
            raise ModelLoadError(f"{prefix}: AWQ linear lacks {set(self._PARTS) - set(parts)}")
        inverse = torch.argsort(torch.tensor(self._ORDER))  # column c of 8 sits in nibble inverse[c]
        codes = self._unpack(parts["qweight"], inverse).t()  # [out, in]
        zero = self._unpack(parts["qzeros"], inverse).t()  # [out, groups]
        return integer_weight(codes, parts["scales"].t(), zero, 4, 8)

    @staticmethod
    def _unpack(packed: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        rows, words = packed.shape
        nibbles = unpack_int32(packed, 4, words * 8).view(rows, words, 8)
        return nibbles[..., inverse].reshape(rows, words * 8)

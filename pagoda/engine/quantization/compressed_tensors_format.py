"""compressed-tensors checkpoints (llm-compressor's output, quant_method "compressed-tensors") ->
QuantizedWeight. The rules follow the compressed-tensors library's compressors (0.20) and, for the
2:4 bitmask the library no longer ships (removed after 0.14), its last Sparse24BitMaskCompressor.

Per quantized linear `<p>`, by the format of its config group (the group's own `format`, else the
config's):

    pack-quantized   <p>.weight_packed int32 [out, in*bits/32]  signed codes + 2**(bits-1), packed
                     along the input dim lowest bits first; <p>.weight_shape [2] = (out, in);
                     <p>.weight_zero_point int32 [out*bits/32, groups] packed the same way along the
                     OUTPUT dim (asymmetric group/channel only)
    int-quantized    <p>.weight int8 [out, in]  (W8A8: activations int8 per token at run time)
    float-quantized  <p>.weight float8_e4m3fn [out, in]  (FP8: activations fp8 per token)
    naive-quantized  <p>.weight int8 or float8_e4m3fn, codes as they are
    all              <p>.weight_scale [out, groups], [out, 1], [out] or [1] / [1, 1] (per tensor);
                     w = (codes - zero_point) * scale

`sparse-24-bitmask` (quantization_config.sparsity_config) stores a 2:4-sparse `<p>.weight` as
<p>.compressed [out, in/2] (the kept values, row-major), <p>.bitmask uint8 [out, ceil(in/8)] (bit
k of byte j = element 8j+k kept) and <p>.shape (out, in). It is decompressed to the dense weight at
load (the 2:4 pattern checked), then quantized layers read on as above with `sparse_24=True`;
sparsity without quantization yields the dense tensor. Only `.weight` tensors were ever bitmask-
compressed, so pack-quantized layers are never sparse-stored.

Which linears are quantized comes from config_groups' targets (exact names first, then "re:"
regexes, then the class "Linear", as the library ranks them) minus `ignore`; a linear stored
quantized that no group claims is an error, not a guess.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

from pagoda.engine.loader import ModelLoadError
from pagoda.engine.quantization.formats import (
    CheckpointFormat,
    WeightTensor,
    integer_weight,
    is_trivial_g_idx,
    register,
    unpack_int32,
)
from pagoda.engine.quantization.weights import ActQuant, QuantizedWeight

_FORMATS = ("pack-quantized", "int-quantized", "float-quantized", "naive-quantized")
_STRATEGIES = ("tensor", "channel", "group")
_PARTS = (
    "weight",
    "weight_packed",
    "weight_shape",
    "weight_scale",
    "weight_zero_point",
    "weight_g_idx",
    "compressed",
    "bitmask",
    "shape",
)
_SUPPORTED = (
    "pagoda reads compressed-tensors pack-quantized (int4/int8), int-quantized (W8A8 int8), "
    "float-quantized (FP8 e4m3) and naive-quantized weights with tensor, channel or group scales, "
    "activations quantized dynamically or not at all, and sparse-24-bitmask"
)


@dataclass(frozen=True)
class _Scheme:
    format: str
    bits: int
    is_float: bool
    group_size: int | None
    act: ActQuant
    targets: tuple[str, ...]


def _unsupported(what: str) -> ModelLoadError:
    return ModelLoadError(f"compressed-tensors {what} is not supported; {_SUPPORTED}")


def _act_quant(args: Mapping[str, Any] | None) -> ActQuant:
    """Dynamic input quantization -> "int8" / "fp8" (run per token; a dynamic per-tensor scheme
    is served per token too, which only refines its scales); static scales are not read."""
    if not args:
        return None
    kind, bits = args.get("type", "int"), int(args.get("num_bits", 8))
    if args.get("dynamic") is not True or args.get("strategy") not in ("token", "tensor"):
        raise _unsupported(
            f"input activation quantization {args.get('strategy')!r} with dynamic={args.get('dynamic')!r}"
        )
    if bits != 8 or kind not in ("int", "float") or not args.get("symmetric", True):
        raise _unsupported(
            f"{'symmetric' if args.get('symmetric', True) else 'asymmetric'} {bits}-bit {kind} activations"
        )
    return "int8" if kind == "int" else "fp8"


def _parse_scheme(name: str, group: Any, default_format: str) -> _Scheme:
    if not isinstance(group, Mapping):
        raise _unsupported(f"config group {name!r} given as {group!r} (a preset name, not a scheme)")
    fmt = str(group.get("format") or default_format)
    weights = group.get("weights")
    if fmt not in _FORMATS or not weights:
        raise _unsupported(
            f"format {fmt!r}" if weights else f"config group {name!r} without weight quantization"
        )
    if group.get("output_activations"):
        raise _unsupported(f"output activation quantization (config group {name!r})")
    kind, bits, strategy = (
        weights.get("type", "int"),
        int(weights.get("num_bits", 8)),
        weights.get("strategy"),
    )
    fits = (kind == "int" and bits in (4, 8) and fmt != "float-quantized") or (
        kind == "float" and bits == 8 and fmt in ("float-quantized", "naive-quantized")
    )
    if not fits or strategy not in _STRATEGIES or weights.get("dynamic"):
        raise _unsupported(f"{fmt} {bits}-bit {kind} weights with strategy {strategy!r}")
    return _Scheme(
        format=fmt,
        bits=bits,
        is_float=kind == "float",
        group_size=weights.get("group_size") if strategy == "group" else None,
        act=_act_quant(group.get("input_activations")),
        targets=tuple(group.get("targets") or ()),
    )


def _match_rank(name: str, target: str) -> int | None:
    """0 exact name, 1 "re:" regex (re.match, as the library does), 2 the class "Linear" (every
    stored linear but the embedding), None no match."""
    if target.startswith("re:"):
        return 1 if re.match(target[3:], name) else None
    if target == name:
        return 0
    return 2 if target == "Linear" and not name.endswith("embed_tokens") else None


def _matched(name: str, targets: Iterable[str]) -> int | None:
    ranks = [r for r in (_match_rank(name, t) for t in targets) if r is not None]
    return min(ranks, default=None)


def decompress_24(values: torch.Tensor, bitmask: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    """The dense [out, in] weight of a sparse-24-bitmask tensor (see the module docstring); raises
    ModelLoadError when the mask is not 2:4 (more than 2 kept in some 4 consecutive inputs)."""
    rows, cols = (int(v) for v in shape.flatten().tolist())
    bits = (bitmask.to(torch.int16).unsqueeze(-1) >> torch.arange(8, dtype=torch.int16)) & 1
    mask = bits.flatten(-2)[:, :cols].bool()  # [out, in], bit k of byte j -> element 8j + k
    kept = int(mask.sum())
    if cols % 4 or kept != values.numel() or int(mask.view(-1, 4).sum(1).max()) > 2:
        raise ModelLoadError(
            f"sparse-24-bitmask tensor [{rows}, {cols}] is not 2:4 ({kept} kept of {values.numel()})"
        )
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[values.element_size()]  # fp8 cannot index_put
    dense = torch.zeros(rows, cols, dtype=as_int)
    dense[mask] = values.contiguous().view(as_int).flatten()
    return dense.view(values.dtype)


def _as_2d(t: torch.Tensor, out_features: int) -> torch.Tensor:
    """A scale or zero point as [out, groups]: a per-tensor [1] / [1, 1] repeated per row."""
    if t.numel() == 1:
        return t.reshape(1, 1).expand(out_features, 1).contiguous()
    return t.unsqueeze(1) if t.dim() == 1 else t


@register
class CompressedTensorsFormat(CheckpointFormat):
    method = "compressed-tensors"

    def __init__(self, qconfig: Mapping[str, Any]) -> None:
        if qconfig.get("kv_cache_scheme") or qconfig.get("transform_config"):
            raise _unsupported("kv_cache_scheme / transform_config")
        default_format = str(qconfig.get("format") or "")
        groups = qconfig.get("config_groups") or {}
        self.schemes = [_parse_scheme(name, group, default_format) for name, group in groups.items()]
        self.ignore = tuple(qconfig.get("ignore") or ())
        sparsity = qconfig.get("sparsity_config") or {}
        sparse_format = sparsity.get("format", "dense")
        if sparse_format not in ("dense", "sparse-24-bitmask"):
            raise _unsupported(f"sparsity format {sparse_format!r}")
        if not self.schemes and not sparsity:
            raise _unsupported("quantization_config without config_groups or sparsity_config")
        # a dense sparsity_config alone (pagoda quantize --scheme 2:4): pruned weights stored dense

    def scheme_for(self, name: str) -> _Scheme | None:
        """The config group quantizing linear `name` (most specific target wins), None if none does."""
        if _matched(name, self.ignore) is not None:
            return None
        ranked = [(r, i) for i, s in enumerate(self.schemes) if (r := _matched(name, s.targets)) is not None]
        return self.schemes[min(ranked)[1]] if ranked else None

    def linear_parts(self, names: Iterable[str]) -> dict[str, dict[str, str]]:
        stored = set(names)
        groups: dict[str, dict[str, str]] = {}
        for name in stored:
            prefix, _, part = name.rpartition(".")
            if part in ("weight_packed", "weight_scale", "compressed") and prefix not in groups:
                groups[prefix] = {p: f"{prefix}.{p}" for p in _PARTS if f"{prefix}.{p}" in stored}
                quantized = part != "compressed" or "weight_scale" in groups[prefix]
                if quantized and self.scheme_for(prefix) is None:
                    raise ModelLoadError(
                        f"{prefix} is stored quantized but no config group of quantization_config targets "
                        "it (or `ignore` lists it); the checkpoint's config.json does not match its weights"
                    )
        return groups

    def read(self, prefix: str, parts: Mapping[str, torch.Tensor]) -> WeightTensor:
        sparse = "compressed" in parts
        if sparse:
            parts = {**parts, "weight": decompress_24(parts["compressed"], parts["bitmask"], parts["shape"])}
        if "weight_scale" not in parts:
            if sparse:
                return parts["weight"]  # 2:4 sparse without quantization: the dense weight
            raise ModelLoadError(
                f"{prefix}: quantized linear without weight_scale; the checkpoint is incomplete"
            )
        scheme = self.scheme_for(prefix)
        assert scheme is not None, f"linear_parts let {prefix} through without a config group"
        weight = self._read_quantized(prefix, parts, scheme)
        return replace(weight, act=scheme.act, sparse_24=sparse)

    def _read_quantized(
        self, prefix: str, parts: Mapping[str, torch.Tensor], scheme: _Scheme
    ) -> QuantizedWeight:
        zero = parts.get("weight_zero_point")
        if "weight_packed" in parts:
            packed = parts["weight_packed"]  # [out, in * bits / 32]
            shape = parts.get("weight_shape")
            default = [packed.shape[0], packed.shape[1] * 32 // scheme.bits]
            out_features, in_features = (int(v) for v in (default if shape is None else shape.tolist()))
            half = 1 << (scheme.bits - 1)  # packed codes and zero points are stored unsigned
            codes = unpack_int32(packed, scheme.bits, in_features) - half
            if zero is not None and zero.dtype == torch.int32:  # [out * bits / 32, groups]
                zero = unpack_int32(zero.t(), scheme.bits, out_features).t() - half
        elif scheme.format == "pack-quantized":
            raise ModelLoadError(
                f"{prefix}: pack-quantized linear without weight_packed; the checkpoint is incomplete"
            )
        elif scheme.is_float:
            codes = parts["weight"]
            if codes.dtype != torch.float8_e4m3fn:
                raise _unsupported(
                    f"{prefix}: float weights stored as {codes.dtype} (expected float8_e4m3fn)"
                )
        else:
            codes = parts["weight"].to(torch.int16)
        out_features, in_features = codes.shape
        scale = _as_2d(parts["weight_scale"], out_features)
        g_idx = parts.get("weight_g_idx")
        if g_idx is not None and not is_trivial_g_idx(g_idx, in_features // scale.shape[1]):
            raise _unsupported(f"{prefix}: activation ordering with a permuted weight_g_idx")
        if scheme.is_float:
            if zero is not None and zero.any():
                raise _unsupported(f"{prefix}: asymmetric float weights")
            return QuantizedWeight(codes=codes, scale=scale.float(), offset=None, bits=8)
        zero = None if zero is None else _as_2d(zero, out_features).to(torch.int16)
        return integer_weight(codes, scale, zero, scheme.bits, signed_zero=0)

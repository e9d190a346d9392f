"""Write a `QuantizedModel` as a Hugging Face directory in the compressed-tensors format, through
the compressed-tensors library itself: its QuantizationScheme/QuantizationArgs describe each
scheme, its format inference picks the compressor LLM Compressor would pick (W4A16 and W8A16:
pack-quantized; W8A8: int-quantized; FP8_DYNAMIC: float-quantized), that compressor's `compress`
produces the stored tensors (weight_packed + weight_scale + weight_shape, and for W4A16_ASYM
weight_zero_point, the int8 zero points packed along the output dim; or an int8/float8 weight +
weight_scale), and `ModelCompressor.update_config` writes `quantization_config` into config.json
as LLM Compressor does.

Scales are stored in bfloat16 (the algorithms keep them bfloat16-representable), so the library
recomputes exactly the codes it was given: w = codes * scale is exact in float32 for 8-bit codes
and bfloat16 scales, and w / scale gives the codes back. Embeddings, norms and lm_head are stored
in bfloat16, unquantized.

2:4 is pruning only. compressed-tensors 0.20 no longer ships a sparse compressor (the
sparse-24-bitmask one was removed upstream, and `update_config` writes `sparsity_config: {}`), so
the pruned weights are stored dense in bfloat16 (zeros stay zeros) and config.json records the
structure in `quantization_config.sparsity_config` (the library's DenseSparsityConfig,
sparsity_structure "2:4", format "dense") with no config_groups.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from pagoda.compress.hf_export import write_config, write_tokenizer
from pagoda.compress.options import QuantizeOptions
from pagoda.compress.pipeline import QuantizedModel, quantize_model
from pagoda.compress.scheme import Scheme
from pagoda.engine.loader import Checkpoint, load_checkpoint
from pagoda.engine.quantization.weights import QuantizedWeight

SHARD_BYTES = 4 * 2**30  # tensors per safetensors file, as Hugging Face shards
IGNORE = ["lm_head"]


@dataclass(frozen=True)
class Written:
    files: list[str]
    bytes: int
    format: str  # the compressed-tensors format ("pack-quantized", ..., "dense" for 2:4)


def ct_scheme(scheme: Scheme) -> Any:
    """The compressed-tensors QuantizationScheme of a quantizing `scheme` (format filled in)."""
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationScheme,
        QuantizationStrategy,
        QuantizationType,
    )

    assert scheme.quantizes_weights, scheme
    weights = QuantizationArgs(
        num_bits=scheme.bits,
        type=QuantizationType.FLOAT if scheme.float_codes else QuantizationType.INT,
        strategy=QuantizationStrategy.GROUP if scheme.group_size else QuantizationStrategy.CHANNEL,
        group_size=scheme.group_size,
        symmetric=scheme.symmetric,
        dynamic=False,
        observer=scheme.observer,
    )
    acts = None
    if scheme.act is not None:
        acts = QuantizationArgs(
            num_bits=8,
            type=QuantizationType.INT if scheme.act == "int8" else QuantizationType.FLOAT,
            strategy=QuantizationStrategy.TOKEN,
            symmetric=True,
            dynamic=True,
        )
    result = QuantizationScheme(targets=["Linear"], weights=weights, input_activations=acts)
    result.format = infer_module_format(torch.nn.Linear, result).value
    return result


def compress_linear(qw: QuantizedWeight, scheme: Any) -> dict[str, torch.Tensor]:
    """One linear's stored tensors (local names: weight_packed, weight_scale, ...) as the
    library's compressor for `scheme.format` writes them."""
    from compressed_tensors.compressors import BaseCompressor

    scale = qw.scale.to(torch.bfloat16)
    assert torch.equal(scale.float(), qw.scale.float()), "scales must be bfloat16-representable"
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    state = {"weight": qw.dequantize(), "weight_scale": scale}
    if qw.offset is not None:  # offset = -zero * scale, zero a whole number of steps
        zero = (-qw.offset.float() / qw.scale.float()).round()
        assert torch.equal(-zero * qw.scale.float(), qw.offset.float()), "offsets must be whole steps"
        state["weight_zero_point"] = zero.to(torch.int8)  # [out, groups], as compressed-tensors keeps it
    return dict(compressor.compress(state, scheme))


def quantize_to_dir(options: QuantizeOptions, progress: bool = True) -> tuple[QuantizedModel, Written]:
    """`pagoda quantize`: load options.model, quantize it, write options.output. The
    QuantizedModel comes back too (tests compare the files against its weights)."""
    ckpt = load_checkpoint(options.model)  # reads no weights: a bad pair or group size fails first
    result = quantize_model(ckpt, options, progress)
    is_gguf = Path(ckpt.path).suffix.lower() == ".gguf"
    return result, write_checkpoint(result, ckpt, is_gguf, Path(options.output))


def write_checkpoint(result: QuantizedModel, ckpt: Checkpoint, source_is_gguf: bool, output: Path) -> Written:
    """Write config.json, the safetensors weights, the tokenizer and generation config."""
    output.mkdir(parents=True, exist_ok=True)
    if any(output.glob("*.safetensors")) or (output / "config.json").exists():
        raise ValueError(f"output directory {str(output)!r} already holds a model; pass a new directory")
    tensors: dict[str, torch.Tensor] = {
        name: t.to(torch.bfloat16).contiguous() for name, t in result.tensors.items()
    }
    write_config(ckpt, source_is_gguf, output)
    if result.scheme.quantizes_weights:
        scheme = ct_scheme(result.scheme)
        for name, qw in result.linears.items():
            for key, tensor in compress_linear(qw, scheme).items():
                tensors[f"{name}.{key}"] = tensor.contiguous()
        _add_quantization_config(output, scheme)
        fmt = str(scheme.format)
    else:
        _add_sparsity_config(output, result)
        fmt = "dense"
    files = _save_shards(tensors, output)
    files += ["config.json", *write_tokenizer(ckpt, source_is_gguf, output)]
    size = sum((output / f).stat().st_size for f in files)
    return Written(files=files, bytes=size, format=fmt)


def _add_quantization_config(output: Path, scheme: Any) -> None:
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    config = QuantizationConfig(
        config_groups={"group_0": scheme},
        format=scheme.format,
        quantization_status=QuantizationStatus.COMPRESSED,
        ignore=list(IGNORE),
    )
    ModelCompressor(quantization_config=config).update_config(str(output))


def _add_sparsity_config(output: Path, result: QuantizedModel) -> None:
    import compressed_tensors
    from compressed_tensors.config import DenseSparsityConfig

    zeros = total = 0
    for name, t in result.tensors.items():
        if ".layers." in name and name.endswith("_proj.weight"):
            zeros += int((t == 0).sum())
            total += t.numel()
    sparsity = DenseSparsityConfig(
        targets=["Linear"],
        ignore=list(IGNORE),
        global_sparsity=zeros / max(total, 1),
        sparsity_structure="2:4",
    )
    path = output / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["quantization_config"] = {
        "version": compressed_tensors.__version__,
        "quant_method": "compressed-tensors",
        "format": "dense",
        "config_groups": {},
        "ignore": list(IGNORE),
        "sparsity_config": sparsity.model_dump(),
        "transform_config": {},
    }
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _save_shards(tensors: dict[str, torch.Tensor], output: Path) -> list[str]:
    """model.safetensors, or model-0000i-of-0000n.safetensors + its index past SHARD_BYTES."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(output / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file, shard in zip(names, shards, strict=True):
        save_file(shard, str(output / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (output / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    return [*names, "model.safetensors.index.json"]

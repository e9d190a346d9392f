"""Quantized Hugging Face checkpoints read into QuantizedWeight (pagoda/engine/quantization/formats.py,
compressed_tensors_format.py) through the HF loader.

(a) compressed-tensors: a tiny bf16 Llama's linears compressed by the compressed-tensors library's
    own compressors; the reader's dequantize() equals the library's decompression bit for bit, in
    float32 (scales upcast: exact) and in the checkpoint's bf16. The 2:4 bitmask is packed here by
    the rule of the library's last Sparse24BitMaskCompressor (0.14; 0.20 dropped it).
(b) GPTQ / AWQ: codes, zeros and scales drawn at random, packed here by each format's rule; the
    reader's dequantize() equals the format's formula computed here, exactly.
(c) what pagoda does not read fails with a ModelLoadError that names what it does read.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.config import Sparse24BitMaskConfig
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    preset_name_to_scheme,
)
from compressed_tensors.quantization.utils.helpers import calculate_qparams
from compressed_tensors.utils.helpers import pack_bitmasks
from safetensors.torch import save_file

from pagoda.engine.loader import ModelLoadError, load_checkpoint
from pagoda.engine.quantization.weights import QuantizedWeight
from tests.tiny_models import make_tiny_model

LINEARS = [f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"] + [
    f"model.layers.0.mlp.{p}_proj" for p in ("gate", "up", "down")
]
State = dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, State]:
    """A 1-layer bf16 Llama (hidden 64, intermediate 96: groups of 32 divide every linear)."""
    path = tmp_path_factory.mktemp("tiny")
    _, state = make_tiny_model("llama", path, dtype=torch.bfloat16, num_layers=1)
    return path, state


def write_checkpoint(dst: Path, base: Path, shards: list[State], qconfig: dict[str, Any]) -> str:
    """base's config.json + quantization_config, its tokenizer, and `shards` as safetensors files."""
    dst.mkdir()
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = qconfig
    (dst / "config.json").write_text(json.dumps(config))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(base / f, dst / f)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: v.contiguous() for k, v in shard.items()}, str(dst / fname))
        weight_map.update(dict.fromkeys(shard, fname))
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return str(dst)


# ---- (a) compressed-tensors -------------------------------------------------------------------


def _int(bits: int, strategy: str, symmetric: bool = True, group: int | None = None) -> QuantizationArgs:
    return QuantizationArgs(num_bits=bits, strategy=strategy, group_size=group, symmetric=symmetric)


def _fp8(strategy: str) -> QuantizationArgs:
    return QuantizationArgs(num_bits=8, type="float", strategy=strategy, symmetric=True)


def _dynamic(kind: str) -> QuantizationArgs:
    return QuantizationArgs(num_bits=8, type=kind, strategy="token", symmetric=True, dynamic=True)


# variant -> (format, weight args, input activation args, expected act)
CT_VARIANTS: dict[str, tuple[str, QuantizationArgs, QuantizationArgs | None, str | None]] = {
    "w4a16_group32": ("pack-quantized", _int(4, "group", group=32), None, None),
    "w4a16_asym_group32": ("pack-quantized", _int(4, "group", symmetric=False, group=32), None, None),
    "w8a16_channel": ("pack-quantized", _int(8, "channel"), None, None),
    "w8a16_naive_channel": ("naive-quantized", _int(8, "channel"), None, None),
    "w8a8_int8": ("int-quantized", _int(8, "channel"), _dynamic("int"), "int8"),
    "fp8_dynamic_channel": ("float-quantized", _fp8("channel"), _dynamic("float"), "fp8"),
    "fp8_dynamic_tensor": ("float-quantized", _fp8("tensor"), _dynamic("float"), "fp8"),
}


def _qparams(w: torch.Tensor, args: QuantizationArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max scale and zero point by the library's calculate_qparams, per the args' strategy."""
    if args.strategy == "group":
        x = w.unflatten(-1, (-1, args.group_size))
        return calculate_qparams(x.amin(-1), x.amax(-1), args)
    if args.strategy == "channel":
        return calculate_qparams(w.amin(1, keepdim=True), w.amax(1, keepdim=True), args)
    return calculate_qparams(w.amin(), w.amax(), args)


def ct_compress(state: State, fmt: str, scheme: QuantizationScheme) -> tuple[State, State, State]:
    """(compressed state dict, library decompression in bf16, in float32) of every linear."""
    compressor = BaseCompressor.get_value_from_registry(fmt)
    compressed = {k: v for k, v in state.items() if k.removesuffix(".weight") not in LINEARS}
    ref, ref32 = {}, {}
    assert scheme.weights is not None
    for name in LINEARS:
        w = state[name + ".weight"]
        scale, zero = _qparams(w, scheme.weights)
        parts = compressor.compress({"weight": w, "weight_scale": scale, "weight_zero_point": zero}, scheme)
        compressed.update({f"{name}.{k}": v for k, v in parts.items()})
        ref[name] = compressor.decompress(parts, scheme)["weight"]
        upcast = {**parts, "weight_scale": parts["weight_scale"].float()}
        ref32[name] = compressor.decompress(upcast, scheme)["weight"]
    return compressed, ref, ref32


def ct_config(fmt: str, scheme: QuantizationScheme, ignore: list[str] | None = None) -> dict[str, Any]:
    config = QuantizationConfig(
        config_groups={"group_0": scheme},
        format=fmt,
        ignore=["lm_head"] if ignore is None else ignore,
        quantization_status="compressed",
    )
    return config.model_dump(mode="json")


@pytest.mark.parametrize("variant", list(CT_VARIANTS))
def test_compressed_tensors_equal_library_decompression(
    variant: str, tiny: tuple[Path, State], tmp_path: Path
) -> None:
    base, state = tiny
    fmt, weights, acts, act = CT_VARIANTS[variant]
    scheme = QuantizationScheme(targets=["Linear"], weights=weights, input_activations=acts)
    compressed, ref, ref32 = ct_compress(state, fmt, scheme)
    ckpt = load_checkpoint(write_checkpoint(tmp_path / variant, base, [compressed], ct_config(fmt, scheme)))
    assert ckpt.quantization == "compressed-tensors"
    got = dict(ckpt.weights())
    assert set(got) == set(state)
    for name in LINEARS:
        qw = got[name + ".weight"]
        assert isinstance(qw, QuantizedWeight), name
        group = weights.group_size if weights.strategy == "group" else qw.in_features
        expected = (weights.num_bits, act, group, weights.type == "float")
        assert (qw.bits, qw.act, qw.group_size, qw.is_float) == expected, name
        assert (qw.offset is None) == weights.symmetric, name
        assert torch.equal(qw.dequantize(), ref32[name]), name
        assert torch.equal(qw.dequantize().to(torch.bfloat16), ref[name]), name
    for name in set(state) - {n + ".weight" for n in LINEARS}:  # lm_head (ignored), norms, embedding
        plain = got[name]
        assert isinstance(plain, torch.Tensor) and torch.equal(plain, state[name]), name


def prune_24(w: torch.Tensor) -> torch.Tensor:
    """w with the 2 smallest |w| of every 4 consecutive inputs zeroed."""
    groups = w.reshape(-1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(
        1, groups.float().abs().topk(2, 1).indices, True
    )
    return (groups * keep).reshape(w.shape)


def bitmask_compress(name: str, t: torch.Tensor) -> State:
    """compressed-tensors <= 0.14 Sparse24BitMaskTensor.from_dense(...).dict(name): the top-2 |t| of
    every 4 (row-major) kept as `compressed` [rows, cols/2], their mask packed by pack_bitmasks
    (numpy packbits, little bit order) as `bitmask`, the dense shape as `shape` [2, 1]."""
    raw = t.view(torch.uint8) if t.element_size() == 1 else t  # fp8 has no abs/indexing on CPU
    mask = torch.zeros(t.shape, dtype=torch.bool).view(-1, 4)
    mask.scatter_(1, t.float().reshape(-1, 4).abs().topk(2, 1).indices, True)
    mask = mask.view(t.shape)
    values = raw[mask].reshape(t.shape[0], t.shape[1] // 2).view(t.dtype)
    shape = torch.tensor(list(t.shape)).reshape(-1, 1)
    return {f"{name}.compressed": values, f"{name}.bitmask": pack_bitmasks(mask), f"{name}.shape": shape}


@pytest.mark.parametrize("quantized", [True, False], ids=["fp8_dynamic", "dense"])
def test_sparse_24_bitmask(quantized: bool, tiny: tuple[Path, State], tmp_path: Path) -> None:
    base, state = tiny
    pruned = {k: prune_24(v) if k.removesuffix(".weight") in LINEARS else v for k, v in state.items()}
    sparsity = Sparse24BitMaskConfig(targets=["Linear"], ignore=["lm_head"]).model_dump(mode="json")
    if quantized:
        scheme = QuantizationScheme(
            targets=["Linear"], weights=_fp8("channel"), input_activations=_dynamic("float")
        )
        compressed, ref, _ = ct_compress(pruned, "float-quantized", scheme)
        qconfig = {**ct_config("float-quantized", scheme), "sparsity_config": sparsity}
    else:
        compressed, ref = dict(pruned), {n: pruned[n + ".weight"] for n in LINEARS}
        qconfig = {"quant_method": "compressed-tensors", "format": "dense", "sparsity_config": sparsity}
    for name in LINEARS:
        compressed.update(bitmask_compress(name, compressed.pop(name + ".weight")))
    got = dict(load_checkpoint(write_checkpoint(tmp_path / "sparse", base, [compressed], qconfig)).weights())
    assert set(got) == set(state)
    for name in LINEARS:
        w = got[name + ".weight"]
        if quantized:
            assert isinstance(w, QuantizedWeight) and w.sparse_24 and w.act == "fp8", name
            assert torch.equal(w.dequantize().to(torch.bfloat16), ref[name]), name
        else:
            assert isinstance(w, torch.Tensor) and torch.equal(w, ref[name]), name


# ---- (b) GPTQ and AWQ ---------------------------------------------------------------------------


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """AutoGPTQ's QuantLinear.pack (and AutoAWQ's): 32 // bits codes per int32 along the last dim,
    code j of a word in bits [bits * j, bits * (j + 1)), the first code in the lowest bits."""
    per = 32 // bits
    c = codes.long().reshape(*codes.shape[:-1], -1, per)
    words = (c << (torch.arange(per) * bits)).sum(-1)  # unsigned 32-bit values in int64
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def gptq_linear(
    out_f: int, in_f: int, cfg: dict[str, Any], gen: torch.Generator
) -> tuple[State, torch.Tensor]:
    """Random GPTQ parts of one linear and the format's w = (q - z) * s for them, float32 [out, in].
    The classic format ("gptq") stores z - 1 (AutoGPTQ's pack: `zeros -= 1`), gptq_v2 stores z;
    a symmetric quantization's z is 2**(bits-1)."""
    bits, v1 = cfg["bits"], cfg["checkpoint_format"] == "gptq"
    group = in_f if cfg["group_size"] == -1 else cfg["group_size"]
    groups, top = in_f // group, 1 << bits
    q = torch.randint(0, top, (in_f, out_f), generator=gen)  # [in, out], GPTQ's orientation
    if cfg["sym"]:
        z = torch.full((groups, out_f), top // 2)
    else:  # v1 stores z - 1 in `bits` bits: a stored 2**bits - 1 reads back as z = 2**bits
        z = torch.randint(int(v1), top + int(v1), (groups, out_f), generator=gen)
    s = (torch.rand(groups, out_f, generator=gen) * 0.02 + 1e-3).half()
    g_idx = torch.arange(in_f) // group
    w = (q.float() - z[g_idx].float()) * s[g_idx].float()  # [in, out]
    parts = {
        "qweight": pack_int32(q.t(), bits).t(),  # [in / (32/bits), out]: packed along the input dim
        "qzeros": pack_int32(z - int(v1), bits),  # [groups, out / (32/bits)]: along the output dim
        "scales": s,
        "g_idx": g_idx.int(),
    }
    return parts, w.t()


AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ WQLinear_GEMM.from_linear's order_map


def awq_linear(out_f: int, in_f: int, group: int, gen: torch.Generator) -> tuple[State, torch.Tensor]:
    """Random AWQ GEMM parts of one linear and w = (q - z) * s, float32 [out, in]. Packing along
    the OUTPUT dim, nibble k of word j holding column 8j + AWQ_ORDER[k] (WQLinear_GEMM.from_linear)."""
    groups = in_f // group
    q = torch.randint(0, 16, (in_f, out_f), generator=gen)
    z = torch.randint(0, 16, (groups, out_f), generator=gen)
    s = (torch.rand(groups, out_f, generator=gen) * 0.02 + 1e-3).half()
    g = torch.arange(in_f) // group
    w = (q.float() - z[g].float()) * s[g].float()

    def pack(c: torch.Tensor) -> torch.Tensor:
        return pack_int32(c.reshape(c.shape[0], -1, 8)[..., AWQ_ORDER].reshape(c.shape), 4)

    return {"qweight": pack(q), "qzeros": pack(z), "scales": s}, w.t()


def quantized_state(state: State, make: Any) -> tuple[State, dict[str, torch.Tensor]]:
    """state with each linear's weight replaced by make(out, in, gen)'s parts; the expected weights."""
    gen = torch.Generator().manual_seed(0)
    out = {k: v for k, v in state.items() if k.removesuffix(".weight") not in LINEARS}
    expected = {}
    for name in LINEARS:
        parts, expected[name] = make(*state[name + ".weight"].shape, gen)
        out.update({f"{name}.{k}": v for k, v in parts.items()})
    return out, expected


def _gptq(bits: int, group: int, sym: bool, desc_act: bool = False, fmt: str = "gptq") -> dict[str, Any]:
    return dict(bits=bits, group_size=group, sym=sym, desc_act=desc_act, checkpoint_format=fmt)


GPTQ_VARIANTS = {
    "4bit_sym_group32": _gptq(4, 32, sym=True),
    "4bit_asym_group32": _gptq(4, 32, sym=False),
    "8bit_asym_channel_v2": _gptq(8, -1, sym=False, fmt="gptq_v2"),
    "8bit_sym_group32": _gptq(8, 32, sym=True),
    "4bit_desc_act_static_groups": _gptq(4, 32, sym=False, desc_act=True),  # trivial g_idx: accepted
}


@pytest.mark.parametrize("variant", list(GPTQ_VARIANTS))
def test_gptq_equals_format_formula(variant: str, tiny: tuple[Path, State], tmp_path: Path) -> None:
    base, state = tiny
    cfg = GPTQ_VARIANTS[variant]
    stored, expected = quantized_state(state, lambda o, i, g: gptq_linear(o, i, cfg, g))
    qconfig = {"quant_method": "gptq", **cfg}
    ckpt = load_checkpoint(write_checkpoint(tmp_path / variant, base, [stored], qconfig))
    assert ckpt.quantization == "gptq"
    got = dict(ckpt.weights())
    assert set(got) == set(state)
    for name in LINEARS:
        qw = got[name + ".weight"]
        assert isinstance(qw, QuantizedWeight) and qw.bits == cfg["bits"], name
        assert (qw.offset is None) == cfg["sym"], name  # symmetric: signed codes, no offset
        assert torch.equal(qw.dequantize(), expected[name]), name


def test_awq_equals_format_formula(tiny: tuple[Path, State], tmp_path: Path) -> None:
    base, state = tiny
    stored, expected = quantized_state(state, lambda o, i, g: awq_linear(o, i, 32, g))
    qconfig = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"}
    ckpt = load_checkpoint(write_checkpoint(tmp_path / "awq", base, [stored], qconfig))
    assert ckpt.quantization == "awq"
    got = dict(ckpt.weights())
    assert set(got) == set(state)
    for name in LINEARS:
        qw = got[name + ".weight"]
        assert isinstance(qw, QuantizedWeight) and (qw.bits, qw.group_size) == (4, 32), name
        assert torch.equal(qw.dequantize(), expected[name]), name


def test_parts_of_one_linear_in_different_shards(tiny: tuple[Path, State], tmp_path: Path) -> None:
    """qweight in one shard, qzeros/scales/g_idx in the next: still one QuantizedWeight each."""
    base, state = tiny
    cfg = GPTQ_VARIANTS["4bit_asym_group32"]
    stored, expected = quantized_state(state, lambda o, i, g: gptq_linear(o, i, cfg, g))
    first = {k: v for k, v in stored.items() if not k.endswith(("qzeros", "scales", "g_idx"))}
    second = {k: v for k, v in stored.items() if k not in first}
    path = write_checkpoint(tmp_path / "sharded", base, [first, second], {"quant_method": "gptq", **cfg})
    got = dict(load_checkpoint(path).weights())
    assert set(got) == set(state)
    for name in LINEARS:
        qw = got[name + ".weight"]
        assert isinstance(qw, QuantizedWeight) and torch.equal(qw.dequantize(), expected[name]), name


# ---- (c) what is not read ---------------------------------------------------------------------


def _ct_preset(name: str, fmt: str) -> dict[str, Any]:
    return ct_config(fmt, preset_name_to_scheme(name, ["Linear"]))


GPTQ4 = GPTQ_VARIANTS["4bit_asym_group32"]
CONFIG_ERRORS: dict[str, tuple[dict[str, Any], str]] = {  # quantization_config, what the message says
    "unknown_method": ({"quant_method": "bitsandbytes"}, "pagoda reads awq, compressed-tensors, gptq"),
    "gptq_3bit": ({"quant_method": "gptq", **GPTQ4, "bits": 3}, "pagoda reads 4- and 8-bit GPTQ"),
    "gptq_marlin": ({"quant_method": "gptq", **GPTQ4, "checkpoint_format": "marlin"}, "gptq and gptq_v2"),
    "awq_gemv": (
        {"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemv"},
        "pagoda reads 4-bit AWQ of the GEMM version",
    ),
    "ct_nvfp4": (_ct_preset("NVFP4A16", "nvfp4-pack-quantized"), "format 'nvfp4-pack-quantized' is not"),
    "ct_2bit": (_ct_preset("W2A16", "pack-quantized"), "2-bit int weights"),
    "ct_fp8_block": (_ct_preset("FP8_BLOCK", "float-quantized"), "strategy 'block'"),
    "ct_static_fp8_activations": (_ct_preset("FP8", "float-quantized"), "'tensor' with dynamic=False"),
}


@pytest.mark.parametrize("case", list(CONFIG_ERRORS))
def test_unsupported_config_is_refused_at_load(case: str, tiny: tuple[Path, State], tmp_path: Path) -> None:
    base, state = tiny
    qconfig, message = CONFIG_ERRORS[case]
    stored, _ = quantized_state(state, lambda o, i, g: gptq_linear(o, i, GPTQ4, g))
    path = write_checkpoint(tmp_path / case, base, [stored], qconfig)
    with pytest.raises(ModelLoadError, match="pagoda reads") as err:
        load_checkpoint(path)
    assert message in str(err.value)


def test_gptq_act_order_is_refused(tiny: tuple[Path, State], tmp_path: Path) -> None:
    base, state = tiny
    cfg = GPTQ_VARIANTS["4bit_desc_act_static_groups"]
    stored, _ = quantized_state(state, lambda o, i, g: gptq_linear(o, i, cfg, g))
    g_idx = stored[LINEARS[0] + ".g_idx"]
    perm = torch.randperm(g_idx.numel(), generator=torch.Generator().manual_seed(1))
    stored[LINEARS[0] + ".g_idx"] = g_idx[perm]
    ckpt = load_checkpoint(
        write_checkpoint(tmp_path / "act_order", base, [stored], {"quant_method": "gptq", **cfg})
    )
    with pytest.raises(
        ModelLoadError, match=r"act-order \(desc_act=True, a permuted g_idx\).*desc_act=false"
    ):
        dict(ckpt.weights())


def test_compressed_tensors_layer_no_group_claims_is_refused(
    tiny: tuple[Path, State], tmp_path: Path
) -> None:
    base, state = tiny
    fmt, weights, _, _ = CT_VARIANTS["w4a16_group32"]
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    compressed, _, _ = ct_compress(state, fmt, scheme)
    # down_proj is stored quantized, yet `ignore` lists it
    qconfig = ct_config(fmt, scheme, ignore=["lm_head", "re:.*down_proj$"])
    ckpt = load_checkpoint(write_checkpoint(tmp_path / "ignored", base, [compressed], qconfig))
    with pytest.raises(ModelLoadError, match=r"mlp\.down_proj is stored quantized but no config group"):
        dict(ckpt.weights())

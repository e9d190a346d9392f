"""`pagoda quantize` on tiny random Llama and Qwen3 models, every scheme: the written directory
decompresses, through compressed-tensors' own compressors and the scheme transformers reads from
config.json, bit-exactly to the QuantizedWeights the algorithms produced; the model it holds
computes nearly what the source did; config.json parses with AutoConfig; bad pairs fail in one
line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from pagoda.compress.calibration import build_float_model, calibration_samples, calibration_text
from pagoda.compress.options import QuantizeOptions
from pagoda.compress.pipeline import QuantizedModel, plan
from pagoda.compress.writer import quantize_to_dir
from pagoda.engine.loader import load_checkpoint
from pagoda.engine.runner.forward import forward_tokens
from pagoda.services.cli.main import main
from tests.tiny_models import make_tiny_model

# (scheme, method, group size, largest relative error of the hidden states on calibration text).
# The bounds sit ~1.5x above what was measured on these random models (W4 g32 gptq 0.13, W8 0.01,
# FP8 0.07, 2:4 sparsegpt 0.45); a linear written under the wrong name gives ~1.
CASES = [
    ("W4A16", "gptq", 32, 0.2),
    ("W4A16_ASYM", "gptq", 32, 0.2),
    ("W4A16", "awq", 32, 0.45),  # measured 0.28-0.32 (random weights have no outlier channels)
    ("W8A16", "rtn", None, 0.03),
    ("W8A8", None, None, 0.03),  # the default: smoothquant, then gptq
    ("FP8_DYNAMIC", None, None, 0.12),
    ("2:4", None, None, 0.7),  # the default: sparsegpt
]
SAMPLES, SEQ_LEN = 4, 32


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """The tiny models' matmuls are microseconds of work: on a shared 2-core machine a second
    intra-op thread only adds waiting (measured: 3.6 s -> 1.0 s per W4A16 gptq run with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    for kind in ("llama", "qwen3"):
        make_tiny_model(kind, root / kind)
    return {kind: root / kind for kind in ("llama", "qwen3")}


def _options(src: Path, out: Path, scheme: str, method: str | None, group: int | None) -> QuantizeOptions:
    return QuantizeOptions(
        model=str(src), scheme=scheme, output=str(out), method=method, group_size=group,
        num_samples=SAMPLES, seq_len=SEQ_LEN,
    )  # fmt: skip


def _decompressed(out: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(config.json, stored tensors, each quantized linear's weight as compressed-tensors
    decompresses it: under the scheme transformers parses from config.json, with the stored bf16
    scale (as a loader sees it) and ".f32" with the scale widened (the exact product))."""
    from compressed_tensors.compressors import BaseCompressor
    from transformers.utils.quantization_config import CompressedTensorsConfig

    config = json.loads((out / "config.json").read_text())
    stored = load_file(str(out / "model.safetensors"))
    quant = CompressedTensorsConfig.from_dict(config).quantization_config
    weights: dict[str, torch.Tensor] = {}
    if quant is None:
        return config, stored, weights
    scheme = quant.config_groups["group_0"]
    compressor = BaseCompressor.get_value_from_registry(quant.format)
    for name in [n[: -len(".weight_scale")] for n in stored if n.endswith(".weight_scale")]:
        local = {k[len(name) + 1 :]: v for k, v in stored.items() if k.startswith(name + ".")}
        weights[name] = compressor.decompress(local, scheme)["weight"]
        wide = {**local, "weight_scale": local["weight_scale"].float()}
        weights[name + ".f32"] = compressor.decompress(wide, scheme)["weight"]
    return config, stored, weights


def _hidden_error(src: Path, result: QuantizedModel, stored: dict[str, torch.Tensor],
                  decompressed: dict[str, torch.Tensor]) -> float:  # fmt: skip
    """Relative error of the written model's hidden states against the source's on two
    calibration sequences (the distribution the methods were calibrated on)."""
    ckpt = load_checkpoint(str(src))
    weights = {n: t.float() for n, t in stored.items() if n.rpartition(".")[2] in ("weight", "bias")}
    weights.update({f"{n}.weight": decompressed[n + ".f32"] for n in result.linears})
    ids = calibration_samples(ckpt.tokenizer, calibration_text("builtin"), SAMPLES, SEQ_LEN)[:2]
    source, written = (
        build_float_model(ckpt.arch, ckpt.weights(), SEQ_LEN),
        build_float_model(ckpt.arch, weights.items(), SEQ_LEN),
    )
    errors = []
    for seq in ids:
        ref = forward_tokens(source, seq)
        errors.append(float((forward_tokens(written, seq) - ref).norm() / ref.norm()))
    return max(errors)


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
@pytest.mark.parametrize(("scheme", "method", "group", "bound"), CASES)
def test_written_checkpoint_decompresses_to_the_quantized_weights(
    sources: dict[str, Path], tmp_path: Path, kind: str, scheme: str, method: str | None,
    group: int | None, bound: float,
) -> None:  # fmt: skip
    options = _options(sources[kind], tmp_path, scheme, method, group)
    result, _ = quantize_to_dir(options, progress=False)
    config, stored, decompressed = _decompressed(tmp_path)
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert config["quantization_config"]["ignore"] == ["lm_head"]
    num_linears = 2 * 7
    if result.scheme.quantizes_weights:
        assert len(result.linears) == num_linears
        for name, qw in result.linears.items():
            exact = qw.dequantize()
            assert torch.equal(decompressed[name + ".f32"], exact), name
            assert decompressed[name].dtype == torch.bfloat16
            assert torch.equal(decompressed[name], exact.to(torch.bfloat16)), name
            assert (f"{name}.weight_zero_point" in stored) == (qw.offset is not None), name
            dense = stored.get(f"{name}.weight")  # packed (absent), or 8-bit codes
            assert dense is None or dense.dtype in (torch.int8, torch.float8_e4m3fn), name
    else:
        pruned = [n for n in result.tensors if n.endswith("_proj.weight")]
        assert len(pruned) == num_linears and not result.linears
        for name in pruned:
            groups = stored[name].float().reshape(-1, 4)
            assert bool(((groups == 0).sum(1) >= 2).all()), name  # 2 of every 4 inputs are zero
        sparsity = config["quantization_config"]["sparsity_config"]
        assert sparsity["sparsity_structure"] == "2:4" and sparsity["global_sparsity"] >= 0.5
    for name, tensor in result.tensors.items():  # embeddings, norms, (2:4) pruned linears
        assert stored[name].dtype == torch.bfloat16
        assert torch.equal(stored[name], tensor.to(torch.bfloat16)), name
    assert _hidden_error(sources[kind], result, stored, decompressed) < bound


def test_config_states_the_scheme_as_llm_compressor_writes_it(
    sources: dict[str, Path], tmp_path: Path
) -> None:
    from transformers import AutoConfig

    expected = {
        "W4A16": (
            "pack-quantized",
            {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 32},
            None,
        ),
        "W4A16_ASYM": (
            "pack-quantized",
            {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 32, "symmetric": False},
            None,
        ),
        "W8A8": ("int-quantized", {"num_bits": 8, "type": "int", "strategy": "channel"}, "int"),
        "FP8_DYNAMIC": ("float-quantized", {"num_bits": 8, "type": "float", "strategy": "channel"}, "float"),
    }
    for scheme, (fmt, weights, act_type) in expected.items():
        out = tmp_path / scheme
        group = 32 if scheme.startswith("W4A16") else None
        quantize_to_dir(_options(sources["qwen3"], out, scheme, "rtn", group), progress=False)
        config = AutoConfig.from_pretrained(str(out))
        assert config.model_type == "qwen3"
        quant = config.quantization_config
        assert quant["format"] == fmt, quant
        group0 = quant["config_groups"]["group_0"]
        assert group0["targets"] == ["Linear"] and group0["format"] == fmt
        assert {k: group0["weights"][k] for k in weights} == weights
        assert group0["weights"]["symmetric"] is (scheme != "W4A16_ASYM")
        acts = group0["input_activations"]
        if act_type is None:
            assert acts is None
        else:
            got = (acts["type"], acts["strategy"], acts["dynamic"], acts["num_bits"])
            assert got == (act_type, "token", True, 8)
        assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()


def test_the_command_writes_what_the_api_writes(
    sources: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["quantize", str(sources["llama"]), "--scheme", "W4A16", "--group-size", "32",
            "--num-samples", str(SAMPLES), "--seq-len", str(SEQ_LEN), "--no-progress",
            "--observer", "minmax", "--no-actorder", "--dampening-frac", "0.05"]  # fmt: skip
    assert main([*argv, "--output", str(tmp_path / "cli")]) == 0
    line = capsys.readouterr().out
    assert "W4A16 (group 32) by gptq, format pack-quantized, 14 linears" in line, line
    options = replace(
        _options(sources["llama"], tmp_path / "api", "W4A16", None, 32),
        observer="minmax", actorder=False, dampening_frac=0.05,
    )  # fmt: skip
    quantize_to_dir(options, progress=False)
    cli, api = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("cli", "api"))
    assert cli.keys() == api.keys() and all(torch.equal(cli[k], api[k]) for k in cli)
    assert main([*argv, "--output", str(tmp_path / "cli")]) == 2  # the directory now holds a model
    assert "already holds a model" in capsys.readouterr().err


def test_gptq_defaults_to_mse_scales_and_activation_order(sources: dict[str, Path], tmp_path: Path) -> None:
    """What docs/perf.md measured best on the demo: GPTQ (and SmoothQuant's GPTQ) with mse scales
    and actorder; RTN, AWQ and FP8 keep each group's own range. A flag overrides either."""
    arch = load_checkpoint(str(sources["llama"])).arch
    for scheme, method, observer in [("W4A16", None, "mse"), ("W8A8", "smoothquant", "mse"),
                                     ("W4A16", "rtn", "minmax"), ("W4A16", "awq", "minmax"),
                                     ("FP8_DYNAMIC", None, "minmax")]:  # fmt: skip
        options = _options(sources["llama"], tmp_path, scheme, method, 32 if scheme == "W4A16" else None)
        assert options.actorder and plan(options, arch)[0].observer == observer, (scheme, method)
    options = replace(_options(sources["llama"], tmp_path, "W4A16", "gptq", 32), observer="minmax")
    assert plan(options, arch)[0].observer == "minmax"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--scheme", "W4A16", "--method", "smoothquant"], "W4A16 takes gptq, rtn, awq"),
        (["--scheme", "W8A16", "--method", "sparsegpt"], "W8A16 takes gptq, rtn, awq"),
        (["--scheme", "2:4", "--method", "gptq"], "2:4 takes sparsegpt, magnitude"),
        (["--scheme", "W4A16", "--method", "bogus"], "W4A16 takes gptq, rtn, awq"),
        (["--scheme", "W5A16"], "valid schemes: W4A16, W4A16_ASYM, W8A16, W8A8, FP8_DYNAMIC, 2:4"),
        (["--scheme", "W4A16"], "group size 128 does not divide layer model.layers.0.self_attn.q_proj's 64"),
        (["--scheme", "W8A8", "--group-size", "32"], "takes no group size"),
        (["--scheme", "W4A16", "--dampening-frac", "0"], "--dampening-frac must be positive, got 0.0"),
        (
            ["--scheme", "W8A8", "--calibration", "/no/such/file"],
            "calibration file '/no/such/file' does not exist",
        ),
        (
            ["--scheme", "W8A8", "--num-samples", "100000"],
            "too short for --num-samples 100000 x --seq-len 256",
        ),
    ],
)
def test_bad_requests_fail_in_one_line(
    sources: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
    message: str,
) -> None:
    argv = ["quantize", str(sources["llama"]), *flags, "--output", str(tmp_path / "o"), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pagoda: error: ") and "\n" not in err, err
    assert message in err, err
    assert not (tmp_path / "o" / "model.safetensors").exists()

"""`pagoda quantize` on the demo GGUF (SmolLM2-135M, Q4_1): W4A16 group 64 by RTN is written as
a Hugging Face directory whose config.json gives back the GGUF's architecture, whose tokenizer
(built from the GGUF vocabulary and merges) tokenizes exactly as the GGUF's does, and whose
weights decompress bit-exactly to the quantized ones. Group 128 does not fit the model's 576
inputs: the error names the sizes that do."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from pagoda.compress.options import QuantizeOptions
from pagoda.compress.pipeline import QuantizedModel
from pagoda.compress.writer import Written, quantize_to_dir
from pagoda.engine.loader import Checkpoint, load_checkpoint
from pagoda.engine.loader.hf_loader import load_hf_dir
from pagoda.services.cli.main import main

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces, trailing tabs\t\t\nand newlines\n\n",
    "Numbers 1234567 and 3.14159, code: def f(x): return x**2",
    "Unicode: héllo wörld, 日本語, emoji 🎉🙂",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def quantized(
    demo_gguf: str, tmp_path_factory: pytest.TempPathFactory
) -> tuple[QuantizedModel, Written, Path, float]:
    out = tmp_path_factory.mktemp("demo") / "w4a16-g64"
    options = QuantizeOptions(model=demo_gguf, scheme="W4A16", output=str(out), method="rtn", group_size=64)
    t0 = time.perf_counter()
    result, written = quantize_to_dir(options, progress=False)
    seconds = time.perf_counter() - t0
    print(f"demo W4A16 g64 rtn: {seconds:.1f}s {result.seconds}, {written.bytes / 2**20:.1f} MiB")
    return result, written, out, seconds


@pytest.fixture(scope="module")
def source(demo_gguf: str) -> Checkpoint:
    return load_checkpoint(demo_gguf)


def test_demo_quantizes_in_reasonable_time(quantized: tuple[QuantizedModel, Written, Path, float]) -> None:
    result, written, _, seconds = quantized
    assert seconds < 120, seconds  # 4.5 s on the quiet 2-core machine, 26-35 s with other jobs on it
    assert len(result.linears) == 30 * 7
    assert written.format == "pack-quantized"
    assert written.bytes < 120 * 2**20  # 4-bit linears + bf16 embeddings (57 MiB of it)


def test_config_gives_back_the_gguf_architecture(
    quantized: tuple[QuantizedModel, Written, Path, float], source: Checkpoint
) -> None:
    from transformers import AutoConfig

    out = quantized[2]
    config: Any = AutoConfig.from_pretrained(str(out))
    assert config.model_type == "llama" and config.architectures == ["LlamaForCausalLM"]
    group0 = config.quantization_config["config_groups"]["group_0"]
    assert group0["weights"]["group_size"] == 64 and group0["weights"]["num_bits"] == 4
    assert load_hf_dir(out, name="w4a16").arch == source.arch


def test_tokenizer_tokenizes_as_the_gguf_does(
    quantized: tuple[QuantizedModel, Written, Path, float], source: Checkpoint
) -> None:
    from pydoc_data.topics import topics

    gguf, hf = source.tokenizer, load_hf_dir(quantized[2], name="w4a16").tokenizer
    texts = [*TEXTS, topics[sorted(topics)[0]][:20000]]
    for text in texts:
        for special in (True, False):
            ids = gguf.encode(text, add_special_tokens=special)
            assert hf.encode(text, add_special_tokens=special) == ids, text[:40]
        assert hf.decode(ids) == gguf.decode(ids)
    for attr in ("bos_token", "eos_token", "bos_token_id", "eos_token_ids", "add_bos_token", "vocab_size"):
        assert getattr(hf, attr) == getattr(gguf, attr), attr
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    assert gguf.chat_template and hf.apply_chat_template(messages) == gguf.apply_chat_template(messages)
    sampling = json.loads((quantized[2] / "generation_config.json").read_text())
    assert sampling["temperature"] == 0.2 and sampling["eos_token_id"] == 2  # the demo's defaults


def test_weights_decompress_bit_exactly(quantized: tuple[QuantizedModel, Written, Path, float]) -> None:
    from compressed_tensors.compressors import BaseCompressor
    from transformers.utils.quantization_config import CompressedTensorsConfig

    result, _, out, _ = quantized
    config = json.loads((out / "config.json").read_text())
    quant = CompressedTensorsConfig.from_dict(config).quantization_config
    scheme, compressor = quant.config_groups["group_0"], BaseCompressor.get_value_from_registry(quant.format)
    stored = load_file(str(out / "model.safetensors"))
    assert "lm_head.weight" not in stored  # tied to the embeddings, as in the GGUF
    for name in [n for n in result.linears if n.startswith(("model.layers.0.", "model.layers.29."))]:
        qw = result.linears[name]
        local = {k[len(name) + 1 :]: v for k, v in stored.items() if k.startswith(name + ".")}
        assert local["weight_scale"].shape == (qw.out_features, qw.in_features // 64)
        local["weight_scale"] = local["weight_scale"].float()
        assert torch.equal(compressor.decompress(local, scheme)["weight"], qw.dequantize()), name
    for name, tensor in result.tensors.items():
        assert torch.equal(stored[name], tensor.to(torch.bfloat16)), name


def test_group_128_names_the_sizes_that_fit(
    demo_gguf: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    t0 = time.perf_counter()
    assert main(["quantize", demo_gguf, "--scheme", "W4A16", "--output", str(tmp_path / "o")]) == 2
    assert time.perf_counter() - t0 < 20  # refused before a weight is read
    err = capsys.readouterr().err.strip()
    assert err == (
        "pagoda: error: group size 128 does not divide layer model.layers.0.self_attn.q_proj's 576 inputs; "
        "use one of 32, 64, 96, 192"
    ), err

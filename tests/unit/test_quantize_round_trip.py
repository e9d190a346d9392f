"""`pagoda quantize` -> `pagoda serve`: what the compressor writes is served quantized, and the
weights the served layers multiply by are, bit for bit, what compressed-tensors decompresses."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from pagoda.compress.writer import quantize_to_dir
from pagoda.engine import LLM, SamplingParams
from pagoda.engine.quantization.linear import QuantizedLinear
from tests.quant_kinds import assert_kinds
from tests.tiny_models import make_tiny_model
from tests.unit.test_quantize_cli import _decompressed, _options

# scheme, method, group -> the served layer kind
CASES = [
    ("W4A16", "rtn", 32, "int4 g32"),
    ("W4A16", "gptq", 32, "int4 g32"),
    ("W4A16_ASYM", "gptq", 32, "int4 g32"),  # zero points: -z * scale is the kernel's bf16 zero, exactly
    ("W8A16", "rtn", None, "int8 per channel"),
    ("W8A8", "smoothquant+rtn", None, "w8a8 int8 (fbgemm)"),
    ("FP8_DYNAMIC", None, None, "fp8"),
    ("2:4", "magnitude", None, None),  # sparsity only: served dense
]
PARTS = {"qkv_proj": ("self_attn", ["q_proj", "k_proj", "v_proj"]), "o_proj": ("self_attn", ["o_proj"]),
         "gate_up_proj": ("mlp", ["gate_proj", "up_proj"]), "down_proj": ("mlp", ["down_proj"])}  # fmt: skip


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("tiny") / "qwen3"
    make_tiny_model("qwen3", path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # microseconds of work per matmul: a second thread only waits
    yield path
    torch.set_num_threads(threads)


@pytest.mark.parametrize(("scheme", "method", "group", "kind"), CASES)
def test_quantized_checkpoint_is_served_with_its_exact_weights(
    source: Path,
    tmp_path: Path,
    scheme: str,
    method: str | None,
    group: int | None,
    kind: str | None,
    kernels: str,
) -> None:
    quantize_to_dir(_options(source, tmp_path, scheme, method, group), progress=False)
    _, stored, decompressed = _decompressed(tmp_path)
    llm = LLM(str(tmp_path), dtype="float32", kv_cache_memory=1 << 22, max_model_len=128)
    model = llm.engine.model
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    if kind is None:
        assert not layers and llm.engine.quantization in ("none", "compressed-tensors")
        w = model.layers[0].mlp.down_proj.weight.detach()
        assert torch.equal(w, stored["model.layers.0.mlp.down_proj.weight"].float())  # the pruned weights
    else:
        assert llm.engine.quantization == "compressed-tensors"
        assert len(layers) == 2 * 4
        assert_kinds(layers, {kind})
        for i in range(2):
            for fused, (block, parts) in PARTS.items():
                served = getattr(getattr(model.layers[i], block), fused).dequantized_weight()
                want = torch.cat([decompressed[f"model.layers.{i}.{block}.{p}.f32"] for p in parts])
                assert torch.equal(served, want), (i, fused)
    out = llm.generate(
        [[1, 2, 3, 4]], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True), use_tqdm=False
    )
    assert len(out[0].outputs[0].token_ids) == 3

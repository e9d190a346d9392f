"""Quantized Hugging Face checkpoints are served quantized: compressed-tensors (written by the
library's own compressors), GPTQ and AWQ (packed by the formats' rules) give the outputs of an fp32
model holding the weights dequantized by the reference (the library, or the format's formula)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from compressed_tensors.quantization import QuantizationScheme

from pagoda.engine import LLM, SamplingParams
from pagoda.engine.llm import make_engine_config
from pagoda.engine.loader import Checkpoint, load_checkpoint
from pagoda.engine.quantization.linear import QuantizedLinear
from tests.quant_kinds import assert_kinds
from tests.tiny_models import VOCAB, make_tiny_model
from tests.unit.test_quantized_formats import (
    CT_VARIANTS,
    LINEARS,
    awq_linear,
    ct_compress,
    ct_config,
    gptq_linear,
    quantized_state,
    write_checkpoint,
)

State = dict[str, torch.Tensor]
PROMPTS = [[256, *range(40, 70)], [256, 7, 8, 9]]
COMMON = dict(dtype="float32", kv_cache_memory=1 << 22, max_model_len=256)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, State]:
    path = tmp_path_factory.mktemp("tiny")
    _, state = make_tiny_model("llama", path, dtype=torch.bfloat16, num_layers=1)
    return path, state


def _first_distributions(llm: LLM) -> list[torch.Tensor]:
    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=VOCAB, ignore_eos=True)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    dists = []
    for res in outs:
        lp = res.outputs[0].logprobs
        assert lp is not None
        dists.append(torch.tensor([lp[0].top[t] for t in range(VOCAB)]).exp())
    return dists


def _assert_served_like_reference(path: str, fmt: str, kinds: set[str], expected: State, tv: float) -> None:
    """`kinds`: the layer kinds on torch's kernels; on pagoda's own (the `kernels` fixture) every
    integer layer is a VnniLinear of the same width, named "int4 gN (pagoda VNNI, ...)" (AVX2 on a
    CPU without AVX-512)."""
    served = LLM(path, **COMMON)
    assert served.engine.quantization == fmt
    layers = [m for m in served.engine.model.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 4  # qkv, o, gate_up, down
    assert_kinds(layers, kinds)
    ckpt = load_checkpoint(path)

    def reference_weights():  # type: ignore[no-untyped-def]
        for name, value in ckpt.dense_weights():
            base = name.removesuffix(".weight")
            yield name, expected[base] if base in expected else value

    reference = Checkpoint(ckpt.name, ckpt.arch, ckpt.tokenizer, path, reference_weights)
    dense = LLM(config=make_engine_config(path, **COMMON), checkpoint=reference)
    for got, want in zip(_first_distributions(served), _first_distributions(dense), strict=True):
        assert (got - want).abs().sum() < tv  # total variation


# variant -> (layer kind on torch's kernels, total variation bound): weight-only layers multiply
# by the same weights in bf16 activations (measured ~3e-3), or int8 ones per block of inputs on
# pagoda's kernels; W8A8 and FP8 quantize activations per token (~1e-2); a wrong zero point
# gives ~0.8
SERVED_CT = {
    "w4a16_group32": ({"int4 g32"}, 0.02),
    "w8a16_channel": ({"int8 per channel"}, 0.02),
    "w8a8_int8": ({"w8a8 int8 (fbgemm)"}, 0.05),
    "fp8_dynamic_channel": ({"fp8"}, 0.05),
}


@pytest.mark.parametrize("variant", list(SERVED_CT))
def test_compressed_tensors_served(
    variant: str, tiny: tuple[Path, State], tmp_path: Path, kernels: str
) -> None:
    base, state = tiny
    fmt, weights, acts, _ = CT_VARIANTS[variant]
    scheme = QuantizationScheme(targets=["Linear"], weights=weights, input_activations=acts)
    compressed, _, ref32 = ct_compress(state, fmt, scheme)
    path = write_checkpoint(tmp_path / variant, base, [compressed], ct_config(fmt, scheme))
    kinds, tv = SERVED_CT[variant]
    _assert_served_like_reference(
        path, "compressed-tensors", kinds, {k: v.float() for k, v in ref32.items()}, tv
    )


def test_gptq_and_awq_served(tiny: tuple[Path, State], tmp_path: Path, kernels: str) -> None:
    base, state = tiny
    cfg = dict(bits=4, group_size=32, sym=False, desc_act=False, checkpoint_format="gptq")
    stored, expected = quantized_state(state, lambda o, i, g: gptq_linear(o, i, cfg, g))
    path = write_checkpoint(tmp_path / "gptq", base, [stored], {"quant_method": "gptq", **cfg})
    _assert_served_like_reference(path, "gptq", {"int4 g32"}, expected, 0.02)
    stored, expected = quantized_state(state, lambda o, i, g: awq_linear(o, i, 32, g))
    awq = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"}
    path = write_checkpoint(tmp_path / "awq", base, [stored], awq)
    _assert_served_like_reference(path, "awq", {"int4 g32"}, expected, 0.02)
    assert set(LINEARS) >= set(expected)

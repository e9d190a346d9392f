"""The engine with `--attention-backend triton` (kernels under the interpreter on CPU) gives the
torch backend's greedy tokens on a 2-layer model, with chunked prefill and prefix-cache hits; and
so on models with sliding windows (Mistral) and soft-capped, alternating local/global attention
(Gemma 2), on prompts that outgrow the window."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from pagoda.engine.llm import LLM
from pagoda.engine.loader import load_checkpoint
from pagoda.engine.runner.attention import TritonAttention, get_backend
from pagoda.engine.sampling.params import SamplingParams
from tests.kernels import DEV
from tests.tiny_models import VOCAB, WINDOW, make_tiny_model

BASE = [256, *range(40, 75)]  # 36 tokens: two full blocks of 16 and a partial one
PROMPTS = [
    [*BASE[:33], 5, 6, 7],  # shares BASE's first two blocks: a prefix-cache hit
    [256],  # a one-token prompt
    [256, *range(100, 117)],  # 18 tokens: one past a block boundary
    BASE,  # all of it cached but the last token
]
PARAMS = SamplingParams(max_tokens=4, temperature=0.0, logprobs=5, ignore_eos=True)


def _run(path: Path, backend: str, budget: int) -> tuple[list[list[int]], list[Any], list[int]]:
    llm = LLM(
        str(path),
        dtype="float32",
        kv_cache_memory=1 << 21,
        max_model_len=128,
        max_num_batched_tokens=budget,
        block_size=16,
        attention_backend=backend,
    )
    assert llm.engine.runner.backend.name == backend
    llm.generate([BASE], SamplingParams(max_tokens=1), use_tqdm=False)  # fills the prefix cache
    results = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    return (
        [r.outputs[0].token_ids for r in results],
        [r.outputs[0].logprobs for r in results],
        [r.num_cached_tokens for r in results],
    )


def _check_equal(path: Path) -> None:
    want, want_lp, _ = _run(path, "torch", 2048)
    got, got_lp, cached = _run(path, "triton", 8)  # chunks of at most 8 tokens
    assert got == want
    assert cached[0] >= 32 and cached[3] >= 32, f"expected prefix-cache hits, got {cached}"
    for g, w in zip(got_lp, want_lp, strict=True):
        for a, b in zip(g, w, strict=True):
            assert a.top.keys() == b.top.keys()
            for tok in a.top:
                assert abs(a.top[tok] - b.top[tok]) < 1e-4
    assert all(0 <= t < VOCAB for seq in got for t in seq)


@pytest.mark.slow
def test_triton_backend_greedy_equals_torch(tmp_path: Path) -> None:
    make_tiny_model("llama3", tmp_path)  # GQA ratio 2, head_dim 16, Llama-3 rope scaling
    _check_equal(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mistral", "gemma2"])
def test_triton_local_attention_equals_torch(kind: str, tmp_path: Path) -> None:
    """Mistral with a window of WINDOW tokens on every layer; Gemma 2 with WINDOW on its even
    layers, full attention on the odd ones, attention scores soft-capped at 2.0. The prompts (up to
    36 tokens, prefill chunks of 8) outgrow the window; decodes read past it."""
    make_tiny_model(kind, tmp_path)
    if kind == "mistral":  # the tiny Mistral has no window: give it one
        config = json.loads((tmp_path / "config.json").read_text())
        (tmp_path / "config.json").write_text(json.dumps({**config, "sliding_window": WINDOW}))
    arch = load_checkpoint(str(tmp_path)).arch
    windows = [arch.layer_window(i, 128) for i in range(arch.num_layers)]
    assert windows == ([WINDOW, WINDOW] if kind == "mistral" else [WINDOW, None]), windows
    assert (arch.attn_logit_softcap is not None) == (kind == "gemma2")
    _check_equal(tmp_path)


def test_triton_layers_are_switched_on(tmp_path: Path) -> None:
    make_tiny_model("llama", tmp_path)
    llm = LLM(str(tmp_path), dtype="float32", kv_cache_memory=1 << 20, attention_backend="triton")
    model = llm.engine.model
    assert (
        model.layers[0].mlp.use_triton and model.norm.use_triton and model.layers[0].self_attn.rope.use_triton
    )
    llm = LLM(str(tmp_path), dtype="float32", kv_cache_memory=1 << 20, attention_backend="torch")
    assert not llm.engine.model.norm.use_triton


def test_backend_choice_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    assert get_backend("auto", cpu).name == "torch"  # auto takes Triton only on a GPU
    # a GPU, or the CPU with the interpreter on (tests/conftest.py turns it on where no GPU is)
    assert isinstance(get_backend("triton", DEV), TritonAttention)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="use --attention-backend torch"):
        get_backend("triton", cpu)

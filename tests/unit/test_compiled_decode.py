"""`--compile`: decode-only steps through torch.compile give the eager engine's tokens, with two
compiles (batch 1, larger batches) for every context length."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pagoda.engine.config import EngineConfig
from pagoda.engine.llm import LLM
from pagoda.engine.sampling.params import SamplingParams
from tests.tiny_models import make_tiny_model

PROMPTS = [
    [256, 5, 9, 200, 17],  # 5 tokens: one block until the 12th new token
    [256, *range(40, 70)],  # 31 tokens: two blocks, a third during decode
    [256, *range(100, 118)],
]
NEW = 16


def _llm(path: Path, **kw: object) -> LLM:
    return LLM(str(path), dtype="float32", kv_cache_memory=1 << 22, max_model_len=256, block_size=16, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama", "qwen3"])  # rotary on q and k together / per-head q-k norms
def test_compiled_decode_matches_eager(tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # a fresh compile: cache entries of other runs may carry their own shape guards
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    make_tiny_model(kind, tmp_path)
    params = SamplingParams(max_tokens=NEW, temperature=0.0, logprobs=3, ignore_eos=True)
    eager = _llm(tmp_path).generate(PROMPTS, params, use_tqdm=False)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    llm = _llm(tmp_path, compile=True)
    compiled = llm.engine.runner.compiled
    assert compiled is not None and compiled.num_calls == 2  # warmed up: batch 1 and 2
    got = llm.generate(PROMPTS[:1], params, use_tqdm=False)  # batch 1, one KV block
    got += llm.generate(PROMPTS[1:], params, use_tqdm=False)  # batch 2, 2-3 blocks
    assert compiled.num_calls >= 2 + 2 * NEW - 3
    for e, g in zip(eager, got, strict=True):
        assert g.outputs[0].token_ids == e.outputs[0].token_ids
        assert e.outputs[0].logprobs is not None and g.outputs[0].logprobs is not None
        for le, lg in zip(e.outputs[0].logprobs, g.outputs[0].logprobs, strict=True):
            assert lg.logprob == pytest.approx(le.logprob, abs=1e-4)
    # one graph for batch 1, one for larger batches (both from the warm-up), for every context
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2


def test_compile_needs_the_torch_backend() -> None:
    with pytest.raises(ValueError, match="--compile runs on the CPU with the torch attention backend"):
        EngineConfig(compile=True, attention_backend="triton")


def test_compile_with_int8_is_a_clear_error() -> None:
    """fbgemm's packed int8 weights are opaque to dynamo: the flags are refused before loading."""
    with pytest.raises(ValueError, match="--compile cannot trace --quantization int8"):
        EngineConfig(compile=True, quantization="int8")


def test_compile_flag_reaches_the_config() -> None:
    from pagoda.engine.engine_args import engine_config_from_args
    from pagoda.services.cli.parser import build_parser

    args = build_parser().parse_args(["serve", "--compile", "--quantization", "int4"])
    assert engine_config_from_args(args).compile
    assert not engine_config_from_args(build_parser().parse_args(["serve"])).compile

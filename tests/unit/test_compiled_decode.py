"""`--compile`: decode-only steps through two compiled graphs (batch 1, larger batches) for every
context length and KV pool size give the eager engine's tokens, whether compiled in this process,
loaded from the saved graphs or compiled in the background while the engine serves eagerly."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import pytest
import torch

from pagoda.engine import llm as llm_module
from pagoda.engine.config import EngineConfig
from pagoda.engine.core.engine_core import EngineCore
from pagoda.engine.llm import LLM
from pagoda.engine.outputs import RequestOutput
from pagoda.engine.runner.compile_cache import graph_key
from pagoda.engine.runner.compiled_decode import CompiledDecode
from pagoda.engine.sampling.params import SamplingParams
from tests.tiny_models import make_tiny_model

PROMPTS = [
    [256, 5, 9, 200, 17],  # 5 tokens: one block until the 12th new token
    [256, *range(40, 70)],  # 31 tokens: two blocks, a third during decode
    [256, *range(100, 118)],
]
NEW = 16


def _llm(path: Path, **kw: object) -> LLM:
    kw = {"kv_cache_memory": 1 << 22, **kw}
    return LLM(str(path), dtype="float32", max_model_len=256, block_size=16, **kw)


def _matches(eager: list[RequestOutput], got: list[RequestOutput]) -> None:
    for e, g in zip(eager, got, strict=True):
        assert g.outputs[0].token_ids == e.outputs[0].token_ids
        assert e.outputs[0].logprobs is not None and g.outputs[0].logprobs is not None
        for le, lg in zip(e.outputs[0].logprobs, g.outputs[0].logprobs, strict=True):
            assert lg.logprob == pytest.approx(le.logprob, abs=1e-4)


@pytest.mark.slow
# per-head q-k norms / Gemma 2's sliding window and soft-caps (the Llama path, rotary on q and k
# together, is compiled on the demo by test_gguf_served_quantized and test_perf_config_parity)
@pytest.mark.parametrize("kind", ["qwen3", "gemma2"])
def test_compiled_decode_matches_eager(tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Compiled (--compile on), then loaded from the saved graphs by a second engine with another
    KV pool size: the eager engine's tokens and log-probs either way."""
    monkeypatch.setenv("PAGODA_COMPILE_CACHE", str(tmp_path / "compiled"))
    # one layer has Qwen 3's q-k norms; Gemma 2 alternates sliding and global layers: two
    make_tiny_model(kind, tmp_path, num_layers=2 if kind == "gemma2" else 1)
    params = SamplingParams(max_tokens=NEW, temperature=0.0, logprobs=3, ignore_eos=True)
    eager = _llm(tmp_path).generate(PROMPTS, params, use_tqdm=False)
    llm = _llm(tmp_path, compile="on")
    compiled = llm.engine.runner.compiled
    assert compiled is not None and compiled.ready and compiled.num_calls == 0
    got = llm.generate(PROMPTS[:1], params, use_tqdm=False)  # batch 1, one KV block
    got += llm.generate(PROMPTS[1:], params, use_tqdm=False)  # batch 2, 2-3 blocks
    assert compiled.num_calls >= 2 * (NEW - 1)  # every decode step of both calls ran a graph
    _matches(eager, got)
    saved = list((tmp_path / "compiled").glob("*/decode-*.bin"))
    assert len(saved) == 2, saved

    def no_compile(self: CompiledDecode) -> float:
        raise AssertionError("compiled again instead of loading the saved graphs")

    monkeypatch.setattr(CompiledDecode, "compile", no_compile)
    loaded = _llm(tmp_path, compile="on", kv_cache_memory=1 << 21)  # half the blocks
    assert loaded.engine.runner.compiled is not None and loaded.engine.runner.compiled.ready
    assert loaded.engine.num_blocks != llm.engine.num_blocks
    _matches(eager, loaded.generate(PROMPTS, params, use_tqdm=False))
    assert loaded.engine.runner.compiled.num_calls >= NEW - 1


@pytest.mark.slow
def test_auto_serves_eagerly_until_the_background_compile_lands(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    request: pytest.FixtureRequest,
) -> None:
    """--compile auto with nothing saved: the first steps run eagerly at once while another
    process compiles; its graphs are then adopted between steps, and give the eager tokens.
    Then one of the graphs it saved is truncated (a full disk, a killed write by another tool): the
    next engine deletes it, compiles again and saves, and still gives the eager tokens (one test:
    the background compile's graphs are the ones to break: one compile fewer, ~30 s on 2 cores)."""
    monkeypatch.setenv("PAGODA_COMPILE_CACHE", str(tmp_path / "compiled"))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    make_tiny_model("llama", tmp_path, num_layers=1)
    params = SamplingParams(max_tokens=NEW, temperature=0.0, logprobs=3, ignore_eos=True)
    eager = _llm(tmp_path).generate(PROMPTS, params, use_tqdm=False)
    # a server with --threads 1: the background compile must build its graphs for (and key them
    # by) one thread too, or it refuses them as another model's (exit 3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    # as the server builds its engine (AsyncEngine.from_config); an LLM would compile first
    monkeypatch.setattr(llm_module, "EngineCore", functools.partial(EngineCore, background_compile=True))
    with caplog.at_level(logging.INFO, logger="pagoda.engine.runner.compile_cache"):
        llm = _llm(tmp_path, compile="auto")
        runner = llm.engine.runner
        assert runner.compiled is not None and runner.compiler is not None
        first = llm.generate(PROMPTS, params, use_tqdm=False)  # ~0.1 s: long before the compile ends
        assert not runner.compiled.ready and runner.compiled.num_calls == 0
        _matches(eager, first)
        job = runner.compiler._job
        assert job is not None
        assert job.proc.wait(timeout=240) == 0, job.log.read_text()
        got = llm.generate(PROMPTS, params, use_tqdm=False)
    assert runner.compiled.ready and runner.compiled.num_calls >= NEW - 1
    _matches(eager, got)
    assert "eager until a background compile" in caplog.text
    assert "compiled graphs now" in caplog.text

    monkeypatch.setattr(llm_module, "EngineCore", EngineCore)
    saved = sorted((tmp_path / "compiled").glob("*/decode-*.bin"))
    assert len(saved) == 2
    saved[0].write_bytes(saved[0].read_bytes()[:100])
    compiles = []
    real = CompiledDecode.compile
    monkeypatch.setattr(CompiledDecode, "compile", lambda self: compiles.append(1) or real(self))
    with caplog.at_level(logging.WARNING, logger="pagoda.engine.runner.compile_cache"):
        again = _llm(tmp_path, compile="on")
    assert "do not load" in caplog.text and compiles == [1]
    assert saved[0].stat().st_size > 100  # saved again
    assert again.engine.runner.compiled is not None and again.engine.runner.compiled.ready
    _matches(eager, again.generate(PROMPTS, params, use_tqdm=False))
    assert again.engine.runner.compiled.num_calls >= NEW - 1


def test_compile_needs_the_torch_backend() -> None:
    with pytest.raises(ValueError, match="--compile runs on the CPU with the torch attention backend"):
        EngineConfig(compile=True, attention_backend="triton")


def test_compile_with_int8_is_a_clear_error() -> None:
    """fbgemm's packed int8 weights are opaque to dynamo: the flags are refused before loading."""
    with pytest.raises(ValueError, match="--compile cannot trace --quantization int8"):
        EngineConfig(compile=True, quantization="int8")


def test_compile_flag_reaches_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI compiles by default (auto); bare --compile waits for it; --enforce-eager is off."""
    from pagoda.engine.engine_args import engine_config_from_args
    from pagoda.services.cli.parser import build_parser

    monkeypatch.delenv("PAGODA_COMPILE", raising=False)

    def mode(*argv: str) -> str:
        return engine_config_from_args(build_parser().parse_args(["serve", *argv])).compile

    assert mode() == "auto"
    assert mode("--compile", "--quantization", "int4") == "on"
    assert mode("--compile", "off") == "off"
    assert mode("--enforce-eager") == "off"
    monkeypatch.setenv("PAGODA_COMPILE", "off")
    assert mode() == "off"
    assert EngineConfig().compile == "off" and EngineConfig(compile=True).compile == "on"
    with pytest.raises(ValueError, match="compile must be auto, on or off"):
        EngineConfig(compile="sometimes")


def test_an_unwritable_cache_leaves_a_server_eager(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """--compile auto where the cache cannot be written: a warning, eager steps, no failed start."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("PAGODA_COMPILE_CACHE", str(blocker / "compiled"))
    make_tiny_model("llama", tmp_path, num_layers=1)
    monkeypatch.setattr(llm_module, "EngineCore", functools.partial(EngineCore, background_compile=True))
    with caplog.at_level(logging.WARNING, logger="pagoda.engine.runner.compile_cache"):
        llm = _llm(tmp_path, compile="auto")
    assert "decode steps stay eager: cannot compile into" in caplog.text
    runner = llm.engine.runner
    assert runner.compiled is not None and not runner.compiled.ready and runner.compiler is not None
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    (out,) = llm.generate(PROMPTS[:1], params, use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 4 and runner.compiled.num_calls == 0


def test_the_graphs_are_keyed_by_the_thread_count() -> None:
    """Inductor writes the intra-op thread count into its C++ (`num_threads(N)`): graphs saved by
    a server with another --threads are not this server's."""
    model = torch.nn.Linear(4, 4)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = graph_key(model, 16)
        torch.set_num_threads(2)
        assert graph_key(model, 16) != one
        torch.set_num_threads(1)
        assert graph_key(model, 16) == one
    finally:
        torch.set_num_threads(threads)

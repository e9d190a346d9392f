"""Multi-LoRA through the whole engine: a batch mixing four PEFT adapters (different ranks,
targets, rsLoRA, one layer only) and the base model matches HF + PEFT per sequence (fp32), also
when the adapters outnumber the slots; int8 bases; prefix caching per adapter; loading and
unloading while requests run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from pagoda.engine.llm import LLM
from pagoda.engine.lora.request import LoRARequest
from pagoda.engine.runner.compiled_decode import CompiledDecode
from pagoda.engine.sampling.params import SamplingParams
from tests.lora_adapters import ADAPTERS, make_adapter, peft_greedy
from tests.tiny_models import make_tiny_model
from tests.unit.test_native_kernels import needs_kernels

NEW = 6
PROMPTS = [
    [256, *range(40, 60)],  # 21 tokens: more than a block of 16
    [256, 5, 9, 200, 17],
    [256, *range(100, 110)],
    [256, 33, 34, 35],
    [256, *range(70, 95)],
    [256, 7, 7, 7, 7, 7, 7],
]
MIX: list[str | None] = ["qv8", None, "all4", "mlp16", "ku2", "qv8"]  # one per prompt


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path], list[Any]]:
    """(model dir, adapter dirs, HF + PEFT's (tokens, log-probs) per prompt of MIX)."""
    root = tmp_path_factory.mktemp("lora")
    hf, _ = make_tiny_model("llama", root / "model")
    adapters = {name: root / name for name in ADAPTERS}
    for seed, (name, path) in enumerate(adapters.items()):
        make_adapter(hf, path, name, seed)
    refs = [peft_greedy(hf, adapters[a] if a else None, p, NEW) for p, a in zip(PROMPTS, MIX, strict=True)]
    for prompt, lora, (tokens, _) in zip(PROMPTS, MIX, refs, strict=True):
        assert lora is None or peft_greedy(hf, None, prompt, NEW)[0] != tokens, f"{lora} changes nothing"
    return root / "model", adapters, refs


def _llm(model: Path, **kwargs: Any) -> LLM:
    args = dict(dtype="float32", kv_cache_memory=1 << 22, max_model_len=256, block_size=16, max_lora_rank=16)
    return LLM(str(model), enable_lora=True, **{**args, **kwargs})


def _generate(llm: LLM, adapters: dict[str, Path], mix: list[str | None] = MIX) -> list[Any]:
    loras = {name: LoRARequest(name, i + 1, str(path)) for i, (name, path) in enumerate(adapters.items())}
    params = SamplingParams(max_tokens=NEW, temperature=0.0, logprobs=0, ignore_eos=True)
    res = llm.generate(PROMPTS, params, use_tqdm=False, lora_request=[loras[a] if a else None for a in mix])
    return [r.outputs[0] for r in res]


@pytest.mark.parametrize(
    ("max_loras", "budget", "path"),
    [
        pytest.param(4, 2048, "native", marks=needs_kernels),
        (4, 2048, "masked"),
        (4, 2048, "segments"),
        pytest.param(2, 8, "native", marks=needs_kernels),
        (2, 8, "masked"),
        (4, 2048, "sgmv"),
    ],
    ids=[
        "4-slots",
        "4-slots-torch",
        "4-slots-per-segment",
        "2-slots-chunked",
        "2-slots-torch",
        "4-slots-triton",
    ],
)
def test_mixed_adapters_match_peft(
    tiny: Any, max_loras: int, budget: int, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Greedy tokens equal and log-probs within 1e-4 of HF + PEFT, per sequence, twice (the second
    time from the prefix cache); on pagoda's CPU kernel, torch's masked path, its per-segment
    path and the GPU's Triton kernels (under the interpreter on a CPU-only machine); with 2 slots for
    4 adapters, sequences wait for a slot (never more than 2 adapters in a step) and adapters are
    evicted and loaded again."""
    if path in ("masked", "segments"):
        monkeypatch.setattr("pagoda.engine.lora.layers.use_native", lambda device, dtype: False)
    if path == "segments":
        monkeypatch.setattr("pagoda.engine.lora.layers.MASKED_MAX_ROW_SLOTS", 0)
    if path == "sgmv":
        monkeypatch.setattr("pagoda.engine.lora.layers.use_sgmv", lambda device: True)
    model, adapters, refs = tiny
    llm = _llm(model, max_loras=max_loras, max_cpu_loras=4, max_num_batched_tokens=budget)
    manager = llm.engine.lora
    assert manager is not None
    per_step: list[int] = []
    paths: set[str] = set()
    prepare = manager.prepare_step

    def spy(loras: Any, lens: Any, running: set[int]) -> Any:
        per_step.append(len({lo.lora_int_id for lo in loras if lo is not None}))
        step = prepare(loras, lens, running)
        if step is not None:
            kinds = {"native": step.row_slot, "masked": step.mask, "sgmv": step.seg_tensors}
            paths.add(next((k for k, v in kinds.items() if v is not None), "segments"))
        return step

    manager.prepare_step = spy  # type: ignore[method-assign]
    for _ in range(2):
        outs = _generate(llm, adapters)
        for out, (tokens, lps), lora in zip(outs, refs, MIX, strict=True):
            assert out.token_ids == tokens, lora
            got = torch.tensor([lp.logprob for lp in out.logprobs])
            torch.testing.assert_close(got, torch.tensor(lps), atol=1e-4, rtol=0)
    assert llm.engine.kv.hit_tokens > 0
    assert path in paths and paths <= {path, "segments"}  # chunks of many rows take the segments
    assert max(per_step) == max_loras
    if max_loras == 2:
        assert manager.num_slot_loads > len(ADAPTERS)  # evicted and loaded again
    else:
        assert manager.num_slot_loads == len(ADAPTERS)


@needs_kernels
def test_compiled_decode_steps_run_the_adapters(
    tiny: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--compile with adapters: the decode graphs, compiled before any adapter is loaded, run each
    row's adapter (HF + PEFT's tokens and log-probs for the mixed batch), also when a second engine
    loads them from disk; decode steps of the base model alone run the same graphs."""
    monkeypatch.setenv("PAGODA_COMPILE_CACHE", str(tmp_path))
    model, adapters, refs = tiny
    for loaded in (False, True):
        if loaded:  # the saved graphs, not a second compile
            monkeypatch.setattr(CompiledDecode, "compile", lambda self: pytest.fail("compiled again"))
        llm = _llm(model, max_loras=4, max_cpu_loras=4, compile="on")
        compiled = llm.engine.runner.compiled
        assert compiled is not None and compiled.ready and compiled.lora_ctx is not None
        outs = _generate(llm, adapters)
        assert compiled.num_calls >= NEW - 1  # the decode steps ran the graphs
        for out, (tokens, lps), lora in zip(outs, refs, MIX, strict=True):
            assert out.token_ids == tokens, (loaded, lora)
            got = torch.tensor([lp.logprob for lp in out.logprobs])
            torch.testing.assert_close(got, torch.tensor(lps), atol=1e-4, rtol=0)
    calls = compiled.num_calls
    base = _generate(llm, adapters, [None] * len(MIX))
    assert compiled.num_calls > calls
    assert base[1].token_ids == refs[1][0]


def test_int8_base_with_adapters(tiny: Any) -> None:
    """Adapters over int8 linears: the adapter rows add the same delta over any base (the wrapper
    adds to whatever the base linear returns), so the check is the int8 model's own: each sequence
    of the mixed batch equals that sequence run alone (the int8 path quantizes each row by itself),
    and its first token's log-prob is within 0.05 of HF + PEFT's (int8's ~1% error per matmul
    on this random model; the dense path's own bound is the 1e-4 above)."""
    model, adapters, refs = tiny
    llm = _llm(model, max_loras=4, max_cpu_loras=4, quantization="int8")
    mixed = _generate(llm, adapters)
    for i, lora in enumerate(MIX):
        alone = LLM.generate(
            llm,
            [PROMPTS[i]],
            SamplingParams(max_tokens=NEW, temperature=0.0, logprobs=0, ignore_eos=True),
            use_tqdm=False,
            lora_request=llm.engine.lora.registry[lora] if lora else None,  # type: ignore[union-attr]
        )[0].outputs[0]
        assert mixed[i].token_ids == alone.token_ids, lora
        got = [lp.logprob for lp in mixed[i].logprobs]
        want = [lp.logprob for lp in alone.logprobs]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-5, rtol=0)
        assert abs(got[0] - refs[i][1][0]) < 0.05, (lora, got[0], refs[i][1][0])


def test_prefix_cache_is_per_adapter(tiny: Any) -> None:
    """A prompt's blocks computed under one adapter are reused by that adapter only."""
    model, adapters, _ = tiny
    llm = _llm(model, max_loras=2, max_cpu_loras=4)
    a = llm.engine.load_lora("qv8", str(adapters["qv8"]))
    b = llm.engine.load_lora("all4", str(adapters["all4"]))
    prompt = [256, *range(1, 40)]  # two full blocks
    params = SamplingParams(max_tokens=1, temperature=0.0)

    def cached(lora: LoRARequest | None) -> int:
        return llm.generate([prompt], params, use_tqdm=False, lora_request=lora)[0].num_cached_tokens

    assert [cached(a), cached(b), cached(None), cached(a), cached(b), cached(None)] == [0, 0, 0, 32, 32, 32]


async def test_load_and_unload_while_requests_run(tiny: Any) -> None:
    """Adapters loaded and unloaded between steps lose no request: those holding an unloaded
    adapter finish with it (HF + PEFT's tokens), new ones naming it are refused, and a name loaded
    again with other weights does not reuse the old weights' cached blocks."""
    from pagoda.engine.core.async_engine import AsyncEngine

    model, adapters, refs = tiny
    engine = AsyncEngine(_llm(model, max_loras=2, max_cpu_loras=2, max_num_seqs=4).engine)
    for name in ("qv8", "all4"):
        await engine.load_lora(name, str(adapters[name]))
    params = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)
    streams = [
        engine.add_request(f"r{i}", PROMPTS[i], params, lora_name=MIX[i])
        for i in (0, 1, 2, 5)  # qv8, base, all4, qv8
    ]

    async def collect(stream: Any) -> list[int]:
        return [t async for out in stream for t in out.new_token_ids]

    import asyncio

    tasks = [asyncio.ensure_future(collect(s)) for s in streams]
    await asyncio.sleep(0)
    assert await engine.unload_lora("qv8") is True  # r0 and r5 hold it
    await engine.load_lora("mlp16", str(adapters["mlp16"]))
    assert engine.list_loras() == ["all4", "mlp16"]
    late = asyncio.ensure_future(collect(engine.add_request("late", PROMPTS[3], params, lora_name="mlp16")))
    outs = await asyncio.gather(*tasks, late)
    assert outs == [refs[0][0], refs[1][0], refs[2][0], refs[5][0], refs[3][0]]
    with pytest.raises(ValueError, match="unknown LoRA adapter 'qv8'"):
        await collect(engine.add_request("gone", PROMPTS[0], params, lora_name="qv8"))
    assert await engine.unload_lora("all4") and not await engine.unload_lora("all4")
    await engine.load_lora("all4", str(adapters["ku2"]))  # the name again, other weights
    again = await collect(engine.add_request("again", PROMPTS[4], params, lora_name="all4"))
    assert again == refs[4][0]  # ku2's tokens, no block of the old all4 reused
    manager = engine.core.lora  # type: ignore[attr-defined]
    assert not manager._retired and not manager._users  # qv8 dropped once its requests ended
    await engine.shutdown()


def test_adapters_the_engine_cannot_take_are_refused(tiny: Any) -> None:
    model, adapters, _ = tiny
    llm = _llm(model, max_lora_rank=8, max_loras=2)
    with pytest.raises(ValueError, match="rank 16, above --max-lora-rank 8"):
        llm.engine.load_lora("mlp16", str(adapters["mlp16"]))
    with pytest.raises(ValueError, match=r"unknown LoRA adapter 'mlp16' \(loaded: none\)"):
        llm.engine.add_request("r", PROMPTS[1], SamplingParams(), lora_request="mlp16")
    llm.engine.load_lora("qv8", str(adapters["qv8"]))
    with pytest.raises(ValueError, match="named 'qv8' is loaded already"):
        llm.engine.load_lora("qv8", str(adapters["all4"]))
    plain = LLM(str(model), dtype="float32", kv_cache_memory=1 << 22, max_model_len=256)
    with pytest.raises(ValueError, match="start it with --enable-lora"):
        plain.engine.add_request("r", PROMPTS[1], SamplingParams(), lora_request="qv8")

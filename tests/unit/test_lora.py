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
from pagoda.engine.sampling.params import SamplingParams
from tests.lora_adapters import ADAPTERS, make_adapter, peft_greedy
from tests.tiny_models import make_tiny_model

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
    args = dict(dtype="float32", kv_cache_memory=1 << 22, max_model_len=256, block_size=16)
    return LLM(str(model), enable_lora=True, max_lora_rank=16, **{**args, **kwargs})


def _generate(llm: LLM, adapters: dict[str, Path], mix: list[str | None] = MIX) -> list[Any]:
    loras = {name: LoRARequest(name, i + 1, str(path)) for i, (name, path) in enumerate(adapters.items())}
    params = SamplingParams(max_tokens=NEW, temperature=0.0, logprobs=0, ignore_eos=True)
    res = llm.generate(PROMPTS, params, use_tqdm=False, lora_request=[loras[a] if a else None for a in mix])
    return [r.outputs[0] for r in res]


@pytest.mark.parametrize(("max_loras", "budget"), [(4, 2048), (2, 8)], ids=["4-slots", "2-slots-chunked"])
def test_mixed_adapters_match_peft(tiny: Any, max_loras: int, budget: int) -> None:
    """Greedy tokens equal and log-probs within 1e-4 of HF + PEFT, per sequence, twice (the second
    time from the prefix cache); with 2 slots for 4 adapters, sequences wait for a slot (never more
    than 2 adapters in a step) and adapters are evicted and loaded again."""
    model, adapters, refs = tiny
    llm = _llm(model, max_loras=max_loras, max_cpu_loras=4, max_num_batched_tokens=budget)
    manager = llm.engine.lora
    assert manager is not None
    per_step: list[int] = []
    prepare = manager.prepare_step

    def spy(loras: Any, lens: Any, running: set[int]) -> Any:
        per_step.append(len({lo.lora_int_id for lo in loras if lo is not None}))
        return prepare(loras, lens, running)

    manager.prepare_step = spy  # type: ignore[method-assign]
    for _ in range(2):
        outs = _generate(llm, adapters)
        for out, (tokens, lps), lora in zip(outs, refs, MIX, strict=True):
            assert out.token_ids == tokens, lora
            got = torch.tensor([lp.logprob for lp in out.logprobs])
            torch.testing.assert_close(got, torch.tensor(lps), atol=1e-4, rtol=0)
    assert llm.engine.kv.hit_tokens > 0
    assert max(per_step) == max_loras
    if max_loras == 2:
        assert manager.num_slot_loads > len(ADAPTERS)  # evicted and loaded again
    else:
        assert manager.num_slot_loads == len(ADAPTERS)

"""Speculative decoding across ranks on the CPU (gloo), both methods: with 2 tensor-parallel ranks
and with 2 pipeline stages (two micro-batches in flight), greedy output equals one rank's greedy
output without speculation (with prefix-cache hits too), drafts were proposed and some accepted
and some rejected; rank 0 alone proposes (a draft model runs whole on it) and samples; seeded
sampling repeats.

The target is a tiny random Llama of 2 layers (a stage each), the draft that Llama with noise
on its weights: test_spec_draft_model.py's models, prompts and engine settings."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from pagoda.engine import LLM
from pagoda.engine.config import EngineConfig, ParallelConfig
from pagoda.engine.distributed.tensor_parallel import SINGLE
from pagoda.engine.spec_decode.draft_model import DraftModelProposer
from tests.unit.test_spec_draft_model import (
    ENGINE,
    GREEDY,
    PROMPTS,
    K,
    _ids,
    check_seeded_sampling_repeats,
    spec_config,
    target_and_draft,
)
from tests.unit.test_spec_engine import Drafts

NGRAM: dict[str, Any] = {
    "method": "ngram",
    "num_speculative_tokens": K,
    "prompt_lookup_min": 1,
    "prompt_lookup_max": 3,
}
CASES = [("ngram", "tp"), ("ngram", "pp"), ("draft_model", "tp"), ("draft_model", "pp")]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    return target_and_draft(tmp_path_factory.mktemp("spec_parallel"))


@pytest.fixture(scope="module")
def want(models: tuple[str, str]) -> list[list[int]]:
    """One rank's greedy tokens without speculation."""
    return _ids(LLM(models[0], **ENGINE).generate(PROMPTS, GREEDY, use_tqdm=False))


@pytest.fixture(scope="module", params=CASES, ids=["-".join(c) for c in CASES])
def spec(request: pytest.FixtureRequest, models: tuple[str, str]) -> Iterator[LLM]:
    method, split = request.param
    config = NGRAM if method == "ngram" else spec_config(models[1])
    size: dict[str, Any] = {"tensor_parallel_size" if split == "tp" else "pipeline_parallel_size": 2}
    llm = LLM(models[0], speculative_config=config, collective_timeout_s=20.0, **size, **ENGINE)
    try:
        yield llm
    finally:
        llm.engine.close()


def test_greedy_equals_one_rank_without_speculation(spec: LLM, want: list[list[int]]) -> None:
    engine = spec.engine
    before = engine.counters()
    got = _ids(spec.generate(PROMPTS, GREEDY, use_tqdm=False))
    again = spec.generate(PROMPTS, GREEDY, use_tqdm=False)  # the prompts' blocks are cached now
    Drafts.since(before, engine.counters()).assert_some_accepted_and_rejected()
    assert got == want and _ids(again) == want
    assert all(r.num_cached_tokens > 0 for r in again)
    assert engine.parallel is not None and all(p.poll() is None for p in engine.parallel.procs)
    if engine.micro_batches is not None:  # stages: two steps in flight, neither proposing from the other
        assert engine.micro_batches.most_in_flight == 2
    else:
        assert engine.model.tp.size == 2  # type: ignore[union-attr]
    proposer = engine.spec.speculation.proposer  # type: ignore[union-attr]
    if isinstance(proposer, DraftModelProposer):  # the draft runs whole on rank 0
        draft = engine.draft_model
        assert draft is not None and draft.tp is SINGLE and proposer.runner.num_forwards > 0
        assert len(draft.layers) == 2


def test_seeded_sampling_repeats(spec: LLM) -> None:
    check_seeded_sampling_repeats(spec, 12)


def test_the_config_takes_speculation_with_either_split() -> None:
    for par in (ParallelConfig(tensor_parallel_size=2), ParallelConfig(pipeline_parallel_size=2)):
        config = EngineConfig(parallel=par, speculative_config=NGRAM)  # type: ignore[arg-type]
        assert config.speculative_config is not None and config.speculative_config.method == "ngram"

"""Adaptive speculation (pagoda/engine/spec_decode/adaptive.py): a draft at position j is proposed
only while alpha^j clears R / (R + r0), so drafts stop where they would cost more rows than they
save, and come back (by probes) when a sequence starts copying. Run through the batcher with the
fake runner of test_spec_scheduling: outputs stay equal, and the drafts proposed follow the rule."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from pagoda.engine.config import BatcherConfig
from pagoda.engine.kv.kv_cache_manager import KVCacheManager
from pagoda.engine.sampling.params import SamplingParams
from pagoda.engine.scheduling.batcher import Batcher
from pagoda.engine.scheduling.speculation import Speculation
from pagoda.engine.spec_decode import NgramProposer, SpeculativeConfig
from pagoda.engine.spec_decode.adaptive import PROBE_EVERY, AdaptivePolicy, StepCost, drafts_worth
from tests.unit import test_spec_scheduling as harness

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}


def test_drafts_worth_is_the_longest_run_that_clears_the_bar() -> None:
    assert drafts_worth(0.5, 0.2, 4) == 2  # 0.5, 0.25 clear 0.2; 0.125 does not
    assert drafts_worth(0.9, 0.5, 4) == 4  # 0.9^4 = 0.66: every draft pays
    assert drafts_worth(0.9, 0.5, 10) == 6  # 0.9^6 = 0.53, 0.9^7 = 0.48
    assert drafts_worth(0.3, 0.5, 4) == 0
    assert drafts_worth(1.0, 0.99, 3) == 3


def test_step_cost_fits_the_fixed_cost_in_rows() -> None:
    cost = StepCost(prior_fixed_rows=4.0)
    for i in range(40):  # a = 6 ms, b = 1.5 ms: r0 = 4 ... measured as 4, not the prior
        rows = 1 + i % 5
        cost.observe(rows, 0.006 + 0.0015 * rows)
    assert cost.fixed_rows() == pytest.approx(4.0, rel=1e-6)
    slow_rows = StepCost(prior_fixed_rows=4.0)
    for i in range(40):  # a = 2 ms, b = 2 ms: r0 = 1
        slow_rows.observe(1 + i % 5, 0.002 + 0.002 * (1 + i % 5))
    assert slow_rows.fixed_rows() == pytest.approx(1.0, rel=1e-6)
    flat = StepCost(prior_fixed_rows=4.0)
    for _ in range(40):  # one row count only: a and b cannot be told apart
        flat.observe(16, 0.038)
    assert flat.fixed_rows() == 4.0
    young = StepCost(prior_fixed_rows=7.0)
    young.observe(1, 0.01)
    young.observe(5, 0.02)
    assert young.fixed_rows() == 7.0


def test_the_bar_rises_with_the_batch_and_failing_sequences_are_only_probed() -> None:
    policy = AdaptivePolicy(StepCost(prior_fixed_rows=4.0), k=4)
    policy.begin_step(1)
    assert policy.threshold == pytest.approx(0.2)
    assert policy.max_drafts("new") == 4  # the optimistic prior: 0.8^4 = 0.41 >= 0.2
    policy.begin_step(16)
    assert policy.max_drafts("new") == 1  # 0.8 clears 16/20 = 0.8, 0.64 does not
    for _ in range(5):
        policy.observe("bad", drafted=4, accepted=0)
    policy.begin_step(1)
    assert policy.alpha("bad") < 0.2
    granted = [policy.max_drafts("bad") for _ in range(2 * PROBE_EVERY)]
    assert granted.count(1) == 2 and set(granted) == {0, 1}  # a probe every PROBE_EVERY steps
    for _ in range(10):
        policy.observe("good", drafted=4, accepted=4)
    assert policy.max_drafts("good") == 4


def _count_rule(tokens: list[int]) -> int:
    """A rule n-gram lookups find matches for but mostly mispredict: pseudo-random tokens from a
    vocabulary of five, so short n-grams recur but what followed them is right one time in five."""
    return (len(tokens) * 2654435761 >> 11) % 5 + 1


def _copy_rule(tokens: list[int]) -> int:
    """The output repeats the last four tokens forever: lookups find it once it has run a while."""
    return tokens[-4]


def _run(rule: Callable[[list[int]], int], adaptive: bool) -> tuple[dict[str, list[int]], harness.FakeRunner]:
    config = SpeculativeConfig.parse(NGRAM)
    policy = AdaptivePolicy(StepCost(prior_fixed_rows=4.0), k=3) if adaptive else None
    speculation = Speculation(config, NgramProposer.from_config(config, 512), policy)
    batcher = Batcher(
        BatcherConfig(max_num_batched_tokens=64, max_num_seqs=8),
        KVCacheManager(128, block_size=harness.BLOCK),
        max_model_len=512,
        eos_token_ids=[harness.EOS],
        speculation=speculation,
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(harness, "rule", rule)
        return harness._run(batcher, harness.PROMPTS, SamplingParams(max_tokens=60, ignore_eos=True))


def test_drafts_stop_where_they_are_mostly_rejected_and_stay_where_accepted() -> None:
    plain, always = _run(_count_rule, adaptive=False)
    same, adaptive = _run(_count_rule, adaptive=True)
    assert same == plain
    assert always.drafted > 0 and always.accepted < always.drafted / 3  # the rule defeats lookups
    assert adaptive.drafted < always.drafted / 3  # and the policy stopped proposing
    assert adaptive.drafted > 0  # after trying, and probing
    copy_plain, copy_always = _run(_copy_rule, adaptive=False)
    copy_same, copy_adaptive = _run(_copy_rule, adaptive=True)
    assert copy_same == copy_plain
    assert copy_adaptive.accepted >= 0.8 * copy_always.accepted > 0  # copying keeps its drafts

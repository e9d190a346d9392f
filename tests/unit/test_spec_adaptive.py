"""Adaptive speculation (pagoda/engine/spec_decode/adaptive.py): a draft at position j is proposed
only while alpha^j clears R (1 + d) / (R + r0), so drafts stop where they would cost more rows than
they save (d: a timed proposer's own cost per draft, in rows), and come back (by probes) when a
sequence starts copying. Run through the batcher with the fake runner of test_spec_scheduling:
outputs stay equal, and the drafts proposed follow the rule."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest

from pagoda.engine.config import BatcherConfig
from pagoda.engine.kv.kv_cache_manager import KVCacheManager
from pagoda.engine.sampling.params import SamplingParams
from pagoda.engine.scheduling.batcher import Batcher, BatchPlan, RunnerOutput
from pagoda.engine.scheduling.speculation import Speculation
from pagoda.engine.spec_decode import NgramProposer, SpeculativeConfig
from pagoda.engine.spec_decode.adaptive import PROBE_EVERY, AdaptivePolicy, StepCost, drafts_worth
from pagoda.engine.spec_decode.proposer import Proposal
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


def _batcher(speculation: Speculation) -> Batcher:
    return Batcher(
        BatcherConfig(max_num_batched_tokens=64, max_num_seqs=8),
        KVCacheManager(128, block_size=harness.BLOCK),
        max_model_len=512,
        eos_token_ids=[harness.EOS],
        speculation=speculation,
    )


def _run(rule: Callable[[list[int]], int], adaptive: bool) -> tuple[dict[str, list[int]], harness.FakeRunner]:
    config = SpeculativeConfig.parse(NGRAM)
    policy = AdaptivePolicy(StepCost(prior_fixed_rows=4.0), k=3) if adaptive else None
    speculation = Speculation(config, NgramProposer.from_config(config, 512), policy)
    batcher = _batcher(speculation)
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


def _measured(draft_seconds: float) -> AdaptivePolicy:
    """A policy that has timed decode steps of 6 ms + 1.5 ms a row (r0 = 4, b = 1.5 ms) and a
    proposer taking `draft_seconds` per draft token."""
    policy = AdaptivePolicy(StepCost(prior_fixed_rows=4.0), k=4)
    for i in range(40):
        policy.cost.observe(1 + i % 5, 0.006 + 0.0015 * (1 + i % 5))
    if draft_seconds:
        policy.drafting.observe(3 * draft_seconds, 3)
    return policy


def test_a_proposer_s_own_cost_raises_the_bar() -> None:
    assert _measured(0.0).cost.row_seconds() == pytest.approx(0.0015)
    young = AdaptivePolicy(StepCost(prior_fixed_rows=4.0), k=4)
    assert young.cost.row_seconds() is None and young.draft_rows() == 0.0
    young.cost.observe(2, 0.012)  # before the fit: the prior's share, 12 ms / (2 + 4) rows
    assert young.cost.row_seconds() == pytest.approx(0.002)
    granted = []
    for ms, d, bar in ((0.0, 0.0, 0.2), (1.5, 1.0, 0.4), (3.0, 2.0, 0.6), (6.0, 4.0, 1.0)):
        policy = _measured(ms / 1000)
        policy.begin_step(1)
        assert policy.draft_rows() == pytest.approx(d)
        assert policy.threshold == pytest.approx(bar)  # (1 + d) / (1 + r0)
        granted.append(policy.max_drafts("new"))  # the prior alpha, 0.8
    assert granted == [4, 4, 2, 0]  # 0.8^4 = 0.41 clears 0.4; 0.8^2 = 0.64 clears 0.6, 0.51 does not


def _run_timed(draft_seconds: float) -> tuple[dict[str, list[int]], harness.FakeRunner]:
    """The copying rule under the policy, with an n-gram proposer timed as a draft model is: each
    draft token takes `draft_seconds` on a fake clock; each decode step of R rows 6 ms + 1.5 ms R."""
    config = SpeculativeConfig.parse(NGRAM)
    clock = [0.0]

    class Timed(NgramProposer):
        timed = True

        def propose(self, req_ids: Sequence[str], max_tokens: Sequence[int] | None = None) -> Proposal:
            proposal = super().propose(req_ids, max_tokens)
            clock[0] += draft_seconds * proposal.num_draft_tokens
            return proposal

    policy = AdaptivePolicy(StepCost(prior_fixed_rows=4.0), k=3)
    speculation = Speculation(config, Timed.from_config(config, 512), policy)
    speculation.clock = lambda: clock[0]

    class StepTimed(harness.FakeRunner):
        def execute(self, out: BatchPlan) -> RunnerOutput:
            speculation.observe_step(out, 0.006 + 0.0015 * out.total_num_scheduled_tokens)
            return super().execute(out)

    batcher = _batcher(speculation)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(harness, "rule", _copy_rule)
        patch.setattr(harness, "FakeRunner", StepTimed)
        return harness._run(batcher, harness.PROMPTS, SamplingParams(max_tokens=60, ignore_eos=True))


def test_drafts_fall_when_the_proposer_is_expensive() -> None:
    """Copying sequences (alpha ~0.97), R = 3: free drafts clear 3/7; drafts that take a target
    row's time to propose (1.5 ms, d = 1) clear 6/7; at 3 ms (d = 2) the bar passes 1 and only the
    drafts tried before the cost was measured, and probes, are left. The outputs never change."""
    (free_out, free), (costly_out, costly), (dear_out, dear) = (_run_timed(ms / 1000) for ms in (0, 1.5, 3))
    assert free_out == costly_out == dear_out
    assert free.drafted > costly.drafted > dear.drafted > 0, (free.drafted, costly.drafted, dear.drafted)
    assert dear.drafted < free.drafted / 5
    assert free.accepted > 0.9 * free.drafted  # the rule copies: drafts fall for their cost alone

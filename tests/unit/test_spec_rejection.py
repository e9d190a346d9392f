"""The rejection sampler's exact paths: greedy verification against the plain sampler position by
position (penalties counting the accepted drafts), seeded reproducibility and batch independence,
no drafts == the plain sampler, logprobs, metrics. Its distribution: test_spec_rejection_stats.py."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest
import torch

from pagoda.engine.sampling.params import SamplingParams
from pagoda.engine.sampling.sampler import make_generator
from pagoda.engine.spec_decode import RejectionOutput, RejectionSampler, SpecDecodeMetrics
from tests.unit.test_sampler import run

CPU = torch.device("cpu")
EOS = (2,)


def verify(
    logits: torch.Tensor,
    drafts: Sequence[Sequence[int]],
    params: Sequence[SamplingParams],
    draft_probs: torch.Tensor | None = None,
    prompts: Sequence[Sequence[int]] | None = None,
    outputs: Sequence[Sequence[int]] | None = None,
    generators: Sequence[torch.Generator | None] | None = None,
    metrics: SpecDecodeMetrics | None = None,
) -> RejectionOutput:
    n = len(drafts)
    sampler = RejectionSampler(logits.shape[1], EOS, CPU, metrics)
    return sampler(
        logits,
        drafts,
        draft_probs,
        params,
        prompts if prompts is not None else [[]] * n,
        outputs if outputs is not None else [[]] * n,
        generators if generators is not None else [None] * n,
    )


def greedy_reference(
    rows: torch.Tensor, draft: list[int], p: SamplingParams, prompt: list[int], output: list[int]
) -> list[int]:
    """Verification one position at a time with the plain sampler: accept while the draft token is
    what the sampler picks given the output so far (accepted drafts included), then its pick."""
    emitted: list[int] = []
    for j in range(len(draft) + 1):
        pick = run(rows[j : j + 1], [p], [prompt], [output + emitted], eos=EOS).token_ids[0]
        emitted.append(pick)
        if j == len(draft) or pick != draft[j]:
            return emitted
    raise AssertionError("unreachable")


def random_case(seed: int, params: Sequence[SamplingParams], vocab: int = 24, max_k: int = 4) -> tuple:
    """Logits, drafts that follow the reference's picks for a random while (so that some are
    accepted and some rejected), prompts and outputs, for len(params) sequences."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    logits, drafts, prompts, outputs = [], [], [], []
    for p in params:
        k = rng.randint(0, max_k)
        rows = torch.randn(k + 1, vocab) * 2
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(0, 5))]
        output = [rng.randrange(vocab) for _ in range(rng.randint(0, 5))]
        draft: list[int] = []
        for j in range(k):
            pick = run(rows[j : j + 1], [p], [prompt], [output + draft], eos=EOS).token_ids[0]
            draft.append(pick if rng.random() < 0.75 else (pick + rng.randint(1, vocab - 1)) % vocab)
        logits.append(rows)
        drafts.append(draft)
        prompts.append(prompt)
        outputs.append(output)
    return torch.cat(logits), drafts, prompts, outputs


GREEDY_PARAMS = [
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.0, repetition_penalty=1.8),
    SamplingParams(temperature=0.0, frequency_penalty=1.5, presence_penalty=0.5),
    SamplingParams(temperature=0.0, logit_bias={3: 4.0, 5: -3.0}),
    SamplingParams(temperature=0.0, min_tokens=6, frequency_penalty=-1.0),
]


@pytest.mark.parametrize("draft_model", [False, True])
def test_greedy_equals_the_plain_sampler_position_by_position(draft_model: bool) -> None:
    params = GREEDY_PARAMS * 4
    logits, drafts, prompts, outputs = random_case(3, params, vocab=6)  # small: tokens repeat
    probs = None
    if draft_model:  # a draft model's q changes nothing for greedy rows
        probs = torch.rand(sum(len(d) for d in drafts), logits.shape[1]).softmax(-1)
    metrics = SpecDecodeMetrics(num_spec_tokens=4)
    out = verify(logits, drafts, params, probs, prompts, outputs, metrics=metrics)
    starts = [0]
    for d in drafts:
        starts.append(starts[-1] + len(d) + 1)
    for i, (d, p) in enumerate(zip(drafts, params, strict=True)):
        want = greedy_reference(logits[starts[i] : starts[i + 1]], d, p, prompts[i], outputs[i])
        assert out.token_ids[i] == want, (i, p, d)
        assert out.num_accepted[i] == len(want) - 1
    assert 0 < metrics.num_accepted_tokens < metrics.num_draft_tokens  # some accepted, some rejected
    assert metrics.num_draft_tokens == sum(len(d) for d in drafts)
    assert metrics.num_drafts == sum(1 for d in drafts if d)


def test_penalties_count_the_accepted_drafts() -> None:
    """Position 1's logits favour token 3, but token 3 was just accepted at position 0: with a
    frequency penalty of 2 the target picks 4 there, so the second draft 3 is rejected."""
    logits = torch.zeros(3, 8)
    logits[0, 3] = 5.0
    logits[1, 3], logits[1, 4] = 1.5, 1.0
    logits[2, 1] = 1.0
    p = SamplingParams(temperature=0.0, frequency_penalty=2.0)
    assert verify(logits, [[3, 3]], [p]).token_ids == [[3, 4]]
    assert verify(logits, [[3, 3]], [SamplingParams(temperature=0.0)]).token_ids == [[3, 3, 1]]
    # min_tokens: EOS is banned while output + accepted drafts are short of it
    eos_logits = torch.zeros(2, 8)
    eos_logits[:, EOS[0]] = 9.0
    banned = verify(eos_logits, [[5]], [SamplingParams(temperature=0.0, min_tokens=2)], outputs=[[6]])
    assert banned.token_ids[0][0] != EOS[0]
    reached = verify(eos_logits, [[2]], [SamplingParams(temperature=0.0, min_tokens=1)], outputs=[[6]])
    assert reached.token_ids == [[2, 2]]


def seeded_batch(seed: int) -> tuple:
    params = [
        SamplingParams(temperature=1.0, seed=11),
        SamplingParams(temperature=0.8, top_p=0.9, seed=12),
        SamplingParams(temperature=1.2, top_k=5, frequency_penalty=0.5, seed=13),
        SamplingParams(temperature=0.0, seed=14),
        SamplingParams(temperature=1.0),  # unseeded
    ]
    logits, drafts, prompts, outputs = random_case(seed, params, vocab=12, max_k=3)
    probs = (torch.randn(sum(len(d) for d in drafts), 12) * 2).softmax(-1)
    return params, logits, drafts, prompts, outputs, probs


def run_seeded(batch: tuple, rows: list[int]) -> list[list[int]]:
    """The seeded sequences `rows` of the batch, verified together, with fresh generators."""
    params, logits, drafts, prompts, outputs, probs = batch
    starts, dstarts = [0], [0]
    for d in drafts:
        starts.append(starts[-1] + len(d) + 1)
        dstarts.append(dstarts[-1] + len(d))
    pick = [p for i in rows for p in range(starts[i], starts[i + 1])]
    dpick = [p for i in rows for p in range(dstarts[i], dstarts[i + 1])]
    gens = [make_generator(params[i].seed, CPU) for i in rows]
    out = verify(
        logits[pick],
        [drafts[i] for i in rows],
        [params[i] for i in rows],
        probs[dpick],
        [prompts[i] for i in rows],
        [outputs[i] for i in rows],
        gens,
    )
    return out.token_ids


def test_seeded_sequences_reproduce_and_do_not_depend_on_the_batch() -> None:
    for seed in range(5):
        batch = seeded_batch(seed)
        together = run_seeded(batch, [0, 1, 2, 3, 4])
        again = run_seeded(batch, [0, 1, 2, 3, 4])
        assert together[:4] == again[:4]
        for i in range(4):
            assert run_seeded(batch, [i]) == [together[i]], (seed, i)
        assert run_seeded(batch, [2, 0]) == [together[2], together[0]]


def test_without_drafts_it_samples_exactly_as_the_plain_sampler() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 40) * 3
    params = [
        SamplingParams(temperature=t, top_p=tp, min_p=mp, seed=s, presence_penalty=0.7)
        for t, tp, mp, s in [(1.0, 1.0, 0.0, 1), (0.7, 0.8, 0.0, 2), (1.3, 1.0, 0.1, 3), (0.0, 1.0, 0.0, 4)]
    ]
    params += [SamplingParams(temperature=0.9, top_k=3, seed=5), SamplingParams(temperature=0.5, seed=6)]
    outputs = [[1, 2, 3], [], [7, 7], [9], [4], [0, 0, 0]]
    for _ in range(3):
        plain_gens = [make_generator(p.seed, CPU) for p in params]
        spec_gens = [make_generator(p.seed, CPU) for p in params]
        plain = run(logits, params, outputs=outputs, generators=plain_gens).token_ids
        spec = verify(logits, [[]] * 6, params, outputs=outputs, generators=spec_gens).token_ids
        assert spec == [[t] for t in plain]
        logits = logits.roll(1, dims=1)


def test_logprobs_are_the_targets_at_each_emitted_position() -> None:
    logits = torch.zeros(3, 8)
    logits[0, 3], logits[1, 5], logits[2, 6] = 4.0, 3.0, 2.0
    p = SamplingParams(temperature=0.0, logprobs=2, repetition_penalty=1.5)
    out = verify(logits, [[3, 5]], [p], outputs=[[5]])
    assert out.token_ids == [[3, 5, 6]]
    lps = out.logprobs[0]
    assert lps is not None and [lp.token_id for lp in lps] == [3, 5, 6]
    for j, lp in enumerate(lps):  # the plain sampler, row by row, with the accepted prefix as output
        want = run(logits[j : j + 1], [p], outputs=[[5, 3, 5][: j + 1]], eos=EOS).logprobs[0]
        assert want is not None and lp.logprob == pytest.approx(want.logprob, abs=1e-5)
        assert lp.top.keys() == want.top.keys()
    assert verify(logits, [[3, 5]], [SamplingParams(temperature=0.0)]).logprobs == [None]


def test_empty_batch_and_bad_shapes() -> None:
    assert verify(torch.zeros(0, 8), [], []).token_ids == []
    with pytest.raises(AssertionError):
        verify(torch.zeros(2, 8), [[1, 2]], [SamplingParams()])  # 3 rows needed
    with pytest.raises(AssertionError):
        verify(torch.zeros(2, 8), [[9]], [SamplingParams()])  # a draft token outside the vocabulary

"""Batched sampler against straightforward per-row references (float64, Python loops)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pagoda.engine.outputs import TokenLogprob
from pagoda.engine.sampling.params import SamplingParams
from pagoda.engine.sampling.sampler import Sampler, SamplerOutput, make_generator
from pagoda.engine.sampling.sampling_metadata import SamplingMetadata

CPU = torch.device("cpu")
EOS = (2,)
NEG_INF = float("-inf")


def run(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    prompts: Sequence[Sequence[int]] | None = None,
    outputs: Sequence[Sequence[int]] | None = None,
    generators: Sequence[torch.Generator | None] | None = None,
    eos: Sequence[int] = EOS,
) -> SamplerOutput:
    n = len(params)
    meta = SamplingMetadata.build(
        params,
        prompts if prompts is not None else [[] for _ in range(n)],
        outputs if outputs is not None else [[] for _ in range(n)],
        generators if generators is not None else [None] * n,
        vocab_size=logits.shape[1],
        eos_token_ids=eos,
        device=logits.device,
    )
    return Sampler()(logits, meta)


# ---- references ----------------------------------------------------------------------------------


def ref_penalized(
    row: torch.Tensor,
    p: SamplingParams,
    prompt: Sequence[int],
    output: Sequence[int],
    eos: Sequence[int] = EOS,
) -> torch.Tensor:
    x = row.double().clone()
    for tok, bias in (p.logit_bias or {}).items():
        x[tok] += bias
    if len(output) < p.min_tokens:
        for tok in (*eos, *p.stop_token_ids):
            x[tok] = NEG_INF
    if p.repetition_penalty != 1.0:
        for tok in set(prompt) | set(output):
            x[tok] = x[tok] / p.repetition_penalty if x[tok] > 0 else x[tok] * p.repetition_penalty
    for tok, count in Counter(output).items():
        x[tok] -= p.frequency_penalty * count + p.presence_penalty
    return x


def ref_filtered(x: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Processed logits of one row (x already penalized); greedy rows are left as they are."""
    if p.greedy:
        return x
    x = x / p.temperature
    if p.effective_top_k:
        kth = sorted(x.tolist(), reverse=True)[min(p.effective_top_k, len(x)) - 1]
        x = torch.where(x < kth, NEG_INF, x)
    if p.top_p < 1.0:
        # drop a token when the tokens strictly better than it already hold top_p of the mass
        ascending = x.sort().values
        at_most = ascending.softmax(-1).cumsum(-1)  # mass of tokens <= ascending[i]
        upto = at_most[torch.searchsorted(ascending, x, right=True) - 1]
        above = 1.0 - upto
        x = torch.where(above >= p.top_p, NEG_INF, x)
    if p.min_p > 0.0:
        probs = x.softmax(-1)
        x = torch.where(probs < p.min_p * probs.max(), NEG_INF, x)
    return x


def full_logprobs(lp: TokenLogprob | None, vocab: int) -> torch.Tensor:
    assert lp is not None and len(lp.top) == vocab
    return torch.tensor([lp.top[t] for t in range(vocab)], dtype=torch.float64)


def assert_same_logprobs(got: torch.Tensor, want_logits: torch.Tensor) -> None:
    want = want_logits.log_softmax(-1)
    assert torch.equal(torch.isinf(got), torch.isinf(want)), (got, want)
    finite = ~torch.isinf(want)
    torch.testing.assert_close(got[finite], want[finite], atol=1e-4, rtol=1e-4)


# ---- greedy, processors --------------------------------------------------------------------------


def test_greedy_equals_argmax() -> None:
    torch.manual_seed(0)
    logits = torch.randn(7, 1000)
    before = logits.clone()
    out = run(logits, [SamplingParams(temperature=0.0)] * 7)
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 7
    assert torch.equal(logits, before)


def test_empty_batch() -> None:
    assert run(torch.zeros(0, 10), []) == SamplerOutput([], [])


def test_logits_are_not_written() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    before = logits.clone()
    params = [
        SamplingParams(temperature=0.0, repetition_penalty=1.3, logit_bias={1: 5.0}),
        SamplingParams(temperature=0.7, top_k=5, top_p=0.8, min_p=0.1),
        SamplingParams(temperature=1.0),
    ]
    run(logits, params, prompts=[[1, 2, 3]] * 3, outputs=[[4]] * 3)
    run(logits[1:], params[1:])
    assert torch.equal(logits, before)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_penalties_match_reference(temperature: float) -> None:
    torch.manual_seed(1)
    V = 40
    logits = torch.randn(8, V) * 3
    logits[:, 0] = 2.0  # token 0 pads empty rows: a penalty must not reach it
    prompts = [[1, 2, 3, 3, 9], [5, 6], [], [7, 7, 7], [0, 1, 2], [], [5], []]
    outputs = [[3, 4, 4, 4], [6, 6, 8], [10, 11, 10], [], [1, 1, 39], [], [], [7, 7, 5]]
    params = [
        SamplingParams(temperature=temperature, repetition_penalty=1.5, logprobs=V),
        SamplingParams(temperature=temperature, repetition_penalty=0.7, logprobs=V),
        SamplingParams(temperature=temperature, frequency_penalty=0.8, presence_penalty=-0.5, logprobs=V),
        SamplingParams(temperature=temperature, logprobs=V),  # no penalty in a batch that has some
        SamplingParams(
            temperature=temperature,
            repetition_penalty=1.2,
            frequency_penalty=-1.0,
            presence_penalty=2.0,
            logprobs=V,
        ),
        SamplingParams(temperature=temperature, repetition_penalty=2.0, logprobs=V),  # nothing seen
        SamplingParams(temperature=temperature, frequency_penalty=1.0, presence_penalty=1.0, logprobs=V),
        SamplingParams(temperature=temperature, repetition_penalty=0.5, logprobs=V),  # output only
    ]
    out = run(logits, params, prompts, outputs)
    for i, p in enumerate(params):
        want = ref_penalized(logits[i], p, prompts[i], outputs[i])
        assert_same_logprobs(full_logprobs(out.logprobs[i], V), want)
        if p.greedy:
            assert out.token_ids[i] == int(want.argmax())


def test_logit_bias_matches_reference_and_can_force_a_token() -> None:
    torch.manual_seed(2)
    V = 30
    logits = torch.randn(3, V)
    params = [
        SamplingParams(temperature=0.0, logit_bias={17: 100.0}, logprobs=V),
        SamplingParams(temperature=0.0, logit_bias={0: -100.0, 5: 2.5, 29: -3.0}, logprobs=V),
        SamplingParams(temperature=0.5, logit_bias={4: 100.0}),
    ]
    out = run(logits, params)
    assert out.token_ids[0] == 17 and out.token_ids[2] == 4
    for i in (0, 1):
        assert_same_logprobs(full_logprobs(out.logprobs[i], V), ref_penalized(logits[i], params[i], [], []))


def test_logit_bias_outside_vocab_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"\[30\].*size 30"):
        run(torch.zeros(1, 30), [SamplingParams(logit_bias={30: 1.0})])


def test_min_tokens_bans_eos_and_stop_tokens_until_reached() -> None:
    V = 20
    logits = torch.zeros(4, V)
    logits[:, 2] = 10.0  # eos is the favourite
    logits[:, 7] = 9.0  # then the stop token
    logits[:, 8] = 8.0
    params = [SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=(7,), logprobs=V)] * 4
    outputs = [[], [1, 1], [1, 1, 1], [1, 1, 1, 1]]
    out = run(logits, params, outputs=outputs, eos=(2, 999))  # an eos id past the vocabulary is ignored
    assert out.token_ids == [8, 8, 2, 2]
    lp = full_logprobs(out.logprobs[0], V)
    assert lp[2] == NEG_INF and lp[7] == NEG_INF and math.isfinite(out.logprobs[0].logprob)  # type: ignore[union-attr]
    # sampled rows never produce a banned token either
    torch.manual_seed(3)
    sampled = run(torch.zeros(64, V), [SamplingParams(min_tokens=1, stop_token_ids=(7,))] * 64)
    assert not {2, 7} & set(sampled.token_ids)


def test_temperature_scales_the_processed_distribution() -> None:
    torch.manual_seed(4)
    V = 25
    logits = torch.randn(3, V)
    temps = [0.3, 1.0, 2.5]
    out = run(logits, [SamplingParams(temperature=t, logprobs=V) for t in temps])
    for i, t in enumerate(temps):
        assert_same_logprobs(full_logprobs(out.logprobs[i], V), logits[i].double() / t)


FILTERS = [
    SamplingParams(top_k=1),
    SamplingParams(top_k=5),
    SamplingParams(top_k=-1, top_p=0.5),
    SamplingParams(top_p=0.9, temperature=0.5),
    SamplingParams(min_p=0.2),
    SamplingParams(top_k=10, top_p=0.7, min_p=0.05, temperature=1.5),
    SamplingParams(top_k=100, top_p=0.3),  # k larger than the vocabulary
    SamplingParams(),  # no filter, in a batch that has some
]


def test_filters_match_reference_and_only_allowed_tokens_are_sampled() -> None:
    torch.manual_seed(5)
    V = 64
    base = torch.randn(len(FILTERS), V) * 2
    params = [
        SamplingParams(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, min_p=p.min_p, logprobs=V)
        for p in FILTERS
    ]
    out = run(base, params)
    allowed = []
    for i, p in enumerate(params):
        want = ref_filtered(base[i].double(), p)
        assert_same_logprobs(full_logprobs(out.logprobs[i], V), want)
        allowed.append({t for t in range(V) if want[t] > NEG_INF})
    assert len(allowed[0]) == 1 and len(allowed[1]) == 5
    reps = 200
    many = run(base.repeat(reps, 1), FILTERS * reps)
    seen: list[set[int]] = [set() for _ in FILTERS]
    for j, tok in enumerate(many.token_ids):
        seen[j % len(FILTERS)].add(tok)
    for i in range(len(FILTERS)):
        assert seen[i] <= allowed[i], (i, seen[i] - allowed[i])
    assert len(seen[1]) > 1  # top_k=5 does sample more than one token


def test_top_p_wider_than_the_candidates_retries_with_more() -> None:
    torch.manual_seed(6)
    V = 20000
    logits = torch.randn(4, V) * 0.1  # nearly flat: a nucleus holds about top_p * V tokens
    params = [
        SamplingParams(top_p=0.95, logprobs=V),  # wider than 8 * 1024 candidates: full sort
        SamplingParams(top_p=0.02, logprobs=V),  # within the first 1024 candidates
        SamplingParams(top_p=0.3, logprobs=V),  # within 8 * 1024
        SamplingParams(top_k=2000, top_p=0.9, logprobs=V),
    ]
    out = run(logits, params)
    for i, p in enumerate(params):
        want = ref_filtered(logits[i].double(), p)
        assert int((want > NEG_INF).sum()) > 300
        assert_same_logprobs(full_logprobs(out.logprobs[i], V), want)


# ---- randomness ----------------------------------------------------------------------------------


def test_seeded_rows_do_not_depend_on_the_batch() -> None:
    V = 100
    torch.manual_seed(7)
    row = torch.randn(V)
    p = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)

    def tokens(batch_size: int, position: int, steps: int = 5) -> list[int]:
        gen = make_generator(1234, CPU)
        got = []
        for _ in range(steps):
            logits = torch.randn(batch_size, V)
            logits[position] = row
            params = [SamplingParams(temperature=0.8, top_k=7)] * batch_size
            params[position] = p
            gens: list[torch.Generator | None] = [make_generator(9, CPU)] * batch_size
            gens[position] = gen
            if batch_size > 2:
                params[0] = SamplingParams(temperature=0.0)
            got.append(run(logits, params, generators=gens).token_ids[position])
        return got

    alone = tokens(1, 0)
    assert len(set(alone)) > 1  # the generator advances between steps
    assert tokens(4, 2) == alone
    assert tokens(9, 8) == alone
    assert tokens(3, 1) == alone
    assert make_generator(None, CPU) is None


def test_greedy_rows_leave_their_generator_alone() -> None:
    gen = make_generator(5, CPU)
    assert gen is not None
    state = gen.get_state()
    params = [SamplingParams(temperature=0.0, seed=5), SamplingParams()]
    run(torch.randn(2, 10), params, generators=[gen, None])
    assert torch.equal(gen.get_state(), state)


@pytest.mark.parametrize("seeded", [False, True])
def test_empirical_distribution_matches_softmax(seeded: bool) -> None:
    torch.manual_seed(8)
    logits = torch.tensor([[1.0, 0.0, -0.5, 2.0, 0.3]])
    temperature = 0.7
    want = (logits[0].double() / temperature).softmax(-1)
    p = SamplingParams(temperature=temperature)
    if seeded:
        n = 3000
        gen = make_generator(42, CPU)
        draws = [run(logits, [p], generators=[gen]).token_ids[0] for _ in range(n)]
    else:
        n = 20000
        draws = run(logits.repeat(n, 1), [p] * n).token_ids
    counts = Counter(draws)
    chi2 = sum((counts[t] - n * float(want[t])) ** 2 / (n * float(want[t])) for t in range(5))
    assert chi2 < 30.0, (chi2, counts)  # 4 degrees of freedom: P(chi2 > 30) ~ 5e-6


# ---- logprobs ------------------------------------------------------------------------------------


def test_logprobs_topk_sorted_and_consistent() -> None:
    torch.manual_seed(9)
    V = 50
    logits = torch.randn(5, V) * 2
    params = [
        SamplingParams(temperature=0.0, logprobs=5),
        SamplingParams(temperature=0.9, top_k=3, logprobs=5),  # top asks for more than survive
        SamplingParams(temperature=1.2, logprobs=0),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.6, top_p=0.8, logprobs=V),
    ]
    out = run(logits, params)
    assert out.logprobs[3] is None
    for i, p in enumerate(params):
        lp = out.logprobs[i]
        if p.logprobs is None:
            continue
        assert lp is not None and lp.token_id == out.token_ids[i]
        assert math.isfinite(lp.logprob)
        want = ref_filtered(logits[i].double(), p).log_softmax(-1)
        assert lp.logprob == pytest.approx(float(want[lp.token_id]), abs=1e-4)
        assert len(lp.top) == p.logprobs
        values = list(lp.top.values())
        assert values == sorted(values, reverse=True)
        ref_top = torch.topk(want, p.logprobs).values.tolist()
        assert values == pytest.approx(ref_top, abs=1e-4)
        for tok, val in lp.top.items():
            assert val == pytest.approx(float(want[tok]), abs=1e-4) or val == float(want[tok]) == NEG_INF
    assert out.logprobs[2] is not None and out.logprobs[2].top == {}
    full = full_logprobs(out.logprobs[4], V)
    assert float(full.exp().sum()) == pytest.approx(1.0, abs=1e-4)
    assert sorted(out.logprobs[1].top.values())[:2] == [NEG_INF, NEG_INF]  # type: ignore[union-attr]


# ---- everything at once --------------------------------------------------------------------------


def test_mixed_batch_equals_rows_sampled_alone() -> None:
    torch.manual_seed(10)
    V = 80
    logits = torch.randn(8, V) * 2
    prompts = [[1, 2, 3], [4, 4], [5], [], [6, 7], [8], [9, 9, 9], [10]]
    outputs = [[11], [12, 12], [], [2], [13], [], [14], [15, 16]]
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.0, repetition_penalty=1.4, logprobs=3),
        SamplingParams(temperature=0.9, top_k=8, seed=1, logprobs=2),
        SamplingParams(temperature=0.7, top_p=0.8, frequency_penalty=0.5, seed=2),
        SamplingParams(temperature=1.3, min_p=0.1, logit_bias={20: 3.0}, seed=3, logprobs=V),
        SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=(30,), logprobs=V),
        SamplingParams(temperature=0.5, presence_penalty=1.0, top_k=4, top_p=0.9, min_p=0.01, seed=4),
        SamplingParams(temperature=1.0, top_k=5),  # unseeded
    ]
    gens = [make_generator(p.seed, CPU) for p in params]
    batch = run(logits, params, prompts, outputs, gens)
    for i, p in enumerate(params):
        processed = ref_filtered(ref_penalized(logits[i], p, prompts[i], outputs[i]), p)
        assert processed[batch.token_ids[i]] > NEG_INF
        if p.logprobs == V:
            assert_same_logprobs(full_logprobs(batch.logprobs[i], V), processed)
        if p.seed is None and not p.greedy:
            continue
        alone = run(logits[i : i + 1], [p], [prompts[i]], [outputs[i]], [make_generator(p.seed, CPU)])
        assert alone.token_ids[0] == batch.token_ids[i], i
        assert (batch.logprobs[i] is None) == (p.logprobs is None)
        if p.logprobs is not None:
            one, many = alone.logprobs[0], batch.logprobs[i]
            assert one is not None and many is not None and one.token_id == many.token_id
            assert one.logprob == pytest.approx(many.logprob, abs=1e-5) and one.top.keys() == many.top.keys()


# ---- property ------------------------------------------------------------------------------------


@st.composite
def rows(draw: st.DrawFn) -> tuple[torch.Tensor, list[SamplingParams], list[list[int]], list[list[int]]]:
    V = draw(st.integers(2, 12))
    n = draw(st.integers(1, 4))
    token = st.integers(0, V - 1)
    logits = torch.tensor(
        draw(st.lists(st.lists(st.floats(-30, 30), min_size=V, max_size=V), min_size=n, max_size=n))
    )
    params, prompts, outputs = [], [], []
    for _ in range(n):
        params.append(
            SamplingParams(
                temperature=draw(st.sampled_from([0.0, 1e-3, 0.5, 1.0, 3.0])),
                top_k=draw(st.integers(-1, V + 1)),
                top_p=draw(st.sampled_from([1.0, 0.999, 0.9, 0.5, 0.25, 1e-3])),
                min_p=draw(st.sampled_from([0.0, 0.1, 0.5, 1.0])),
                repetition_penalty=draw(st.sampled_from([1.0, 0.5, 2.0])),
                frequency_penalty=draw(st.sampled_from([0.0, 2.0, -2.0])),
                presence_penalty=draw(st.sampled_from([0.0, 1.0, -1.0])),
                logit_bias=draw(st.none() | st.dictionaries(token, st.floats(-100, 100), max_size=3)),
                min_tokens=draw(st.integers(0, 3)),
                # eos is token 0; the last token is never a stop token, so no row is banned entirely
                stop_token_ids=tuple(draw(st.lists(st.integers(0, V - 2), max_size=2))),
                seed=draw(st.none() | st.integers(0, 2**31)),
                logprobs=V,
            )
        )
        prompts.append(draw(st.lists(token, max_size=5)))
        outputs.append(draw(st.lists(token, max_size=4)))
    return logits, params, prompts, outputs


@settings(max_examples=150, deadline=None)
@given(rows())
def test_sampled_token_always_has_finite_processed_logprob(
    case: tuple[torch.Tensor, list[SamplingParams], list[list[int]], list[list[int]]],
) -> None:
    logits, params, prompts, outputs = case
    V = logits.shape[1]
    gens = [make_generator(p.seed, CPU) for p in params]
    out = run(logits, params, prompts, outputs, gens, eos=(0,))
    for i, p in enumerate(params):
        lp = out.logprobs[i]
        full = full_logprobs(lp, V)
        tok = out.token_ids[i]
        assert lp is not None and lp.token_id == tok and math.isfinite(lp.logprob)
        assert lp.logprob == full[tok]
        assert float(torch.logsumexp(full, -1)) == pytest.approx(0.0, abs=1e-4)
        if len(outputs[i]) < p.min_tokens:
            assert tok not in {0, *p.stop_token_ids}
        if p.greedy:
            assert lp.logprob == float(full.max())

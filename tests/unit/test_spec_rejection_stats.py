"""The rejection sampler keeps the target's distribution: over many batched trials on a 6-token
vocabulary, the first emitted token and the pair of the first two follow the target's own
(processed) distribution, by a chi-square test; and the same statistic rejects deliberately broken
samplers, so the test can fail.

A toy "model" whose next-token logits depend on the last token: p1 = f(L1) for the first token,
p2(. | a) = f(L2[a]) for the second, f the sampling parameters' processing (tests/unit/test_sampler's
reference). A draft model proposes from other tables q1, Q2[a]. Trials that emit one token in the
first step (a rejection at once) get their second token from a second step, as the engine would.
The bonus token (k = 1, both accepted) and the residual (any rejection) are both exercised.

Normalisation of the residual is implicit here (the exponential race samples in proportion to the
weights), so the broken variants are: resampling from p instead of max(0, p - q), accepting with
p instead of p / q, an unnormalised target (exp(logits)) in the acceptance ratio, and a bonus token
drawn from the draft's q.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch

import pagoda.engine.spec_decode.rejection_sampler as rs
from pagoda.engine.sampling.params import SamplingParams
from pagoda.engine.spec_decode import RejectionSampler
from tests.unit.test_sampler import ref_filtered

CPU = torch.device("cpu")
V = 6
TRIALS = 30_000
Z_1E4 = 3.719  # the standard normal's 1 - 1e-4 quantile


def chi2_threshold(df: int, z: float = Z_1E4) -> float:
    """The chi-square distribution's upper quantile (Wilson-Hilferty; within ~2% for df >= 3)."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * a**0.5) ** 3


class ToyModel:
    def __init__(self, seed: int, params: SamplingParams) -> None:
        g = torch.Generator().manual_seed(seed)
        self.L1 = torch.randn(V, generator=g) * 1.5
        self.L2 = torch.randn(V, V, generator=g) * 1.5
        self.L3 = torch.randn(V, V, V, generator=g) * 1.5  # only drafts of 2 reach the third row
        self.q1 = (torch.randn(V, generator=g) * 1.5).softmax(-1)
        self.Q2 = (torch.randn(V, V, generator=g) * 1.5).softmax(-1)
        self.params = params

    def p(self, logits: torch.Tensor) -> torch.Tensor:  # the target's processed distribution
        return ref_filtered(logits.double(), self.params).softmax(-1)

    def expected_pairs(self) -> torch.Tensor:  # [V, V]: P(first = a, second = b)
        p1 = self.p(self.L1)
        return torch.stack([p1[a] * self.p(self.L2[a]) for a in range(V)])


def step(
    sampler: RejectionSampler,
    logits: torch.Tensor,
    drafts: list[list[int]],
    probs: torch.Tensor,
    params: SamplingParams,
) -> list[list[int]]:
    n = len(drafts)
    out = sampler(logits, drafts, probs, [params] * n, [[]] * n, [[]] * n, [None] * n)
    return out.token_ids


def simulate(model: ToyModel, k: int, bonus_from_q: bool = False) -> torch.Tensor:
    """[TRIALS, 2] the first two tokens of each trial, drafts of k (1 or 2) from the toy draft."""
    sampler = RejectionSampler(V, (), CPU)
    d1 = torch.multinomial(model.q1, TRIALS, replacement=True)  # [TRIALS]
    d2 = torch.multinomial(model.Q2[d1], 1)[:, 0]
    rows = [model.L1.expand(TRIALS, V), model.L2[d1], model.L3[d1, d2]][: k + 1]
    if bonus_from_q and k == 1:  # broken: the bonus row is the draft's next distribution
        rows[1] = model.Q2[d1].log()
    logits = torch.stack(rows, dim=1).reshape(-1, V)  # [TRIALS * (k + 1), V], trial by trial
    drafts = torch.stack([d1, d2], dim=1)[:, :k]
    probs = torch.stack([model.q1.expand(TRIALS, V), model.Q2[d1]], dim=1)[:, :k].reshape(-1, V)
    first = step(sampler, logits, drafts.tolist(), probs, model.params)
    # trials that emitted one token: a second step from it, drafting one token
    again = [i for i, toks in enumerate(first) if len(toks) == 1]
    a = torch.tensor([first[i][0] for i in again], dtype=torch.int64)
    d = torch.multinomial(model.Q2[a], 1)[:, 0]
    logits2 = torch.stack([model.L2[a], model.L3[a, d]], dim=1).reshape(-1, V)
    second = step(sampler, logits2, d[:, None].tolist(), model.Q2[a], model.params)
    for i, toks in zip(again, second, strict=True):
        first[i] = [first[i][0], toks[0]]
    return torch.tensor([toks[:2] for toks in first])


def chi2(observed: torch.Tensor, expected_p: torch.Tensor) -> tuple[float, int]:
    """(statistic, degrees of freedom) over the cells the target allows; a cell it forbids must be
    empty."""
    n = observed.sum()
    allowed = expected_p > 1e-12
    assert observed[~allowed].sum() == 0, "a token the target forbids was emitted"
    exp = expected_p[allowed] * n
    return float(((observed[allowed] - exp) ** 2 / exp).sum()), int(allowed.sum()) - 1


def statistics(model: ToyModel, tokens: torch.Tensor) -> tuple[float, float, float, float]:
    """(first-token chi2, its threshold, pair chi2, its threshold)."""
    pairs = torch.zeros(V * V, dtype=torch.float64).index_add_(
        0, tokens[:, 0] * V + tokens[:, 1], torch.ones(len(tokens), dtype=torch.float64)
    )
    expected = model.expected_pairs()
    s1, df1 = chi2(pairs.view(V, V).sum(1), expected.sum(1))
    s2, df2 = chi2(pairs, expected.flatten())
    return s1, chi2_threshold(df1), s2, chi2_threshold(df2)


CASES = {
    "temperature 1": SamplingParams(temperature=1.0),
    "top-p 0.8": SamplingParams(temperature=1.0, top_p=0.8),
    "temperature 0.7, top-k 4, min-p 0.05": SamplingParams(temperature=0.7, top_k=4, min_p=0.05),
}


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("case", list(CASES))
def test_emitted_tokens_follow_the_target(case: str, k: int) -> None:
    torch.manual_seed(1234 + k)
    model = ToyModel(seed=7, params=CASES[case])
    s1, t1, s2, t2 = statistics(model, simulate(model, k))
    assert s1 < t1 and s2 < t2, (s1, t1, s2, t2)


@contextmanager
def patched(name: str, fn: Callable[..., torch.Tensor]) -> Iterator[None]:
    saved = getattr(rs, name)
    setattr(rs, name, fn)
    try:
        yield
    finally:
        setattr(rs, name, saved)


BROKEN: dict[str, tuple[str, Callable[..., torch.Tensor]] | None] = {
    "resamples from p, not the residual": ("_recovery_weights", lambda p, q, rejected: p),
    "accepts with p, ignoring q": ("_accept", lambda u, p_d, q_d: u < p_d),
    "unnormalised target in the ratio": ("_target_probs", lambda y: y.exp()),
    "bonus token from the draft's q": None,  # simulate(bonus_from_q=True)
}


@pytest.mark.parametrize("broken", list(BROKEN))
def test_the_statistic_rejects_broken_samplers(broken: str) -> None:
    torch.manual_seed(99)
    model = ToyModel(seed=7, params=CASES["temperature 1"])
    patch = BROKEN[broken]
    if patch is None:
        tokens = simulate(model, 1, bonus_from_q=True)
    else:
        with patched(*patch):
            tokens = simulate(model, 1)
    s1, t1, s2, t2 = statistics(model, tokens)
    assert s2 > t2, (broken, s1, t1, s2, t2)  # the pair sees every one of them

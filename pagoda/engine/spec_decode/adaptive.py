"""Adaptive speculation: how many drafts each sequence gets this step, from its acceptance so far and
from what a draft row costs against the step's other rows.

A draft at position j (1-based) is accepted only if drafts 1..j-1 were, so with a per-token
acceptance alpha it yields alpha^j tokens in expectation. A decode step of R rows costs about
a + b R seconds and yields one token per sequence; one more row costs b. Adding draft j raises the
tokens per second of the step iff

    alpha^j >= b R / (a + b R) = R / (R + r0),        r0 = a / b,

where r0 is the step's fixed cost counted in rows and R the sequences in the step. At one stream on
this project's CPUs r0 is about 4 (a batch-1 decode step costs ~4 extra rows), so drafts pay down to
alpha ~0.2; at 16 streams the bar is ~0.8, so speculation turns itself off where it would be a loss
(issue 19: "adaptively when the acceptance rate makes it a loss"). On a GPU r0 is large and drafts
pay at much larger batches. `StepCost` fits a and b online from the decode steps the engine runs;
until it has seen enough different row counts it uses the device's prior.

A proposer whose drafting takes time of its own (`Proposer.timed`: a draft model's forwards, which
run before the step is timed) costs c more seconds per draft token, so a draft costs b + c and the
bar becomes

    alpha^j >= R (1 + d) / (R + r0),        d = c / b,

d the draft token's cost counted in target rows. `DraftCost` keeps c as the proposer's seconds over
the draft tokens it proposed (its catch-up of tokens it has not seen included), exponentially
weighted; b is the fitted row cost (or the prior's share of the mean step). n-gram lookups cost
next to nothing and are not timed: for them d is 0.

alpha is estimated per sequence (a verification of d drafts that accepts m is m successes and, if
m < d, one failure), shrunk toward the engine-wide estimate so that a new sequence starts from what
the workload has shown. A sequence whose alpha gives it no drafts is probed with one draft every
`PROBE_EVERY` of its steps, so a sequence that starts copying later is noticed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

PRIOR_FIXED_ROWS = {"cpu": 4.0, "cuda": 32.0}  # r0 before any measurement: `pagoda bench step` ratios
PRIOR_ALPHA = 0.8  # the engine-wide acceptance before any verification (optimistic: drafts get tried)
PRIOR_WEIGHT = 4.0  # pseudo-trials behind each prior
PROBE_EVERY = 64  # steps without drafts before a sequence gets one draft anyway (<= 1.6% more rows)
_DECAY = 0.95  # per observation: acceptance follows what a sequence does now
_COST_DECAY = 0.97  # per decode step observed
_MIN_STEPS = 16  # decode steps observed before the fit replaces the prior
_MIN_ROW_SPREAD = 0.5  # rows' standard deviation the fit needs (else r0 cannot be told apart)


@dataclass
class StepCost:
    """Decode-step seconds against rows, an exponentially weighted least-squares line a + b rows."""

    prior_fixed_rows: float
    n: float = 0.0
    sx: float = 0.0
    sy: float = 0.0
    sxx: float = 0.0
    sxy: float = 0.0
    steps: int = 0

    def observe(self, rows: int, seconds: float) -> None:
        d = _COST_DECAY
        self.n = self.n * d + 1.0
        self.sx = self.sx * d + rows
        self.sy = self.sy * d + seconds
        self.sxx = self.sxx * d + rows * rows
        self.sxy = self.sxy * d + rows * seconds
        self.steps += 1

    def row_seconds(self) -> float | None:
        """b, one row's seconds: the mean step over its mean rows plus r0 (exactly b for the fitted
        line, the prior's split of the mean step before the fit); None before any decode step."""
        if self.n == 0.0:
            return None
        return (self.sy / self.n) / (self.sx / self.n + self.fixed_rows())

    def fixed_rows(self) -> float:
        """r0 = a / b from the fit, or the prior while the fit cannot tell (too few steps, rows that
        hardly vary, or a line that slopes the wrong way under noise). Clamped to [0.25, 16] times
        the prior: one noisy spell must not switch speculation fully off or on."""
        if self.steps < _MIN_STEPS:
            return self.prior_fixed_rows
        mx, my = self.sx / self.n, self.sy / self.n
        var = self.sxx / self.n - mx * mx
        if var < _MIN_ROW_SPREAD**2:
            return self.prior_fixed_rows
        b = (self.sxy / self.n - mx * my) / var
        a = my - b * mx
        if b <= 0.0 or a <= 0.0:
            return self.prior_fixed_rows
        p = self.prior_fixed_rows
        return min(max(a / b, 0.25 * p), 16.0 * p)


@dataclass
class DraftCost:
    """A timed proposer's seconds per draft token, exponentially weighted over its proposals."""

    seconds: float = 0.0
    tokens: float = 0.0

    def observe(self, seconds: float, tokens: int) -> None:
        self.seconds = self.seconds * _COST_DECAY + seconds
        self.tokens = self.tokens * _COST_DECAY + tokens

    def per_token(self) -> float:
        """c (0 before any draft token was proposed)."""
        return self.seconds / self.tokens if self.tokens > 0.0 else 0.0


@dataclass
class _Acceptance:
    accepted: float = 0.0
    trials: float = 0.0
    idle_steps: int = 0  # steps since its last draft


@dataclass
class AdaptivePolicy:
    """Per-step draft lengths: `begin_step` with the step's sequence count, then `max_drafts` for
    each sequence; `observe` after each verification, `cost.observe` after each decode step and
    `drafting.observe` after each proposal of a timed proposer."""

    cost: StepCost
    k: int
    threshold: float = 0.0
    drafting: DraftCost = field(default_factory=DraftCost)
    total: _Acceptance = field(default_factory=lambda: _Acceptance(PRIOR_ALPHA * PRIOR_WEIGHT, PRIOR_WEIGHT))
    seqs: dict[str, _Acceptance] = field(default_factory=dict)

    @classmethod
    def for_device(cls, device_type: str, k: int) -> AdaptivePolicy:
        return cls(StepCost(PRIOR_FIXED_ROWS.get(device_type, PRIOR_FIXED_ROWS["cuda"])), k)

    def begin_step(self, num_seqs: int) -> None:
        r = max(num_seqs, 1)
        self.threshold = r * (1.0 + self.draft_rows()) / (r + self.cost.fixed_rows())

    def draft_rows(self) -> float:
        """d, a draft token's proposing cost in target rows (0 until both costs were measured)."""
        b, c = self.cost.row_seconds(), self.drafting.per_token()
        return c / b if b and c else 0.0

    def alpha(self, rid: str) -> float:
        """The sequence's acceptance estimate, shrunk toward the engine-wide one."""
        g = self.total.accepted / self.total.trials
        s = self.seqs.get(rid)
        if s is None:
            return g
        return (s.accepted + PRIOR_WEIGHT * g) / (s.trials + PRIOR_WEIGHT)

    def max_drafts(self, rid: str) -> int:
        """Drafts worth proposing for `rid` this step (0..k); counts its idle steps for probing."""
        n = drafts_worth(self.alpha(rid), self.threshold, self.k)
        s = self.seqs.setdefault(rid, _Acceptance())
        if n == 0:
            s.idle_steps += 1
            if s.idle_steps < PROBE_EVERY:
                return 0
            n = 1
        s.idle_steps = 0
        return n

    def observe(self, rid: str, drafted: int, accepted: int) -> None:
        """One verification: `accepted` of `drafted` draft tokens (a geometric run: `accepted`
        successes, then one failure unless all were accepted)."""
        if drafted == 0:
            return
        trials = accepted + (1 if accepted < drafted else 0)
        for acc in (self.seqs.setdefault(rid, _Acceptance()), self.total):
            acc.accepted = acc.accepted * _DECAY + accepted
            acc.trials = acc.trials * _DECAY + trials

    def forget(self, rid: str) -> None:
        self.seqs.pop(rid, None)


def drafts_worth(alpha: float, threshold: float, k: int) -> int:
    """How many of drafts 1..k clear the bar: the largest j <= k with alpha^j >= threshold."""
    if alpha >= 1.0 or threshold <= 0.0:
        return k
    if alpha <= 0.0 or alpha < threshold:
        return 0
    return min(k, int(math.log(threshold) / math.log(alpha) + 1e-9))

"""Speculative decoding's part of the step scheduler (pagoda/engine/spec_decode): which running
sequences get draft tokens this step, and the proposer's view of each request's verified tokens.

A drafted sequence is scheduled with 1 + k query tokens (its last verified token, then the k
drafts), all counted against the step's token budget and all given KV slots. After the step the
batcher advances `num_computed_tokens` by 1 + the drafts accepted and gives back the blocks only
rejected drafts reached (`KVCacheManager.trim`): rollback is a counter change, never a copy.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from pagoda.engine.scheduling.request import Request
from pagoda.engine.spec_decode.adaptive import AdaptivePolicy
from pagoda.engine.spec_decode.config import SpeculativeConfig
from pagoda.engine.spec_decode.proposer import Proposal, Proposer

if TYPE_CHECKING:
    from pagoda.engine.scheduling.batcher import BatchPlan

_PLACEHOLDER = -1  # a deferred proposer's draft before `Speculation.fill` proposes it


class Speculation:
    """Owns the proposer and keeps its per-request state in step with the batcher: `start` when a
    request starts running (first schedule, or resumed after preemption), `verified` with the
    tokens each step emitted, `stop` when it finishes or is preempted."""

    def __init__(
        self, config: SpeculativeConfig, proposer: Proposer, policy: AdaptivePolicy | None = None
    ) -> None:
        """`policy`: how many drafts pay for each sequence this step (None: always up to k)."""
        self.config = config
        self.proposer = proposer
        self.policy = policy
        self.clock: Callable[[], float] = time.perf_counter  # times a `timed` proposer (tests: a fake)

    def active(self, num_running: int) -> bool:
        """Whether a step with `num_running` sequences speculates (disable_by_batch_size); starts
        the policy's step."""
        if not self.config.enabled_for(num_running):
            return False
        if self.policy is not None:
            self.policy.begin_step(num_running)
        return True

    def start(self, req: Request) -> None:
        self.proposer.add_request(req.request_id, req.all_token_ids)

    def verified(self, req: Request, token_ids: list[int]) -> None:
        self.proposer.append(req.request_id, token_ids)

    def stop(self, req: Request) -> None:
        self.proposer.remove_request(req.request_id)
        if self.policy is not None:
            self.policy.forget(req.request_id)

    def observe_verification(self, req: Request, drafted: int, accepted: int) -> None:
        if self.policy is not None:
            self.policy.observe(req.request_id, drafted, accepted)

    def observe_step(self, plan: BatchPlan, seconds: float) -> None:
        """A step's duration, for the policy's cost of a row: decode steps only (every sequence one
        token plus its drafts), since a prompt chunk's cost is not a row's."""
        if self.policy is None or plan.new_requests:
            return
        drafts = plan.spec_token_ids
        for rid, n in plan.num_scheduled_tokens.items():
            if n != 1 + len(drafts.get(rid, ())):
                return
        self.policy.cost.observe(plan.total_num_scheduled_tokens, seconds)

    def draft(self, req: Request, budget: int) -> list[int]:
        """Up to k draft tokens for a running request, within `budget` - 1 (the step's tokens left,
        less its own token) and the output it may still emit; none for a request that is not
        decoding (a prompt chunk) or follows a grammar (which would have to advance through the
        drafts)."""
        if req.grammar is not None or req.num_output_tokens == 0:
            return []
        if req.num_tokens - req.num_computed_tokens != 1:
            return []
        cap = budget - 1
        if req.params.max_tokens is not None:  # the step emits up to k + 1 tokens
            cap = min(cap, req.params.max_tokens - req.num_output_tokens - 1)
        # a seeded request always gets up to k drafts: how many it gets decides which random
        # numbers its tokens use, and a seeded output must not depend on timing or other requests
        if self.policy is not None and cap > 0 and req.params.seed is None:
            cap = min(cap, self.policy.max_drafts(req.request_id))
        if cap <= 0:
            return []
        if self.proposer.deferred:  # placeholders: `fill` proposes once the slots are allocated
            return [_PLACEHOLDER] * self.proposer.num_drafts(req.request_id, cap)
        return self._propose([req.request_id], [cap]).draft_token_ids[0]

    def fill(self, drafts: dict[str, list[int]]) -> dict[str, list[int]]:
        """A deferred proposer's drafts for the step (`drafts`: each scheduled sequence's
        placeholders, replaced in place): one `propose` for all of them, after their KV slots were
        allocated. Returns `drafts`."""
        if not self.proposer.deferred or not drafts:
            return drafts
        ids = list(drafts)
        proposal = self._propose(ids, [len(drafts[r]) for r in ids])
        for rid, tokens in zip(ids, proposal.draft_token_ids, strict=True):
            assert len(tokens) == len(drafts[rid]), (rid, tokens, drafts[rid])
            drafts[rid][:] = tokens
        return drafts

    def _propose(self, ids: Sequence[str], caps: Sequence[int]) -> Proposal:
        """The proposer's drafts; a `timed` proposer's seconds go to the policy's draft cost."""
        if self.policy is None or not self.proposer.timed:
            return self.proposer.propose(ids, caps)
        t0 = self.clock()
        proposal = self.proposer.propose(ids, caps)
        self.policy.drafting.observe(self.clock() - t0, proposal.num_draft_tokens)
        return proposal

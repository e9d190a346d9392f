"""Speculative decoding's part of the step scheduler (pagoda/engine/spec_decode): which running
sequences get draft tokens this step, and the proposer's view of each request's verified tokens.

A drafted sequence is scheduled with 1 + k query tokens (its last verified token, then the k
drafts), all counted against the step's token budget and all given KV slots. After the step the
batcher advances `num_computed_tokens` by 1 + the drafts accepted and gives back the blocks only
rejected drafts reached (`KVCacheManager.trim`): rollback is a counter change, never a copy.
"""

from __future__ import annotations

from pagoda.engine.scheduling.request import Request
from pagoda.engine.spec_decode.config import SpeculativeConfig
from pagoda.engine.spec_decode.proposer import Proposer


class Speculation:
    """Owns the proposer and keeps its per-request state in step with the batcher: `start` when a
    request starts running (first schedule, or resumed after preemption), `verified` with the
    tokens each step emitted, `stop` when it finishes or is preempted."""

    def __init__(self, config: SpeculativeConfig, proposer: Proposer) -> None:
        self.config = config
        self.proposer = proposer

    def active(self, num_running: int) -> bool:
        """Whether a step with `num_running` sequences speculates (disable_by_batch_size)."""
        return self.config.enabled_for(num_running)

    def start(self, req: Request) -> None:
        self.proposer.add_request(req.request_id, req.all_token_ids)

    def verified(self, req: Request, token_ids: list[int]) -> None:
        self.proposer.append(req.request_id, token_ids)

    def stop(self, req: Request) -> None:
        self.proposer.remove_request(req.request_id)

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
        if cap <= 0:
            return []
        return self.proposer.propose([req.request_id], [cap]).draft_token_ids[0]

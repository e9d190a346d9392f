"""Draft-model proposer: a smaller model of the target's vocabulary drafts k tokens greedily.

Its KV cache (draft_runner.DraftRunner) uses the target's block tables, so a request's draft KV at
position p lives in the slot of its target KV at p. Per request it keeps the verified tokens and
`computed`, how many leading positions hold draft KV of those tokens. Proposing for a step:

1. Catch-up: each sequence's verified tokens from `computed` on (the whole prompt on first use,
   after a prefix-cache hit or a preemption: a cached block has the target's KV, not the draft's),
   its last verified token included, in chunks of at most `max_chunk` tokens per forward; the last
   position's argmax is draft 1.
2. k - 1 decode steps, each one forward over every sequence still drafting: draft j at position
   L + j - 1 (L verified tokens) gives draft j + 1. The last draft is never fed back.

The slots written (positions up to L + k - 2) are the slots the batcher allocated for the step's
1 + k verification rows (positions L - 1 .. L + k - 1): proposals are `deferred`, made by
`Speculation.fill` after the step's slots are allocated, all of a step's sequences at once.

After verification (`append`), `computed` becomes L plus the drafts' common prefix with the
verified tokens: draft KV computed from accepted drafts is kept, from rejected ones overwritten at
the next catch-up (the target's rollback trims blocks past its own computed tokens, never
below this). Drafts are greedy, so q is one-hot (`draft_probs` None): the rejection sampler's
standard rule stays exact for sampled requests too.

With tensor or pipeline parallelism the draft model runs unsharded on rank 0 only, with its whole
KV cache there (`SpecDecodeEngineMixin._load_draft` loads it as one rank): the other ranks never
see it, only the verification rows of the target's step. Sharding it too would put a round of
collectives in each of its k forwards for a model chosen to be small.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pagoda.engine.spec_decode.draft_runner import DraftRunner, Segment
from pagoda.engine.spec_decode.proposer import Proposal, Proposer


@dataclass
class _DraftState:
    tokens: list[int]  # the verified tokens
    computed: int = 0  # leading positions whose draft KV holds `tokens`
    # the drafts whose KV the last proposal wrote after the verified tokens (all but its last)
    pending: list[int] = field(default_factory=list)


class DraftModelProposer(Proposer):
    deferred = True
    timed = True  # its forwards run before the step is timed: the policy counts them per draft

    def __init__(
        self,
        runner: DraftRunner,
        k: int,
        max_model_len: int,
        blocks_of: Callable[[str], list[int]],
        max_chunk: int = 2048,
    ) -> None:
        """`blocks_of`: a request's block table now (KVCacheManager.blocks_of); `max_chunk`: the
        most catch-up tokens in one forward."""
        assert k >= 1 and max_chunk >= 1, (k, max_chunk)
        self.runner = runner
        self.k = k
        self.max_model_len = max_model_len
        self.blocks_of = blocks_of
        self.max_chunk = max_chunk
        self._states: dict[str, _DraftState] = {}

    def add_request(self, req_id: str, token_ids: Sequence[int]) -> None:
        self._states[req_id] = _DraftState(list(token_ids))

    def append(self, req_id: str, token_ids: Sequence[int]) -> None:
        st = self._states[req_id]
        kept = 0
        for drafted, verified in zip(st.pending, token_ids, strict=False):
            if drafted != verified:
                break
            kept += 1
        st.computed += kept
        st.pending = []
        st.tokens.extend(token_ids)

    def remove_request(self, req_id: str) -> None:
        self._states.pop(req_id, None)

    def num_drafts(self, req_id: str, cap: int) -> int:
        return max(0, min(self.k, cap, self.max_model_len - len(self._states[req_id].tokens)))

    def propose(self, req_ids: Sequence[str], max_tokens: Sequence[int] | None = None) -> Proposal:
        assert max_tokens is None or len(max_tokens) == len(req_ids), (max_tokens, req_ids)
        counts = [
            self.num_drafts(r, self.k if max_tokens is None else max_tokens[i]) for i, r in enumerate(req_ids)
        ]
        drafts: list[list[int]] = [[] for _ in req_ids]
        live = [i for i, n in enumerate(counts) if n > 0]
        if not live:
            return Proposal(drafts, None)
        states = [self._states[req_ids[i]] for i in live]
        tables = [self.blocks_of(req_ids[i]) for i in live]
        for i, token in zip(live, self._catch_up(states, tables), strict=True):
            drafts[i].append(token)
        for step in range(1, max(counts)):
            rows = [j for j, i in enumerate(live) if counts[i] > step]
            segments = [
                Segment([drafts[live[j]][-1]], len(states[j].tokens) + step - 1, tables[j]) for j in rows
            ]
            for j, token in zip(rows, self.runner.greedy(segments), strict=True):
                drafts[live[j]].append(token)
        for j, i in enumerate(live):
            states[j].computed = len(states[j].tokens)
            states[j].pending = drafts[i][:-1]
        return Proposal(drafts, None)

    def _catch_up(self, states: list[_DraftState], tables: list[list[int]]) -> list[int]:
        """Compute each sequence's verified tokens the draft has not seen, the last one included,
        at most `max_chunk` tokens per forward (a sequence's chunk may span forwards); the greedy
        token after each sequence's last verified one."""
        done = [st.computed for st in states]
        for st, n in zip(states, done, strict=True):
            assert n < len(st.tokens), (n, len(st.tokens))  # the last verified token is never computed
        first: dict[int, int] = {}
        while len(first) < len(states):
            budget = self.max_chunk
            order: list[int] = []
            segments: list[Segment] = []
            for j, st in enumerate(states):
                if j in first or budget <= 0:
                    continue
                end = min(len(st.tokens), done[j] + budget)
                segments.append(Segment(st.tokens[done[j] : end], done[j], tables[j], end == len(st.tokens)))
                order.append(j)
                budget -= end - done[j]
                done[j] = end
            tokens = iter(self.runner.greedy(segments))
            for j, seg in zip(order, segments, strict=True):
                if seg.sample:
                    first[j] = next(tokens)
        return [first[j] for j in range(len(states))]

"""The proposer interface: who drafts tokens for the target to verify, and the registry of methods."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from pagoda.engine.spec_decode.config import SpeculativeConfig


@dataclass
class Proposal:
    """One step's drafts: `draft_token_ids[i]` for the i-th sequence asked (0 to k tokens each).

    draft_probs: [sum of the drafts' lengths, vocab] float32, row by row the distribution q each
    draft token was drawn from (sequence after sequence, position after position), what the
    rejection sampler divides by; None for deterministic proposals (n-gram), where q is one-hot.
    """

    draft_token_ids: list[list[int]]
    draft_probs: torch.Tensor | None = None

    @property
    def num_draft_tokens(self) -> int:
        return sum(len(d) for d in self.draft_token_ids)


class Proposer(ABC):
    """Drafts up to k tokens per sequence from the tokens verified so far.

    A proposer owns per-request state keyed by the request id, from `add_request` to
    `remove_request`. It only ever sees verified tokens: the prompt, then after each step the tokens
    the rejection sampler emitted (accepted drafts and the sampled one). It holds no unverified
    token between steps, so a rejection needs no rollback here (a draft model rolls back its own
    KV by counter, as the target does). `propose` does not change that state, except a deferred
    proposer's record of what its own KV holds.

    A `deferred` proposer (a draft model, which writes KV into the slots of the positions it
    drafts) is asked at schedule time only how many drafts it will give (`num_drafts`); the step's
    slots are allocated for that many, and then `propose` runs once for all of the step's drafted
    sequences (`Speculation.fill`) and gives each exactly that many. A `timed` proposer's `propose`
    is timed for the adaptive policy.
    """

    deferred: ClassVar[bool] = False
    # proposing takes time worth counting against the drafts (a draft model's forwards): the
    # adaptive policy adds its seconds per draft token to a draft's cost (spec_decode/adaptive.py)
    timed: ClassVar[bool] = False

    @abstractmethod
    def add_request(self, req_id: str, token_ids: Sequence[int]) -> None:
        """Start tracking a request: its prompt (and any output already verified)."""

    @abstractmethod
    def append(self, req_id: str, token_ids: Sequence[int]) -> None:
        """The tokens a step verified for the request, in order."""

    @abstractmethod
    def remove_request(self, req_id: str) -> None:
        """Forget a finished or preempted request (an unknown id is ignored)."""

    @abstractmethod
    def propose(self, req_ids: Sequence[str], max_tokens: Sequence[int] | None = None) -> Proposal:
        """Drafts for these requests, in order; `max_tokens[i]` caps the i-th draft below k (e.g.
        what is left of max_model_len or of the request's max_tokens)."""

    def num_drafts(self, req_id: str, cap: int) -> int:
        """A deferred proposer: how many drafts `propose` will give the request with
        `max_tokens` `cap` (its slots are allocated for them before it proposes)."""
        raise NotImplementedError(f"{type(self).__name__} proposes at once (it is not deferred)")


ProposerFactory = Callable[[SpeculativeConfig, int], Proposer]  # (config, max_model_len) -> proposer
PROPOSERS: dict[str, ProposerFactory] = {}  # method -> factory; filled by the proposers' modules


def make_proposer(config: SpeculativeConfig, max_model_len: int) -> Proposer:
    """The proposer of `config.method`. Raises NotImplementedError for a method parsed but not built
    yet (layer_skip). A draft model's proposer is built by the engine, which loads the draft
    (`engine_parts.SpecParts.build`)."""
    from pagoda.engine.spec_decode import ngram  # noqa: F401  (registers "ngram")

    if config.method == "draft_model":
        raise ValueError("a draft model's proposer needs its loaded model: SpecParts.build makes it")
    factory = PROPOSERS.get(config.method)
    if factory is None:
        raise NotImplementedError(
            f'speculative method {config.method!r} is not implemented yet; use "ngram" or "draft_model"'
        )
    return factory(config, max_model_len)

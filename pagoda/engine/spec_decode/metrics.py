"""Speculative decoding counters, named as vLLM exports them, filled by the rejection sampler."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SpecDecodeMetrics:
    """Running totals since the counters were made (or since `take` last emptied them).

    Exported as Prometheus counters with vLLM's names:
    - `num_drafts` -> `vllm:spec_decode_num_drafts`: sequence-steps that verified at least one
      draft token;
    - `num_draft_tokens` -> `vllm:spec_decode_num_draft_tokens`: draft tokens verified;
    - `num_accepted_tokens` -> `vllm:spec_decode_num_accepted_tokens`: draft tokens accepted (the
      token sampled after them, recovered or bonus, is not counted);
    - `num_accepted_tokens_per_pos[i]` -> `vllm:spec_decode_num_accepted_tokens_per_pos` with label
      `position="i"`: drafts whose token at position i (0-based) was accepted.
    Acceptance rate = accepted / draft tokens; mean acceptance length = 1 + accepted / drafts.
    """

    num_spec_tokens: int  # k of the config: the length of num_accepted_tokens_per_pos
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_accepted_tokens_per_pos: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.num_accepted_tokens_per_pos:
            self.num_accepted_tokens_per_pos = [0] * self.num_spec_tokens
        assert len(self.num_accepted_tokens_per_pos) == self.num_spec_tokens, (
            len(self.num_accepted_tokens_per_pos),
            self.num_spec_tokens,
        )

    def observe_draft(self, num_draft_tokens: int, num_accepted_tokens: int) -> None:
        """One sequence's verification in one step (nothing is counted for 0 draft tokens)."""
        assert 0 <= num_accepted_tokens <= num_draft_tokens <= self.num_spec_tokens, (
            num_accepted_tokens,
            num_draft_tokens,
            self.num_spec_tokens,
        )
        if num_draft_tokens == 0:
            return
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted_tokens
        for pos in range(num_accepted_tokens):
            self.num_accepted_tokens_per_pos[pos] += 1

    @property
    def acceptance_rate(self) -> float:
        """Accepted / drafted tokens; nan before any draft."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else float("nan")

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens emitted per verified draft, the sampled one included (vLLM's convention)."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 1.0

    def take(self) -> SpecDecodeMetrics:
        """The counts so far, leaving these counters at zero (for an exporter that adds deltas)."""
        out = SpecDecodeMetrics(
            self.num_spec_tokens,
            self.num_drafts,
            self.num_draft_tokens,
            self.num_accepted_tokens,
            list(self.num_accepted_tokens_per_pos),
        )
        self.num_drafts = self.num_draft_tokens = self.num_accepted_tokens = 0
        self.num_accepted_tokens_per_pos = [0] * self.num_spec_tokens
        return out

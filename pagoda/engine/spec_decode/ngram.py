"""N-gram (prompt lookup) proposer: drafts the tokens that followed an earlier occurrence of the
sequence's last n tokens, in the prompt or the output so far.

Matches vLLM's NgramProposer: the longest n in [prompt_lookup_min, prompt_lookup_max] that occurs
earlier wins; among occurrences of that n the earliest one wins (vLLM's KMP keeps the leftmost);
an occurrence may overlap the suffix itself but must end before the last token; the draft is the up
to k tokens after it (fewer when the sequence ends sooner, none when nothing matches or the
sequence is shorter than prompt_lookup_min), and k is capped by max_model_len - len(tokens).

Speed (tests/unit/test_spec_ngram.py measures it): 64 sequences of 2,048 tokens from a 64-token
vocabulary, lookup 2..5, k 4: ~9 µs per sequence on this 2-core CPU (numpy; one compare over the
sequence for the last token, then only over the surviving candidates), against a budget of well
under a millisecond.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pagoda.engine.spec_decode.config import SpeculativeConfig
from pagoda.engine.spec_decode.proposer import PROPOSERS, Proposal, Proposer

_TOKEN_DTYPE = np.int64


def ngram_draft(tokens: np.ndarray, min_n: int, max_n: int, k: int) -> np.ndarray:
    """The draft for one sequence (`tokens` [len] int): the up to k tokens that followed the earliest
    occurrence of the longest suffix n-gram (min_n <= n <= max_n) found earlier. [<= k] (a view)"""
    total = tokens.shape[0]
    empty = tokens[:0]
    if total < max(min_n, 2) or k <= 0:
        return empty
    # ends: where earlier occurrences of the last n tokens end (ascending; all <= total - 2)
    ends = np.flatnonzero(tokens[: total - 1] == tokens[total - 1])
    if ends.size == 0:
        return empty
    n = 1
    while n < max_n:
        ends_ok = ends[np.searchsorted(ends, n) :]  # an occurrence of n + 1 tokens starts at e - n >= 0
        longer = ends_ok[tokens[ends_ok - n] == tokens[total - 1 - n]]
        if longer.size == 0:
            break
        ends, n = longer, n + 1
    if n < min_n:
        return empty
    start = int(ends[0]) + 1
    return tokens[start : start + k]


class _Tokens:
    """A request's verified tokens in a numpy buffer that grows by doubling."""

    def __init__(self, token_ids: Sequence[int]) -> None:
        self.buf = np.empty(max(16, 2 * len(token_ids)), dtype=_TOKEN_DTYPE)
        self.len = len(token_ids)
        self.buf[: self.len] = token_ids

    def extend(self, token_ids: Sequence[int]) -> None:
        end = self.len + len(token_ids)
        if end > self.buf.shape[0]:
            grown = np.empty(2 * end, dtype=_TOKEN_DTYPE)
            grown[: self.len] = self.buf[: self.len]
            self.buf = grown
        self.buf[self.len : end] = token_ids
        self.len = end

    @property
    def view(self) -> np.ndarray:  # [len]
        return self.buf[: self.len]


class NgramProposer(Proposer):
    """Prompt lookup over each request's verified tokens; draft_probs is None (q is one-hot)."""

    def __init__(self, k: int, min_n: int, max_n: int, max_model_len: int | None = None) -> None:
        assert 1 <= min_n <= max_n and k >= 1, (min_n, max_n, k)
        self.k = k
        self.min_n = min_n
        self.max_n = max_n
        self.max_model_len = max_model_len
        self._tokens: dict[str, _Tokens] = {}

    @classmethod
    def from_config(cls, config: SpeculativeConfig, max_model_len: int) -> NgramProposer:
        lo, hi = config.lookup_sizes
        return cls(config.num_speculative_tokens, lo, hi, max_model_len)

    def add_request(self, req_id: str, token_ids: Sequence[int]) -> None:
        self._tokens[req_id] = _Tokens(token_ids)

    def append(self, req_id: str, token_ids: Sequence[int]) -> None:
        self._tokens[req_id].extend(token_ids)

    def remove_request(self, req_id: str) -> None:
        self._tokens.pop(req_id, None)

    def num_tokens(self, req_id: str) -> int:
        return self._tokens[req_id].len

    def propose(self, req_ids: Sequence[str], max_tokens: Sequence[int] | None = None) -> Proposal:
        assert max_tokens is None or len(max_tokens) == len(req_ids), (len(max_tokens), len(req_ids))
        drafts: list[list[int]] = []
        for i, rid in enumerate(req_ids):
            tokens = self._tokens[rid].view
            k = self.k if max_tokens is None else min(self.k, max_tokens[i])
            if self.max_model_len is not None:
                k = min(k, self.max_model_len - tokens.shape[0])
            drafts.append(ngram_draft(tokens, self.min_n, self.max_n, k).tolist())
        return Proposal(drafts, None)


PROPOSERS["ngram"] = NgramProposer.from_config

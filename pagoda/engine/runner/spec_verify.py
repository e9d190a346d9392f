"""Speculative decoding's step in the runner: verify each drafted sequence's proposals against the
target's logits at its 1 + k positions (pagoda/engine/spec_decode/rejection_sampler.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import torch

from pagoda.engine.scheduling.batcher import RunnerOutput

if TYPE_CHECKING:
    from pagoda.engine.sampling.params import SamplingParams
    from pagoda.engine.spec_decode.rejection_sampler import RejectionSampler


class SeqState(Protocol):
    """What verification reads of the runner's state of a sequence (model_runner._ReqState)."""

    token_ids: list[int]  # prompt + verified output
    num_prompt_tokens: int
    block_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None


def verify_drafts(
    sampler: RejectionSampler,
    logits: torch.Tensor,  # [sum(k_i + 1), vocab]: each sequence's rows, in order
    req_ids: Sequence[str],
    states: Sequence[SeqState],
    drafts: Sequence[list[int]],
    res: RunnerOutput,
    block_size: int,
) -> None:
    """Verify the drafts, append each sequence's emitted tokens (accepted drafts, then the sampled
    one) to its state, and report them (and their logprobs where asked) in `res`. Each block
    table keeps the blocks of its computed tokens (all but the last emitted one), as the
    batcher's does (KVCacheManager.trim): the blocks only rejected drafts reached went back."""
    out = sampler(
        logits,
        drafts,
        None,  # n-gram drafts are deterministic: q is one-hot
        [s.params for s in states],
        [s.token_ids[: s.num_prompt_tokens] for s in states],
        [s.token_ids[s.num_prompt_tokens :] for s in states],
        [s.generator for s in states],
    )
    for rid, st, tokens, lps in zip(req_ids, states, out.token_ids, out.logprobs, strict=True):
        st.token_ids.extend(tokens)
        del st.block_ids[-(-(len(st.token_ids) - 1) // block_size) :]
        res.spec_token_ids[rid] = tokens
        if lps is not None:
            res.spec_logprobs[rid] = lps

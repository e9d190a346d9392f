"""What the sampler needs for one step, gathered once from the rows' sampling parameters.

`SamplingMetadata.build` turns each row's `SamplingParams`, prompt and output so far into the
tensors the sampler's stages read (sampler.py), one helper per stage: logit_bias, min_tokens bans,
penalties, the random rows' filters, and the logprob rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from pagoda.engine.sampling.params import SamplingParams


@dataclass
class SamplingMetadata:
    """Everything the sampler needs for one step, built once from the rows to sample.

    "Random rows" are the non-greedy rows, in row order; the per-random-row tensors are aligned with
    them. A stage's tensors are None when no row of the step needs that stage.
    """

    num_rows: int
    vocab_size: int
    random_rows: torch.Tensor | None  # [num_random] int64; None when all rows are random or all greedy
    all_greedy: bool
    all_random: bool
    # logits processors, all rows
    bias_rows: torch.Tensor | None  # [num_bias] int64, with bias_tokens/bias_values: one entry per bias
    bias_tokens: torch.Tensor | None
    bias_values: torch.Tensor | None  # [num_bias] float32
    banned_rows: torch.Tensor | None  # [num_banned] int64: min_tokens not reached, ban eos/stop tokens
    banned_tokens: torch.Tensor | None
    # Id tensors are padded by repeating the row's last id (0 for an empty row): the penalties are
    # applied by gather -> compute -> scatter on these ids, where a repeated id writes the same value
    # twice, and an empty row's parameters are neutral there.
    seen_ids: torch.Tensor | None  # [num_rows, max_prompt + max_output] int64: prompt then output
    output_ids: torch.Tensor | None  # [num_rows, max_output] int64
    output_mask: torch.Tensor | None  # [num_rows, max_output] float32: 1 for real ids, 0 for padding
    repetition_penalty: torch.Tensor | None  # [num_rows, 1] float32, 1.0 for rows with nothing seen
    frequency_penalty: torch.Tensor | None  # [num_rows, 1] float32
    presence_penalty: torch.Tensor | None  # [num_rows, 1] float32
    # random rows only
    temperature: torch.Tensor | None  # [num_random, 1] float32
    top_k: torch.Tensor | None  # [num_random, 1] int64, vocab_size where off
    max_top_k: int
    top_p: torch.Tensor | None  # [num_random, 1] float32, 1.0 where off
    min_p: torch.Tensor | None  # [num_random, 1] float32, 0.0 where off
    generators: dict[int, torch.Generator]  # position among the random rows -> its generator
    # logprobs: the rows that asked, greedy ones first, then random ones; k per row
    logprob_rows: list[int]
    logprob_k: list[int]
    logprob_greedy_rows: torch.Tensor | None  # [g] int64, row indices (into the logits)
    logprob_random_pos: torch.Tensor | None  # [r] int64, positions among the random rows
    # structured outputs: the constrained rows and the tokens each may take (a bit per token)
    grammar_rows: torch.Tensor | None = None  # [num_constrained] int64
    grammar_bitmask: torch.Tensor | None = None  # [num_constrained, ceil(vocab / 32)] int32

    @property
    def needs_processing(self) -> bool:
        return (
            self.grammar_rows is not None
            or self.bias_rows is not None
            or self.banned_rows is not None
            or self.seen_ids is not None
            or self.output_ids is not None
        )

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        prompt_token_ids: Sequence[Sequence[int]],
        output_token_ids: Sequence[Sequence[int]],
        generators: Sequence[torch.Generator | None],
        vocab_size: int,
        eos_token_ids: Sequence[int],
        device: torch.device,
    ) -> SamplingMetadata:
        """The metadata of one step's rows (row i: params[i], its prompt and output so far, its
        generator). Raises ValueError for a logit_bias token id outside the vocabulary."""
        n = len(params)
        assert len(prompt_token_ids) == n and len(output_token_ids) == n and len(generators) == n, (
            n,
            len(prompt_token_ids),
            len(output_token_ids),
            len(generators),
        )
        random_pos = [i for i, p in enumerate(params) if not p.greedy]
        all_greedy, all_random = not random_pos, len(random_pos) == n
        bias_rows, bias_tokens, bias_values = _logit_bias(params, vocab_size)
        banned_rows, banned_tokens = _banned_tokens(params, output_token_ids, eos_token_ids, vocab_size)
        pen = _penalties(params, prompt_token_ids, output_token_ids, vocab_size, device)
        filt = _filters([params[i] for i in random_pos], vocab_size, device)
        lp_greedy = [i for i, p in enumerate(params) if p.logprobs is not None and p.greedy]
        lp_random = [j for j, i in enumerate(random_pos) if params[i].logprobs is not None]
        logprob_rows = lp_greedy + [random_pos[j] for j in lp_random]
        return cls(
            num_rows=n,
            vocab_size=vocab_size,
            random_rows=_ids(random_pos, device) if not (all_greedy or all_random) else None,
            all_greedy=all_greedy,
            all_random=all_random,
            bias_rows=_ids(bias_rows, device) if bias_rows else None,
            bias_tokens=_ids(bias_tokens, device) if bias_rows else None,
            bias_values=torch.tensor(bias_values, dtype=torch.float32, device=device) if bias_rows else None,
            banned_rows=_ids(banned_rows, device) if banned_rows else None,
            banned_tokens=_ids(banned_tokens, device) if banned_rows else None,
            **pen._asdict(),
            **filt._asdict(),
            generators={j: g for j, i in enumerate(random_pos) if (g := generators[i]) is not None},
            logprob_rows=logprob_rows,
            logprob_k=[min(params[i].logprobs or 0, vocab_size) for i in logprob_rows],
            logprob_greedy_rows=_ids(lp_greedy, device) if lp_greedy else None,
            logprob_random_pos=_ids(lp_random, device) if lp_random else None,
        )


class _Penalties(NamedTuple):
    """The penalty fields of SamplingMetadata (same names; see there)."""

    seen_ids: torch.Tensor | None
    output_ids: torch.Tensor | None
    output_mask: torch.Tensor | None
    repetition_penalty: torch.Tensor | None
    frequency_penalty: torch.Tensor | None
    presence_penalty: torch.Tensor | None


class _Filters(NamedTuple):
    """The random-row filter fields of SamplingMetadata (same names; see there)."""

    temperature: torch.Tensor | None
    top_k: torch.Tensor | None
    max_top_k: int
    top_p: torch.Tensor | None
    min_p: torch.Tensor | None


def _ids(values: Sequence[int], device: torch.device) -> torch.Tensor:  # [len(values)] int64
    return torch.tensor(values, dtype=torch.int64, device=device)


def _column(values: Sequence[float], device: torch.device) -> torch.Tensor:  # [rows, 1] float32
    return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)


def _logit_bias(
    params: Sequence[SamplingParams], vocab_size: int
) -> tuple[list[int], list[int], list[float]]:
    """One (row, token, bias) entry per logit_bias item of every row."""
    rows: list[int] = []
    tokens: list[int] = []
    values: list[float] = []
    for i, p in enumerate(params):
        if not p.logit_bias:
            continue
        bad = sorted(t for t in p.logit_bias if not 0 <= t < vocab_size)
        if bad:
            raise ValueError(
                f"logit_bias token ids {bad} are outside the vocabulary (size {vocab_size}); "
                f"use ids in [0, {vocab_size - 1}]"
            )
        rows += [i] * len(p.logit_bias)
        tokens += p.logit_bias.keys()
        values += p.logit_bias.values()
    return rows, tokens, values


def _banned_tokens(
    params: Sequence[SamplingParams],
    output_token_ids: Sequence[Sequence[int]],
    eos_token_ids: Sequence[int],
    vocab_size: int,
) -> tuple[list[int], list[int]]:
    """(row, token) pairs to ban: EOS and stop tokens of rows short of their min_tokens."""
    rows: list[int] = []
    tokens: list[int] = []
    for i, p in enumerate(params):
        if len(output_token_ids[i]) < p.min_tokens:
            # ids outside the vocabulary can never be sampled, so there is nothing to ban
            stops = {t for t in (*eos_token_ids, *p.stop_token_ids) if 0 <= t < vocab_size}
            rows += [i] * len(stops)
            tokens += stops
    return rows, tokens


def _penalties(
    params: Sequence[SamplingParams],
    prompt_token_ids: Sequence[Sequence[int]],
    output_token_ids: Sequence[Sequence[int]],
    vocab_size: int,
    device: torch.device,
) -> _Penalties:
    """Repetition penalty (over prompt and output) and frequency/presence penalties (over the
    output), all None when no row uses them."""
    uses_rep = [p.repetition_penalty != 1.0 for p in params]
    uses_freq = [p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 for p in params]
    seen_ids = output_ids = output_mask = rep_penalty = freq = presence = None
    if any(uses_rep):
        seen = [[*prompt_token_ids[i], *output_token_ids[i]] if r else [] for i, r in enumerate(uses_rep)]
        seen_ids, _ = _pad(seen, vocab_size, device)
        # a row with nothing seen pads with token 0: a penalty of 1.0 leaves it alone
        rep_penalty = _column(
            [p.repetition_penalty if ids else 1.0 for p, ids in zip(params, seen, strict=True)], device
        )
    if any(uses_freq):
        outputs = [output_token_ids[i] if f else () for i, f in enumerate(uses_freq)]
        output_ids, output_mask = _pad(outputs, vocab_size, device)
        freq = _column([p.frequency_penalty for p in params], device)
        presence = _column([p.presence_penalty for p in params], device)
    return _Penalties(seen_ids, output_ids, output_mask, rep_penalty, freq, presence)


def _filters(rand: Sequence[SamplingParams], vocab_size: int, device: torch.device) -> _Filters:
    """Temperature, top-k, top-p and min-p of the random rows; each None when no row uses it."""
    top_ks = [p.effective_top_k for p in rand]
    return _Filters(
        temperature=_column([p.temperature for p in rand], device)
        if any(p.temperature != 1.0 for p in rand)
        else None,
        top_k=_ids([min(k, vocab_size) if k else vocab_size for k in top_ks], device).unsqueeze(1)
        if any(top_ks)
        else None,
        max_top_k=min(max(top_ks, default=0), vocab_size),
        top_p=_column([p.top_p for p in rand], device) if any(p.top_p < 1.0 for p in rand) else None,
        min_p=_column([p.min_p for p in rand], device) if any(p.min_p > 0.0 for p in rand) else None,
    )


def _pad(
    rows: Sequence[Sequence[int]], vocab_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """[len(rows), longest] int64 ids padded by repeating each row's last id (0 for an empty row),
    and the [len(rows), longest] float32 mask of the real ids."""
    longest = max(1, max(len(r) for r in rows))
    ids = np.zeros((len(rows), longest), dtype=np.int64)
    mask = np.zeros((len(rows), longest), dtype=np.float32)
    for i, r in enumerate(rows):
        if r:
            ids[i, : len(r)] = r
            ids[i, len(r) :] = r[-1]
            mask[i, : len(r)] = 1.0
    assert ids.min() >= 0 and ids.max() < vocab_size, (ids.min(), ids.max(), vocab_size)
    return torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)

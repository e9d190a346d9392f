"""Verifies one step's drafts against the target and emits 1 to k+1 tokens per sequence, keeping the
target's distribution exactly (Leviathan et al. 2023; Chen et al. 2023).

Per sequence with drafts d_1..d_k drawn from q and target distributions p_1..p_{k+1} (p_j: the
target's next-token distribution after the context and d_1..d_{j-1}):
- accept d_j with probability min(1, p_j(d_j) / q_j(d_j)), left to right, stopping at the first
  rejection (an n-gram's q is one-hot: accept with probability p_j(d_j));
- after a rejection at j, sample from max(0, p_j - q_j) normalised (the residual); if all k were
  accepted, sample the bonus token from p_{k+1};
- greedy rows (temperature 0): accept while d_j is the argmax of the processed logits, then emit
  that argmax; they draw no random numbers.
p_j is the distribution the plain sampler would sample from at that position: logit_bias,
min_tokens and the penalties (with d_1..d_{j-1} counted as output, as they are if p_j is used at
all), then temperature, top-k, top-p and min-p, by the sampler's own functions (sampler.py).

Randomness: a seeded sequence draws, from its own generator and in this order, k uniforms (one per
draft token, for acceptance) and then vocab uniforms (the exponential race that samples the final
token, as the sampler does), whatever else is in the batch; unseeded sequences draw from torch's
global generator. A sequence with no drafts samples exactly as the plain sampler does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pagoda.engine.outputs import TokenLogprob
from pagoda.engine.sampling.params import SamplingParams
from pagoda.engine.sampling.sampler import process_logits, sample_from_probs, token_logprobs
from pagoda.engine.sampling.sampling_metadata import SamplingMetadata
from pagoda.engine.spec_decode.metrics import SpecDecodeMetrics


@dataclass
class RejectionOutput:
    token_ids: list[list[int]]  # per sequence: its accepted draft tokens, then one sampled token
    num_accepted: list[int]  # per sequence: how many of its draft tokens were accepted
    logprobs: list[list[TokenLogprob] | None]  # per sequence, one per emitted token; None: not asked


@dataclass
class _Layout:
    """Where each sequence's rows are: target rows are flat, k_i + 1 per sequence in order; draft
    tokens are flat too, k_i per sequence (the order of `draft_probs`' rows)."""

    num_drafts: list[int]  # k_i
    k: torch.Tensor  # [batch] int64, k_i
    seq_start: torch.Tensor  # [batch] int64: the sequence's first target row
    draft_start: torch.Tensor  # [batch] int64: the sequence's first draft token
    draft_rows: torch.Tensor  # [num_draft_tokens] int64: the target row that verifies each draft
    draft_seq: torch.Tensor  # [num_draft_tokens] int64: its sequence
    draft_pos: torch.Tensor  # [num_draft_tokens] int64: its position in the sequence's draft
    draft_tok: torch.Tensor  # [num_draft_tokens] int64

    @classmethod
    def build(cls, drafts: Sequence[Sequence[int]], device: torch.device) -> _Layout:
        ks = [len(d) for d in drafts]
        k = torch.tensor(ks, dtype=torch.int64)
        seq_start = torch.cumsum(k + 1, 0) - (k + 1)
        draft_start = torch.cumsum(k, 0) - k
        draft_seq = torch.repeat_interleave(torch.arange(len(ks)), k)
        draft_pos = torch.arange(int(k.sum())) - draft_start[draft_seq]
        tok = torch.tensor([t for d in drafts for t in d], dtype=torch.int64)
        return cls(
            ks,
            k.to(device),
            seq_start.to(device),
            draft_start.to(device),
            (seq_start[draft_seq] + draft_pos).to(device),
            draft_seq.to(device),
            draft_pos.to(device),
            tok.to(device),
        )

    def leading_accepted(self, accepted: torch.Tensor) -> torch.Tensor:
        """[batch] int64: per sequence, how many draft tokens were accepted before the first
        rejection (`accepted` [num_draft_tokens] bool)."""
        grid = torch.zeros(len(self.num_drafts), max(self.num_drafts) + 1, dtype=torch.int64)
        grid = grid.to(accepted.device)
        grid[self.draft_seq, self.draft_pos] = accepted.long()  # column max_k stays 0: a stop
        return grid.cumprod(dim=1).sum(dim=1)


class RejectionSampler:
    """Stateless but for the metrics it fills; `target_logits` is read, never written."""

    def __init__(
        self,
        vocab_size: int,
        eos_token_ids: Sequence[int],
        device: torch.device,
        metrics: SpecDecodeMetrics | None = None,
    ) -> None:
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(eos_token_ids)
        self.device = device
        self.metrics = metrics

    def __call__(
        self,
        target_logits: torch.Tensor,
        drafts: Sequence[Sequence[int]],
        draft_probs: torch.Tensor | None,
        params: Sequence[SamplingParams],
        prompt_token_ids: Sequence[Sequence[int]],
        output_token_ids: Sequence[Sequence[int]],
        generators: Sequence[torch.Generator | None],
    ) -> RejectionOutput:
        """One step's verification of a batch of sequences.

        target_logits: [sum(k_i + 1), vocab], k_i + 1 rows per sequence in order (row j: the
          target's logits for the token after the context and drafts[i][:j]);
        drafts: per sequence its k_i draft tokens (k_i may be 0);
        draft_probs: [sum(k_i), vocab], the distribution each draft token was drawn from, or None
          for deterministic drafts (n-gram);
        params, prompt_token_ids, output_token_ids (verified output before this step), generators:
          per sequence, as for the plain sampler.
        """
        n_seq = len(drafts)
        assert len(params) == n_seq and len(generators) == n_seq, (n_seq, len(params), len(generators))
        lay = _Layout.build(drafts, self.device)
        num_rows, num_draft = sum(lay.num_drafts) + n_seq, len(lay.draft_tok)
        assert tuple(target_logits.shape) == (num_rows, self.vocab_size), (target_logits.shape, num_rows)
        assert draft_probs is None or tuple(draft_probs.shape) == (num_draft, self.vocab_size), (
            None if draft_probs is None else draft_probs.shape,
            num_draft,
        )
        if num_draft:
            lo, hi = int(lay.draft_tok.min()), int(lay.draft_tok.max())
            assert 0 <= lo and hi < self.vocab_size, (lo, hi, self.vocab_size)
        if n_seq == 0:
            return RejectionOutput([], [], [])
        meta = self._metadata(lay, drafts, params, prompt_token_ids, output_token_ids)
        x, y = process_logits(target_logits, meta)
        steps = _Steps(lay, meta, x, y, draft_probs, [p.greedy for p in params], generators)
        accepted = lay.leading_accepted(steps.accept_flags())  # [batch]
        final = steps.final_tokens(accepted)  # [batch]
        return self._output(lay, drafts, meta, x, y, accepted, final)

    def _metadata(
        self,
        lay: _Layout,
        drafts: Sequence[Sequence[int]],
        params: Sequence[SamplingParams],
        prompts: Sequence[Sequence[int]],
        outputs: Sequence[Sequence[int]],
    ) -> SamplingMetadata:
        """The plain sampler's metadata over the flat target rows: row j of a sequence sees the
        sequence's output followed by its first j draft tokens."""
        row_params, row_prompts, row_outputs = [], [], []
        for p, prompt, out, d in zip(params, prompts, outputs, drafts, strict=True):
            out = list(out)
            for j in range(len(d) + 1):
                row_params.append(p)
                row_prompts.append(prompt)
                row_outputs.append(out + list(d[:j]) if j else out)
        return SamplingMetadata.build(
            row_params,
            row_prompts,
            row_outputs,
            [None] * len(row_params),
            vocab_size=self.vocab_size,
            eos_token_ids=self.eos_token_ids,
            device=self.device,
        )

    def _output(
        self,
        lay: _Layout,
        drafts: Sequence[Sequence[int]],
        meta: SamplingMetadata,
        x: torch.Tensor,
        y: torch.Tensor | None,
        accepted: torch.Tensor,
        final: torch.Tensor,
    ) -> RejectionOutput:
        n_acc: list[int] = accepted.tolist()
        final_ids: list[int] = final.tolist()
        tokens = [[*d[:n], f] for d, n, f in zip(drafts, n_acc, final_ids, strict=True)]
        if self.metrics is not None:
            for k, n in zip(lay.num_drafts, n_acc, strict=True):
                self.metrics.observe_draft(k, n)
        logprobs: list[list[TokenLogprob] | None] = [None] * len(drafts)
        if meta.logprob_rows:
            # every row's "sampled" token: its draft token, or the final one; rows after it unused
            row_tokens = torch.zeros(meta.num_rows, dtype=torch.int64, device=x.device)
            row_tokens[lay.draft_rows] = lay.draft_tok
            row_tokens[lay.seq_start + accepted] = final
            rows = token_logprobs(x, y, row_tokens, row_tokens.tolist(), meta)
            starts: list[int] = lay.seq_start.tolist()
            for i, (s, n) in enumerate(zip(starts, n_acc, strict=True)):
                if rows[s] is not None:
                    logprobs[i] = [lp for lp in rows[s : s + n + 1] if lp is not None]
        return RejectionOutput(tokens, n_acc, logprobs)


class _Steps:
    """The vectorised steps of one verification, over the flat rows of `_Layout`."""

    def __init__(
        self,
        lay: _Layout,
        meta: SamplingMetadata,
        x: torch.Tensor,
        y: torch.Tensor | None,
        draft_probs: torch.Tensor | None,
        greedy: list[bool],
        generators: Sequence[torch.Generator | None],
    ) -> None:
        self.lay, self.x, self.draft_probs, self.generators = lay, x, draft_probs, generators
        dev = x.device
        self.greedy_seqs = torch.tensor([i for i, g in enumerate(greedy) if g], dtype=torch.int64, device=dev)
        self.random_seqs = [i for i, g in enumerate(greedy) if not g]
        self.p = _target_probs(y) if y is not None else None  # [num_random_rows, vocab]
        # y_index[row]: the row's index among the random rows (the rows of y); -1 for greedy rows
        self.y_index = torch.full((meta.num_rows,), -1, dtype=torch.int64, device=dev)
        if meta.all_random:
            self.y_index = torch.arange(meta.num_rows, device=dev)
        elif meta.random_rows is not None:
            self.y_index[meta.random_rows] = torch.arange(len(meta.random_rows), device=dev)
        self.draft_greedy = torch.tensor(greedy, dtype=torch.bool, device=dev)[lay.draft_seq]
        # [num_rows]: the greedy pick of every row (one pass, cheaper than two gathers of rows)
        self.argmax = x.argmax(dim=-1) if len(self.greedy_seqs) else None

    def accept_flags(self) -> torch.Tensor:
        """[num_draft_tokens] bool: whether each draft token passes its own test (greedy: it is the
        argmax; random: u * q < p with u ~ U[0, 1), i.e. probability min(1, p / q))."""
        lay = self.lay
        flags = torch.zeros(len(lay.draft_tok), dtype=torch.bool, device=self.x.device)
        if self.argmax is not None:
            flags = self.argmax[lay.draft_rows] == lay.draft_tok
        if self.p is not None and len(lay.draft_tok):
            u = torch.rand(len(lay.draft_tok), device=self.x.device)
            for i in self.random_seqs:  # seeded sequences: k_i uniforms from their own generator
                gen, k = self.generators[i], lay.num_drafts[i]
                if gen is not None and k:
                    s = int(lay.draft_start[i])
                    u[s : s + k] = torch.rand(k, generator=gen, device=self.x.device)
            p_d = self.p[self.y_index[lay.draft_rows].clamp(min=0), lay.draft_tok]
            if self.draft_probs is None:
                q_d = torch.ones_like(p_d)
            else:
                q_d = self.draft_probs[torch.arange(len(lay.draft_tok), device=u.device), lay.draft_tok]
            flags = torch.where(self.draft_greedy, flags, _accept(u, p_d, q_d.float()))
        return flags

    def final_tokens(self, accepted: torch.Tensor) -> torch.Tensor:
        """[batch] int64: the token after each sequence's accepted drafts (greedy: the argmax;
        random: from the residual after a rejection, from p after all were accepted)."""
        lay = self.lay
        final = torch.zeros(len(lay.num_drafts), dtype=torch.int64, device=self.x.device)
        if self.argmax is not None:
            rows = lay.seq_start[self.greedy_seqs] + accepted[self.greedy_seqs]
            final[self.greedy_seqs] = self.argmax[rows]
        if self.p is not None:
            seqs = torch.tensor(self.random_seqs, dtype=torch.int64, device=self.x.device)
            n, k = accepted[seqs], lay.k[seqs]
            p_fin = self.p[self.y_index[lay.seq_start[seqs] + n]]  # [num_random_seqs, vocab], a copy
            rejected = n < k
            q_fin = torch.zeros_like(p_fin)
            if len(lay.draft_tok):  # the rejected draft token's q (one-hot for deterministic drafts)
                d = (lay.draft_start[seqs] + n).clamp(max=len(lay.draft_tok) - 1)
                if self.draft_probs is None:
                    q_fin.scatter_(1, lay.draft_tok[d].unsqueeze(1), rejected.float().unsqueeze(1))
                else:
                    q_fin = self.draft_probs[d].float() * rejected.unsqueeze(1)
            w = _recovery_weights(p_fin, q_fin, rejected)
            # p == q up to rounding can reject with an all-zero residual: p itself is then exact
            w = torch.where((w.sum(dim=-1, keepdim=True) > 0), w, p_fin)
            gens = {j: g for j, i in enumerate(self.random_seqs) if (g := self.generators[i]) is not None}
            final[seqs] = sample_from_probs(w, gens)
        return final


def _target_probs(y: torch.Tensor) -> torch.Tensor:
    """p of the random rows from their processed logits y. [num_random_rows, vocab]"""
    return y.softmax(dim=-1)


def _accept(u: torch.Tensor, p_d: torch.Tensor, q_d: torch.Tensor) -> torch.Tensor:
    """Accept with probability min(1, p / q): u < p / q, without dividing (q may be 0 where the
    draft never drew the token)."""
    return u * q_d < p_d


def _recovery_weights(p: torch.Tensor, q: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Unnormalised weights of the final token ([rows, vocab]): max(0, p - q) after a rejection, p
    (the bonus token) after all drafts were accepted. The race in `sample_from_probs` normalises."""
    return torch.where(rejected.unsqueeze(1), (p - q).clamp_(min=0), p)

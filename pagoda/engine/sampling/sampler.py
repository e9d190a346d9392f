"""Batched sampling: one call per engine step turns `[num_rows, vocab]` logits into one token per row.

Stages, in vLLM's order, each skipped when no row of the step needs it:
grammar masks (structured outputs) -> logit_bias -> min_tokens -> repetition penalty ->
frequency/presence penalties -> greedy argmax;
for the other rows: temperature -> top-k -> top-p -> min-p -> exponential race (probs / Exp(1), argmax).
Rows with a seeded generator draw their noise from it alone, so their tokens do not depend on the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pagoda.engine.outputs import TokenLogprob
from pagoda.engine.quantization import native
from pagoda.engine.sampling.sampling_metadata import SamplingMetadata

_NEG_INF = float("-inf")
# top-p first looks for the nucleus among this many best tokens; rows whose nucleus is wider
# (flat distributions, top_p close to 1) retry with 8x more candidates, up to a full sort.
_TOP_P_CANDIDATES = 1024
# Rows of [rows, vocab] tensors are picked with advanced indexing (x[rows]): on CPU, index_select
# over them ran ~20x slower (torch 2.13).


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """The generator a seeded request keeps for its whole life; None for unseeded requests."""
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


@dataclass
class SamplerOutput:
    token_ids: list[int]  # one per row
    logprobs: list[TokenLogprob | None]  # None for rows that did not ask (params.logprobs is None)


class Sampler:
    """Stateless; `logits` ([num_rows, vocab] float32) is read, never written."""

    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        assert logits.dim() == 2 and logits.shape[0] == meta.num_rows, (tuple(logits.shape), meta.num_rows)
        assert logits.shape[1] == meta.vocab_size, (logits.shape[1], meta.vocab_size)
        if meta.num_rows == 0:
            return SamplerOutput([], [])
        x, y = process_logits(logits, meta)
        tokens = None if meta.all_random else x.argmax(dim=-1)  # [num_rows]
        if y is not None:
            sampled = _sample(y, meta.generators)
            if tokens is None:
                tokens = sampled
            else:
                assert meta.random_rows is not None
                tokens = tokens.index_copy(0, meta.random_rows, sampled)
        assert tokens is not None
        token_ids: list[int] = tokens.tolist()
        return SamplerOutput(token_ids, token_logprobs(x, y, tokens, token_ids, meta))


def process_logits(logits: torch.Tensor, meta: SamplingMetadata) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(x, y): x [num_rows, vocab] float32, the logits after the processors (grammar masks, logit_bias,
    min_tokens, penalties), what greedy rows take the argmax of; y [num_random, vocab], the random
    rows' logits after temperature, top-k, top-p and min-p (softmax(y) is what they sample from), None
    when every row is greedy. `logits` is not written; x may be `logits.float()` itself when nothing
    processes it."""
    x = logits.float()
    if meta.needs_processing:
        x = x.clone() if x is logits else x
        x = _apply_processors(x, meta)
    y = None
    if not meta.all_greedy:
        if meta.random_rows is not None:
            y = _apply_filters(x[meta.random_rows], meta, owned=True)
        else:
            y = _apply_filters(x, meta, owned=x is not logits)
    return x, y


def _apply_processors(x: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """The grammars' masks, logit_bias, min_tokens and the penalties, in place on x ([num_rows,
    vocab])."""
    if meta.grammar_rows is not None:
        assert meta.grammar_bitmask is not None
        _apply_bitmask(x, meta.grammar_bitmask, meta.grammar_rows)
    if meta.bias_rows is not None:
        assert meta.bias_tokens is not None and meta.bias_values is not None
        x.index_put_((meta.bias_rows, meta.bias_tokens), meta.bias_values, accumulate=True)
    if meta.banned_rows is not None:
        assert meta.banned_tokens is not None
        x.index_put_((meta.banned_rows, meta.banned_tokens), torch.tensor(_NEG_INF, device=x.device))
    if meta.repetition_penalty is not None:  # divide positive logits, multiply negative ones
        assert meta.seen_ids is not None
        rp = meta.repetition_penalty
        seen = x.gather(1, meta.seen_ids)  # [num_rows, max_seen]
        x.scatter_(1, meta.seen_ids, torch.where(seen > 0, seen / rp, seen * rp))
    if meta.frequency_penalty is not None:
        assert meta.presence_penalty is not None
        assert meta.output_ids is not None and meta.output_mask is not None
        counts = torch.zeros_like(x).scatter_add_(1, meta.output_ids, meta.output_mask)  # [num_rows, vocab]
        count = counts.gather(1, meta.output_ids)  # [num_rows, max_output]
        penalty = meta.frequency_penalty * count + meta.presence_penalty * (count > 0)
        x.scatter_(1, meta.output_ids, x.gather(1, meta.output_ids) - penalty)
    return x


_BYTE_BITS: dict[torch.device, torch.Tensor] = {}  # [256, 8] bool: the bits of each byte, low first


def _apply_bitmask(x: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    """-inf, in place, for the tokens rows' grammars ban (pagoda's CPU kernel where it is built:
    csrc/bitmask.cpp)."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and native.available():
        torch.ops.pagoda_cpu.apply_token_bitmask_(x, bitmask, rows)
        return
    banned = ~unpack_bitmask(bitmask, x.shape[1])
    if rows.shape[0] == x.shape[0]:  # every row constrained: rows are 0..n-1, in order
        x.masked_fill_(banned, _NEG_INF)
    else:
        x[rows] = x[rows].masked_fill_(banned, _NEG_INF)


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """bool [rows, vocab_size]: bit t % 32 of word t // 32 of each row of `bitmask` (int32), read
    a byte at a time through a table (little-endian: bit t % 8 of byte t // 8): 1.1 ms for 16 rows
    of a 49k vocabulary on a 2-core CPU, where shifting every word 32 times took 1.9 ms."""
    table = _BYTE_BITS.get(bitmask.device)
    if table is None:
        table = ((torch.arange(256)[:, None] >> torch.arange(8)) & 1).bool().to(bitmask.device)
        _BYTE_BITS[bitmask.device] = table
    as_bytes = bitmask.contiguous().view(torch.uint8).long()  # [rows, 4 * words]
    return table[as_bytes].view(bitmask.shape[0], -1)[:, :vocab_size]


def _apply_filters(y: torch.Tensor, meta: SamplingMetadata, owned: bool) -> torch.Tensor:
    """temperature, top-k, top-p, min-p on y ([num_random, vocab]); in place only when `owned`."""
    if meta.temperature is not None:
        y = y.div_(meta.temperature) if owned else y / meta.temperature
    elif not owned and (meta.top_k is not None or meta.top_p is not None or meta.min_p is not None):
        y = y.clone()
    if meta.top_k is not None or meta.top_p is not None:
        V = y.shape[1]
        K = max(meta.max_top_k, min(V, _TOP_P_CANDIDATES)) if meta.top_p is not None else meta.max_top_k
        cand, cand_ids = y.topk(K, dim=-1)  # [num_random, K], descending
        if meta.top_k is not None:
            k = meta.top_k
            thresh = cand.gather(1, k.clamp(max=K) - 1)
            thresh.masked_fill_(k > K, _NEG_INF)  # rows with top-k off
            y.masked_fill_(y < thresh, _NEG_INF)  # ties with the k-th token stay, as in vLLM
            cand.masked_fill_(cand < thresh, _NEG_INF)
        if meta.top_p is not None:
            thresh, covered = _nucleus_threshold(y, cand, cand_ids, meta.top_p)
            while not bool(covered.all()):  # a nucleus wider than the candidates: 8x more, then all
                K = min(V, K * 8)
                rows = (~covered).nonzero()[:, 0]
                sub = y[rows]
                sub_thresh, sub_covered = _nucleus_threshold(
                    sub, *sub.topk(K, dim=-1), meta.top_p.index_select(0, rows)
                )
                thresh = thresh.index_copy(0, rows, sub_thresh)
                covered = covered.index_copy(0, rows, sub_covered)
            y.masked_fill_(y < thresh, _NEG_INF)
    if meta.min_p is not None:
        # p < min_p * p_max  <=>  logit < max_logit + log(min_p); log(0) = -inf keeps every token
        y.masked_fill_(y < y.amax(dim=-1, keepdim=True) + meta.min_p.log(), _NEG_INF)
    return y


def _nucleus_threshold(
    y: torch.Tensor, cand: torch.Tensor, cand_ids: torch.Tensor, top_p: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the smallest logit of the nucleus (-inf where top-p is off) and whether `cand` held it.

    y: [rows, vocab] logits; cand, cand_ids: [rows, K] the K best of them, descending, and their
    token ids; top_p: [rows, 1].
    A token stays when the probability of the tokens before it is < top_p (vLLM: the tail of the
    ascending cumulative sum that is <= 1 - top_p is dropped); the best token always stays.
    """
    probs = y.softmax(dim=-1).gather(1, cand_ids)  # [rows, K]
    cum = probs.cumsum(dim=-1)
    before = F.pad(cum[:, :-1], (1, 0))
    keep = (before < top_p) & (cand > _NEG_INF)
    keep[:, 0] = True
    thresh = cand.gather(1, keep.sum(dim=-1, keepdim=True) - 1)
    off = top_p >= 1.0
    thresh.masked_fill_(off, _NEG_INF)
    covered = (cum[:, -1:] >= top_p) | (cand[:, -1:] == _NEG_INF) | off | (cand.shape[1] == y.shape[1])
    return thresh, covered[:, 0]


def _sample(y: torch.Tensor, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """One token per row of the processed logits y ([rows, vocab]). [rows]"""
    return sample_from_probs(y.softmax(dim=-1), generators)


def sample_from_probs(probs: torch.Tensor, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """argmax(probs / q) with q ~ Exp(1): the same law as sampling from probs normalised (rows need
    not sum to 1; `probs` [rows, vocab] is overwritten). [rows] int64

    q = -log(U), U ~ Uniform[0, 1), so q is in (0, inf] and a filtered token (prob 0) never wins.
    argmax(probs / -log U) is computed as argmin(probs / log U), saving a pass over [rows, vocab].
    Row r draws its vocab uniforms from generators[r] alone where it has one.
    """
    u = torch.empty_like(probs)
    if len(generators) < u.shape[0]:
        u.uniform_()
    for row, gen in generators.items():
        u[row].uniform_(generator=gen)
    return probs.div_(u.log_()).argmin(dim=-1)


def token_logprobs(
    x: torch.Tensor,
    y: torch.Tensor | None,
    tokens: torch.Tensor,
    token_ids: list[int],
    meta: SamplingMetadata,
) -> list[TokenLogprob | None]:
    """Sampled token's logprob and top-k from the processed distribution: y for random rows (after
    temperature and filters), x for greedy rows (after penalties, temperature 1)."""
    out: list[TokenLogprob | None] = [None] * meta.num_rows
    if not meta.logprob_rows:
        return out
    parts = []
    if meta.logprob_greedy_rows is not None:
        parts.append(x[meta.logprob_greedy_rows])
    if meta.logprob_random_pos is not None:
        assert y is not None
        parts.append(y[meta.logprob_random_pos])
    lsm = torch.cat(parts).log_softmax(dim=-1)  # [num_logprob_rows, vocab], rows as meta.logprob_rows
    rows = torch.tensor(meta.logprob_rows, device=lsm.device)
    chosen: list[float] = lsm.gather(1, tokens.index_select(0, rows).unsqueeze(1))[:, 0].tolist()
    max_k = max(meta.logprob_k)
    top_vals: list[list[float]] = [[] for _ in meta.logprob_rows]
    top_ids: list[list[int]] = [[] for _ in meta.logprob_rows]
    if max_k > 0:
        vals, ids = lsm.topk(max_k, dim=-1)  # sorted, descending
        top_vals, top_ids = vals.tolist(), ids.tolist()
    for j, (r, k) in enumerate(zip(meta.logprob_rows, meta.logprob_k, strict=True)):
        top = dict(zip(top_ids[j][:k], top_vals[j][:k], strict=True))
        out[r] = TokenLogprob(token_ids[r], chosen[j], top)
    return out

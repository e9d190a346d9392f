"""The worker's grammars: compiled on a thread of their own, cached by their params, one matcher
per sequence, and the token bitmask of a step's constrained rows.

A request that asks for structured output waits in the engine (not in the batcher) until its
grammar is ready, so a slow compile holds up that request alone. Each sequence keeps an llguidance
matcher that has consumed its output tokens; before sampling, the matchers of the step's rows write
one bitmask row each (a bit per token that may come next), and the sampler sets every other
token's logit to -inf.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch
from llguidance import LLExecutor, LLMatcher

from pagoda.engine.structured.grammar import grammar_of, lltokenizer
from pagoda.engine.structured.params import StructuredOutputsParams

if TYPE_CHECKING:
    from pagoda.engine.tokenization.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

CACHE_SIZE = 256  # compiled grammars kept (a fresh matcher each, copied for every new sequence)


class SequenceGrammar:
    """One sequence's place in its grammar."""

    def __init__(self, matcher: LLMatcher) -> None:
        self.matcher = matcher

    def accept(self, token: int) -> None:
        """Advance past the sampled `token`. A token the mask allowed always fits; one that does
        not (a bug) leaves the matcher in its error state, which ends the sequence."""
        if not self.matcher.consume_token(token):
            logger.warning("token %d broke its grammar: %s", token, self.matcher.get_error())

    def admits(self, drafts: Sequence[int]) -> int:
        """How many of `drafts` (speculative tokens after the output so far) the grammar admits in
        a row; the matcher does not move."""
        return int(self.matcher.validate_tokens(list(drafts)))

    @property
    def done(self) -> bool:
        """Whether the grammar admits no further token (it consumed EOS, or its text is complete
        and cannot grow)."""
        return bool(self.matcher.is_stopped() or self.matcher.is_error())


class GrammarCompiler:
    """Compiles grammars off the step thread. `vocab_size` is the model's (its logits' width)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pagoda-grammar")
        self._compiled: OrderedDict[StructuredOutputsParams, LLMatcher] = OrderedDict()
        self.first_compile_s: float | None = None  # the first grammar's wait, tokenizer included

    def warm(self) -> None:
        """Build llguidance's view of the tokenizer now, on the grammar thread (~0.5 s and ~40
        MiB for a 49k vocabulary), so that the first structured request does not wait for it."""
        self._pool.submit(lltokenizer, self.tokenizer, self.vocab_size)

    def submit(
        self, so: StructuredOutputsParams, count: int, resumed: Sequence[int] = ()
    ) -> Future[list[SequenceGrammar]]:
        """`count` fresh sequences' grammars, each past the `resumed` output tokens (a request
        re-run after its worker was lost)."""
        return self._pool.submit(self._sequences, so, count, list(resumed))

    def _sequences(
        self, so: StructuredOutputsParams, count: int, resumed: list[int]
    ) -> list[SequenceGrammar]:
        t0 = time.perf_counter()
        proto = self._compiled.get(so)
        if proto is None:
            proto = LLMatcher(lltokenizer(self.tokenizer, self.vocab_size), grammar_of(so), log_level=0)
            if proto.is_error():
                raise ValueError(f"invalid {so.kind}: {proto.get_error()}")
            self._compiled[so] = proto
            if len(self._compiled) > CACHE_SIZE:
                self._compiled.popitem(last=False)
            if self.first_compile_s is None:
                self.first_compile_s = time.perf_counter() - t0
                logger.info("structured outputs: first grammar ready in %.3f s", self.first_compile_s)
        else:
            self._compiled.move_to_end(so)
        out = []
        for _ in range(count):
            m = proto.deep_copy()
            if resumed and not m.consume_tokens(resumed):
                raise ValueError(f"the resumed output does not fit the {so.kind}: {m.get_error()}")
            out.append(SequenceGrammar(m))
        return out


@functools.cache
def _mask_threads() -> tuple[ThreadPoolExecutor, LLExecutor]:
    """The thread that fills masks while the model runs, and llguidance's executor on it."""
    return ThreadPoolExecutor(1, thread_name_prefix="pagoda-masks"), LLExecutor(num_threads=1)


def fill_bitmask_async(
    grammars: Sequence[SequenceGrammar], vocab_size: int, drafts: Sequence[Sequence[int]] | None = None
) -> Future[torch.Tensor]:
    """The tokens each of `grammars` allows next, as int32 [rows, ceil(vocab_size / 32)] (token t
    is bit t % 32 of word t // 32), filled on a thread of its own: the step runs the model
    meanwhile. One row per grammar; with `drafts` (speculative decoding: each sequence's proposed
    tokens), 1 + len(drafts[i]) rows for grammar i, in order: what may follow its output, then
    what may follow each of its drafts in turn (rows after a draft the grammar refuses are not
    meaningful: verification stops there, `SequenceGrammar.admits`). The grammars must not move
    until it is done; they end where they began."""
    threads, executor = _mask_threads()
    counts = [1 + len(d) for d in drafts] if drafts is not None else [1] * len(grammars)
    bitmask = torch.zeros(sum(counts), -(-vocab_size // 32), dtype=torch.int32)
    starts = [sum(counts[:i]) for i in range(len(counts))]

    def fill() -> torch.Tensor:
        ptr, row_bytes, rows = bitmask.data_ptr(), bitmask.shape[1] * 4, bitmask.shape[0]
        proposed = drafts or [()] * len(grammars)
        rows_of = list(zip(grammars, starts, proposed, strict=True))
        pairs = [(g.matcher, s) for g, s, d in rows_of if not d]
        triples = [(g.matcher, s, list(d)) for g, s, d in rows_of if d]  # llguidance: never empty
        if pairs:
            executor.unsafe_compute_mask_ptr(pairs, ptr, row_bytes, rows)
        if triples:
            executor.unsafe_compute_mask_ptr_with_draft_token(triples, ptr, row_bytes, rows)
        return bitmask

    return threads.submit(fill)

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


def fill_bitmask_async(grammars: Sequence[SequenceGrammar], vocab_size: int) -> Future[torch.Tensor]:
    """The tokens each of `grammars` allows next, as int32 [len(grammars), ceil(vocab_size / 32)]
    (token t is bit t % 32 of word t // 32), filled on a thread of its own: the step runs the
    model meanwhile. The grammars must not move until it is done."""
    threads, executor = _mask_threads()
    bitmask = torch.empty(len(grammars), -(-vocab_size // 32), dtype=torch.int32)
    pairs = [(g.matcher, i) for i, g in enumerate(grammars)]

    def fill() -> torch.Tensor:
        executor.unsafe_compute_mask_ptr(pairs, bitmask.data_ptr(), bitmask.shape[1] * 4, len(pairs))
        return bitmask

    return threads.submit(fill)

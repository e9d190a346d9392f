"""Speculative decoding (issue 19): the config, the proposers, the rejection sampler and its
metrics, wired into the engine's step loop for the n-gram and draft-model methods.

- `config.SpeculativeConfig.parse(json)`: `--speculative-config` as vLLM spells it
  (`EngineConfig.speculative_config`; "layer_skip" is refused there).
- `proposer.Proposer` (ABC) and `make_proposer(config, max_model_len)`: "ngram" is built
  (`ngram.NgramProposer`); "layer_skip" (pagoda's self-speculation: the target's own first layers
  as the draft) is parsed but raises NotImplementedError.
- `draft_model.DraftModelProposer` and `draft_runner.DraftRunner`: "draft_model", a smaller model
  of the target's vocabulary drafting greedily over a KV cache of its own indexed by the target's
  block tables (loaded by EngineCore before the KV cache is sized: the budget counts its bytes per
  block); a deferred proposer, asked after the step's slots are allocated (`Speculation.fill`).
- `rejection_sampler.RejectionSampler`: exact verification, every sampling parameter applied to
  the target's distribution by the plain sampler's own functions.
- `metrics.SpecDecodeMetrics`: vLLM's `vllm:spec_decode_*` counters, filled by the sampler.
- `engine_parts.SpecParts`: what EngineCore builds from the config: the batcher's `Speculation`,
  the runner's rejection sampler and the metrics they share (CoreCounters.spec_*).

How the step loop runs it:

1. Proposer state follows the batcher (`scheduling/speculation.py`): `add_request` when a request
   starts running (first schedule, or resumed after preemption), `append` with the tokens each
   step emitted, `remove_request` when it finishes or is preempted.
2. Scheduling (`Batcher._schedule_running`): in a step with at most `disable_by_batch_size`
   running sequences, each decoding sequence without a grammar is asked for up to k drafts, capped
   by the budget left less its own token, by its max_tokens and by the adaptive policy
   (`adaptive.AdaptivePolicy`: only the drafts whose expected acceptance pays for their rows at
   this batch size; seeded requests always get k); it is scheduled with 1 + k_i query
   tokens (budget and KV slots) when the slots are free (drafts never preempt), else plain.
   `BatchPlan.spec_token_ids` carries the drafts. A deferred proposer (the draft model) tells how
   many drafts it will give; once the step is scheduled, `Speculation.fill` has it propose for all
   of the step's drafted sequences at once, writing its KV into the slots just allocated.
3. The runner (`_FlatBatch.add`) makes each of the 1 + k_i tokens a decode row of its own that
   attends to the positions up to its own: the arithmetic of a plain decode (greedy output equals
   the engine's without speculation), and a decode-only step, so the compiled graphs, CUDA graphs
   and paged decode kernels run verification unchanged. Logits for all rows go to the rejection
   sampler (`runner/spec_verify.py`), which returns 1..k_i + 1 tokens (and logprobs) per sequence.
4. Rollback (`Batcher.update`): num_computed_tokens advances by 1 + accepted; `KVCacheManager.trim`
   gives back the blocks only rejected drafts reached (the runner drops them from its table too);
   the rejected KV left in kept blocks is overwritten next step. Block hashes cover verified tokens
   only, so no cached block holds a rejected token. Stop tokens and max_tokens are checked token
   by token over the emitted tokens, dropping the rest; stop strings are the gateway's, on text.
5. Metrics: CoreCounters' spec_* fields, exported by the metrics collector as
   `vllm:spec_decode_num_drafts`, `..._num_draft_tokens`, `..._num_accepted_tokens` and
   `..._num_accepted_tokens_per_pos{position}`.
6. Several ranks (pagoda/engine/distributed): rank 0 alone proposes and verifies. Its proposer and
   rejection sampler are the ones above; the verification rows are rows of the step the other
   ranks run (FORWARD), their logits gathered to rank 0 (tensor parallel) or sent by the last
   stage with the sampled rows' (`ModelRunner` names them all: `_FlatBatch.logits_rows`). A draft
   model runs whole on rank 0. Under pipeline stages a request is in one step in flight at most, so
   it is proposed for only once its previous step's tokens are verified.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# imported on first use, so that `config` (what the CLI parses) loads without torch
_EXPORTS = {
    "NgramProposer": "pagoda.engine.spec_decode.ngram",
    "Proposal": "pagoda.engine.spec_decode.proposer",
    "Proposer": "pagoda.engine.spec_decode.proposer",
    "RejectionOutput": "pagoda.engine.spec_decode.rejection_sampler",
    "RejectionSampler": "pagoda.engine.spec_decode.rejection_sampler",
    "SpecDecodeMetrics": "pagoda.engine.spec_decode.metrics",
    "SpeculativeConfig": "pagoda.engine.spec_decode.config",
    "make_proposer": "pagoda.engine.spec_decode.proposer",
    "ngram_draft": "pagoda.engine.spec_decode.ngram",
}

if TYPE_CHECKING:  # re-exports for the type checker, which cannot follow a lazy import
    from pagoda.engine.spec_decode.config import SpeculativeConfig  # noqa: F401
    from pagoda.engine.spec_decode.metrics import SpecDecodeMetrics  # noqa: F401
    from pagoda.engine.spec_decode.ngram import NgramProposer, ngram_draft  # noqa: F401
    from pagoda.engine.spec_decode.proposer import Proposal, Proposer, make_proposer  # noqa: F401
    from pagoda.engine.spec_decode.rejection_sampler import RejectionOutput, RejectionSampler  # noqa: F401

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pagoda.engine.spec_decode' has no attribute {name!r}")

"""Speculative decoding (issue 19), the self-contained parts: the config, the proposers, the
rejection sampler and its metrics. Nothing here is wired into the engine yet.

- `config.SpeculativeConfig.parse(json)`: `--speculative-config` as vLLM spells it.
- `proposer.Proposer` (ABC) and `make_proposer(config, max_model_len)`: "ngram" is built
  (`ngram.NgramProposer`); "draft_model" and "layer_skip" (pagoda's self-speculation: the target's
  own first layers as the draft) are parsed but raise NotImplementedError.
- `rejection_sampler.RejectionSampler`: exact verification, every sampling parameter applied to
  the target's distribution by the plain sampler's own functions.
- `metrics.SpecDecodeMetrics`: vLLM's `vllm:spec_decode_*` counters, filled by the sampler.

How the step-loop integration is meant to plug in (not done here):

1. Engine setup: `config = SpeculativeConfig.parse(args.speculative_config)`; one proposer
   (`make_proposer(config, max_model_len)`), one `RejectionSampler(vocab, eos_ids, device,
   metrics)` next to the plain sampler in the runner.
2. Proposer state follows the runner's request state: `add_request(rid, prompt + output)` when a
   request is added or resumed after preemption, `append(rid, emitted)` after each step with the
   tokens the step emitted, `remove_request(rid)` when it finishes or is preempted.
3. Scheduling: before a step, for decode sequences only (not while prefill is chunked, not above
   `config.enabled_for(num_running)`, not for structured-output requests, whose grammar would have
   to advance through drafts), `proposer.propose(rids, max_tokens=remaining budget - 1)`. A
   sequence with k_i drafts is scheduled with 1 + k_i query tokens (its last verified token, then
   the drafts) counted against the token budget; the batcher allocates KV slots for all of them.
4. Runner outputs needed: the logits of all 1 + k_i query positions of each such sequence (today
   the runner computes logits for the last position only), flat, sequence after sequence, which is
   `target_logits`; for a draft model also its per-position probabilities (`draft_probs`). The
   rejection sampler gets the sequences' params, prompt and verified output (without the drafts)
   and generators, and returns 1..k_i + 1 tokens per sequence (plus logprobs per token).
5. Rollback, in the batcher's bookkeeping after the step: num_computed_tokens advances by
   1 + num_accepted (the KV of the rejected drafts' positions stays in its slots and is simply
   overwritten next step: a counter change; blocks allocated only for rejected positions go back
   to the pool). Prefix-cache hashes are taken only over verified tokens, so no cached block ever
   holds a rejected token. Stop tokens/strings and max_tokens are checked token by token over the
   emitted list, truncating it.
6. Metrics: export `metrics` (take() per interval) as `vllm:spec_decode_num_drafts`,
   `..._num_draft_tokens`, `..._num_accepted_tokens`, `..._num_accepted_tokens_per_pos{position}`.
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

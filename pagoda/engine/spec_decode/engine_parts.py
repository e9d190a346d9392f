"""The engine's speculative decoding, built from `EngineConfig.speculative_config`: the proposer
on the batcher's side, the rejection sampler on the runner's, and the counters they share."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pagoda.engine.scheduling.speculation import Speculation
from pagoda.engine.spec_decode.adaptive import AdaptivePolicy
from pagoda.engine.spec_decode.config import SpeculativeConfig
from pagoda.engine.spec_decode.metrics import SpecDecodeMetrics
from pagoda.engine.spec_decode.proposer import make_proposer
from pagoda.engine.spec_decode.rejection_sampler import RejectionSampler


@dataclass
class SpecParts:
    speculation: Speculation  # the batcher's: which sequences get drafts, the proposer's state
    rejection: RejectionSampler  # the runner's: verification of the drafts
    metrics: SpecDecodeMetrics  # filled by the rejection sampler, read by `counters()`

    @classmethod
    def build(
        cls,
        config: SpeculativeConfig | None,
        max_model_len: int,
        vocab_size: int,
        eos_token_ids: Sequence[int],
        device: torch.device,
    ) -> SpecParts | None:
        """The parts of `config` (None: no speculation, no parts)."""
        if config is None:
            return None
        metrics = SpecDecodeMetrics(config.num_speculative_tokens)
        return cls(
            Speculation(
                config,
                make_proposer(config, max_model_len),
                AdaptivePolicy.for_device(device.type, config.num_speculative_tokens),
            ),
            RejectionSampler(vocab_size, eos_token_ids, device, metrics),
            metrics,
        )

    def counters(self) -> dict[str, Any]:
        """The running totals as CoreCounters' spec_* fields (plain values: safe to read from
        another thread while the step thread adds to them)."""
        m = self.metrics
        return {
            "spec_num_drafts": m.num_drafts,
            "spec_num_draft_tokens": m.num_draft_tokens,
            "spec_num_accepted_tokens": m.num_accepted_tokens,
            "spec_num_accepted_tokens_per_pos": tuple(m.num_accepted_tokens_per_pos),
        }


class SpecDecodeEngineMixin:
    """EngineCore's speculative decoding: its parts, built from the config (None: off)."""

    spec: SpecParts | None = None
    device: torch.device

    def _init_spec(
        self, config: SpeculativeConfig | None, max_model_len: int, vocab_size: int, eos: Sequence[int]
    ) -> Speculation | None:
        """Build the parts; returns the batcher's (None: no speculation)."""
        self.spec = SpecParts.build(config, max_model_len, vocab_size, eos, self.device)
        return self.spec.speculation if self.spec else None

    def _spec_counters(self) -> dict[str, Any]:
        """CoreCounters' spec_* fields ({} without speculation: their defaults)."""
        return self.spec.counters() if self.spec else {}

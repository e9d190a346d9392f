"""The engine's speculative decoding, built from `EngineConfig.speculative_config`: the proposer
on the batcher's side, the rejection sampler on the runner's, and the counters they share; for
method "draft_model", the draft model, loaded before the KV cache is sized (its KV takes the same
blocks' slots) and run by its proposer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from pagoda.engine.runner.attention import get_backend
from pagoda.engine.scheduling.speculation import Speculation
from pagoda.engine.spec_decode.adaptive import AdaptivePolicy
from pagoda.engine.spec_decode.config import SpeculativeConfig
from pagoda.engine.spec_decode.draft_model import DraftModelProposer
from pagoda.engine.spec_decode.draft_runner import DraftRunner, kv_bytes_per_block, load_draft_model
from pagoda.engine.spec_decode.metrics import SpecDecodeMetrics
from pagoda.engine.spec_decode.proposer import Proposer, make_proposer
from pagoda.engine.spec_decode.rejection_sampler import RejectionSampler

if TYPE_CHECKING:
    from pagoda.engine.config import EngineConfig
    from pagoda.engine.kv.kv_cache_manager import KVCacheManager
    from pagoda.engine.models import DecoderModel


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
        draft: Proposer | None = None,
    ) -> SpecParts | None:
        """The parts of `config` (None: no speculation, no parts); `draft`: the proposer of a
        draft model the engine loaded (method "draft_model")."""
        if config is None:
            return None
        k = config.num_speculative_tokens
        metrics = SpecDecodeMetrics(k)
        return cls(
            Speculation(
                config,
                draft if draft is not None else make_proposer(config, max_model_len),
                AdaptivePolicy.for_device(device.type, k) if config.adaptive else None,
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
    """EngineCore's speculative decoding: its parts, built from the config (None: off), and the
    draft model of method "draft_model"."""

    spec: SpecParts | None = None
    draft_model: DecoderModel | None = None
    config: EngineConfig
    device: torch.device
    dtype: torch.dtype
    quantization: str
    max_model_len: int
    kv: KVCacheManager

    def _load_draft(self, vocab_size: int) -> int:
        """Load the draft model of a "draft_model" config (before the KV cache is sized); the
        bytes its KV adds to each block (0: no draft model). With several ranks it loads whole on
        rank 0 (this process), the one that proposes: the followers never run it."""
        spec = self.config.speculative_config
        if spec is None or spec.method != "draft_model":
            return 0
        assert spec.model is not None, spec
        self.draft_model = load_draft_model(
            spec.model, vocab_size, self.max_model_len, self.device, self.dtype, self.quantization
        )
        return kv_bytes_per_block(self.draft_model, self.config.cache.block_size, self.dtype)

    def _init_spec(
        self, config: SpeculativeConfig | None, max_model_len: int, vocab_size: int, eos: Sequence[int]
    ) -> Speculation | None:
        """Build the parts (after `_load_draft` and the KV cache manager); returns the batcher's
        (None: no speculation)."""
        draft = None
        if config is not None and self.draft_model is not None:
            backend = get_backend(
                self.config.attention_backend, self.device, self.draft_model.attention_needs
            )
            cache = self.config.cache
            runner = DraftRunner(
                self.draft_model, backend, self.kv.pool.num_blocks, cache.block_size, self.dtype, self.device
            )
            draft = DraftModelProposer(
                runner,
                config.num_speculative_tokens,
                max_model_len,
                self.kv.blocks_of,
                self.config.batcher.max_num_batched_tokens,
            )
        self.spec = SpecParts.build(config, max_model_len, vocab_size, eos, self.device, draft)
        return self.spec.speculation if self.spec else None

    def _spec_counters(self) -> dict[str, Any]:
        """CoreCounters' spec_* fields ({} without speculation: their defaults)."""
        return self.spec.counters() if self.spec else {}

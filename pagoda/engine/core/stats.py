"""What an engine core tells about itself: its capacity, its live figures, its last step.

Plain frozen values, no torch: the worker heartbeats them and the metrics collector exports them,
neither reaching into the core's KV cache or config.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineCapacity:
    """Fixed when a core is built: what the cluster scheduler weighs a worker's load against and
    hashes prompts with."""

    max_num_seqs: int  # most sequences in one step
    block_size: int  # tokens per KV block (the prefix router's hash unit)
    num_blocks: int  # KV blocks in the cache (0: no KV cache is modeled)


@dataclass(frozen=True)
class CoreCounters:
    """A reading of the engine core's live figures (pagoda/services/ops/metrics.py exports them)."""

    num_running: int
    num_waiting: int
    kv_usage: float  # 0..1
    prefix_query_tokens: int  # prefix-cache lookups, in tokens
    prefix_hit_tokens: int
    num_preemptions: int
    kv_live_tokens: int = 0  # tokens stored in the KV blocks in use (a shared block once)
    kv_used_slots: int = 0  # blocks in use x block size
    kv_live_token_ratio: float = 0.0  # kv_live_tokens / kv_used_slots (0.0 when idle)
    num_prefilling: int = 0  # running sequences without a first token yet
    num_free_blocks: int = 0  # KV blocks no sequence holds (cached ones among them, evicted on demand)
    # speculative decoding's totals (SpecDecodeMetrics); empty per_pos: the engine does not speculate
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_num_accepted_tokens_per_pos: tuple[int, ...] = ()


@dataclass
class StepStats:
    """The figures of the core's last step (written by the step thread)."""

    num_scheduled_tokens: int = 0
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    num_preempted: int = 0

"""How many KV blocks an engine's cache holds: its memory budget over the bytes of one block.

A tensor-parallel rank holds only its KV heads (pagoda/engine/distributed), so a block costs it
that share of the bytes, and the same budget per rank holds more blocks: `--kv-cache-memory` (and
`--gpu-memory-utilization`) is what each rank spends, as vLLM counts it per GPU. A pipeline
stage's rank holds its layers' KV only: the stage with the most layers decides how many blocks.
"""

from __future__ import annotations

import torch

from pagoda.engine.config import EngineConfig
from pagoda.engine.distributed.pipeline import max_stage_layers
from pagoda.engine.models.arch_config import ModelArchConfig
from pagoda.engine.runner.kv_caches import kv_bytes_per_block

DEFAULT_CPU_KV_BYTES = 1 << 30


def size_kv_cache(
    config: EngineConfig,
    arch: ModelArchConfig,
    kv_heads: int,  # the KV heads this rank keeps (arch.num_kv_heads on one rank)
    dtype: torch.dtype,
    device: torch.device,
    max_model_len: int,
    extra_per_block: int = 0,
) -> tuple[int, int]:
    """(KV blocks, bytes per block): what the memory budget holds, or the override. Raises
    ValueError, saying what to change, when not one block fits or a whole context does not.
    `extra_per_block`: bytes another cache indexed by the same blocks takes per block (a
    speculative draft model's KV)."""
    cache = config.cache
    if arch.is_encoder:  # no KV kept: blocks are bookkeeping, enough for every sequence
        blocks = config.batcher.max_num_seqs * -(-max_model_len // cache.block_size)
        return cache.num_blocks_override or blocks, 0
    # a pipeline stage's rank holds its layers only: the largest stage sets the number of blocks
    layers = max_stage_layers(arch.num_layers, config.parallel.pipeline_parallel_size)
    per_block = kv_bytes_per_block(layers, cache.block_size, kv_heads, arch.head_dim, dtype) + extra_per_block
    budget = kv_budget(config, device)
    num_blocks = cache.num_blocks_override or budget // per_block
    if num_blocks < 1:
        raise ValueError(
            f"the KV cache does not fit: one block takes {per_block} bytes and "
            f"{budget} bytes are available; raise --kv-cache-memory or "
            f"--gpu-memory-utilization, or use a smaller model"
        )
    capacity = num_blocks * cache.block_size
    if cache.num_blocks_override is None and capacity < max_model_len:
        raise ValueError(
            f"max_model_len {max_model_len} exceeds the {capacity} tokens the KV cache holds "
            f"({num_blocks} blocks); raise --kv-cache-memory or lower --max-model-len"
        )
    return num_blocks, per_block


def kv_budget(config: EngineConfig, device: torch.device) -> int:
    """Bytes for one rank's KV cache."""
    cache = config.cache
    if cache.kv_cache_memory is not None:
        return cache.kv_cache_memory
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(free - (1.0 - cache.gpu_memory_utilization) * total)
    return DEFAULT_CPU_KV_BYTES

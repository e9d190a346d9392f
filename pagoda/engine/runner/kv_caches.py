"""A paged KV cache as the model code takes it: per layer a (K, V) pair of zeroed tensors
[num_blocks, block_size, kv_heads, head_dim], and the bytes one block of it takes. The target's
runner, the speculative draft's runner and one-off forwards (`forward_tokens`) allocate it alike."""

from __future__ import annotations

from typing import TypeAlias

import torch

KVCaches: TypeAlias = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (K, V)


def kv_bytes_per_block(
    num_layers: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype
) -> int:
    return 2 * num_layers * block_size * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def zero_kv_caches(
    num_layers: int, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device
) -> KVCaches:
    """A zeroed K and V tensor of `shape` ([num_blocks, block_size, kv_heads, head_dim]) per layer."""
    return [
        (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        for _ in range(num_layers)
    ]

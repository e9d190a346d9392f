"""One sequence through a model outside the serving loop: the hidden states of every position,
with a private KV cache sized for it. What offline tools need (`pagoda eval perplexity`, the
calibration pass of `pagoda quantize`): the same model code the server runs, no batcher."""

from __future__ import annotations

import torch

from pagoda.engine.models import DecoderModel
from pagoda.engine.quantization.vnni import prompt_rows
from pagoda.engine.runner.attention import AttentionMetadata, get_backend
from pagoda.engine.runner.kv_caches import zero_kv_caches

_BLOCK = 16


@torch.no_grad()
def forward_tokens(model: DecoderModel, token_ids: list[int] | torch.Tensor) -> torch.Tensor:
    """Hidden states [len(token_ids), hidden] of one sequence run as a single prefill (causal
    attention over the sequence itself, the rows computed as prompt rows) on the model's device
    and dtype; logits are `model.compute_logits(hidden)`."""
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):  # a quantized first parameter
        dtype = model.norm.weight.dtype
    ids = torch.as_tensor(token_ids, dtype=torch.int64, device=device)
    n = int(ids.numel())
    if n == 0:
        raise ValueError("forward_tokens needs at least one token")
    cfg = model.cfg
    blocks = -(-n // _BLOCK)
    shape = (blocks, _BLOCK, cfg.num_kv_heads, cfg.head_dim)
    caches = zero_kv_caches(cfg.num_layers, shape, dtype, device)
    table = torch.arange(blocks, dtype=torch.int64, device=device)
    meta = AttentionMetadata(
        slot_mapping=torch.arange(n, dtype=torch.int64, device=device),
        num_decode_tokens=0,
        decode_seq_lens=torch.zeros(0, dtype=torch.int64, device=device),
        decode_block_tables=torch.zeros(0, 0, dtype=torch.int64, device=device),
        decode_max_seq_len=0,
        prefill_query_starts=[0],
        prefill_query_lens=[n],
        prefill_context_lens=[0],
        prefill_block_tables=[table],
        query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=device),
        seq_lens=torch.tensor([n], dtype=torch.int32, device=device),
        block_tables=table.to(torch.int32)[None],
        max_query_len=n,
    )
    positions = torch.arange(n, dtype=torch.int64, device=device)
    backend = get_backend("auto", device, model.attention_needs)
    with prompt_rows(0):  # every row is a prompt token, as in the server's prefill
        return model(ids, positions, caches, meta, backend)  # type: ignore[no-any-return]

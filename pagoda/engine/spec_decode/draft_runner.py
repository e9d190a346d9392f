"""The draft model of speculative decoding's "draft_model" method: loaded by the engine on the
target's device and dtype, run over a paged KV cache of its own.

The draft's KV cache has the target's block_size and num_blocks, and a position's draft KV sits in
the same block and slot as its target KV: the batcher's block tables (KVCacheManager) serve both,
so prefix caching, preemption and rollback need nothing of their own here. The KV budget counts
the draft's bytes per block with the target's (`kv_bytes_per_block`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from pagoda.engine.models import DecoderModel, Model
from pagoda.engine.models.layers import use_triton_layers
from pagoda.engine.runner.attention import AttentionBackend, AttentionMetadata
from pagoda.engine.runner.kv_caches import kv_bytes_per_block as kv_bytes
from pagoda.engine.runner.kv_caches import zero_kv_caches

logger = logging.getLogger(__name__)


@dataclass
class Segment:
    """Tokens of one sequence for the draft to compute: `token_ids` at positions start.. in
    `block_ids`' slots; `sample`: its last position's greedy next token is wanted."""

    token_ids: list[int]
    start: int
    block_ids: list[int]
    sample: bool = True


def load_draft_model(
    source: str,
    target_vocab_size: int,
    max_model_len: int,
    device: torch.device,
    dtype: torch.dtype,
    quantization: str,
) -> DecoderModel:
    """The draft checkpoint `source` as a model on the target's device and dtype (a quantized
    checkpoint served as it is, as `--quantization auto` serves a target). Raises ValueError
    saying what to change when it cannot draft for the target."""
    from pagoda.engine.core.model_loading import load_model
    from pagoda.engine.loader import load_checkpoint
    from pagoda.engine.models.quantization import resolve_quantization

    t0 = time.perf_counter()
    ckpt = load_checkpoint(source)
    arch = ckpt.arch
    if arch.is_encoder:
        raise ValueError(f"the draft model {source!r} is an encoder; a draft must be a decoder (causal LM)")
    if arch.vocab_size != target_vocab_size:
        raise ValueError(
            f"the draft model {source!r} has a vocabulary of {arch.vocab_size} tokens but the target "
            f"model's has {target_vocab_size}; use a draft of the target's tokenizer and vocabulary"
        )
    if arch.max_position_embeddings < max_model_len:
        raise ValueError(
            f"the draft model {source!r} covers {arch.max_position_embeddings} positions but max_model_len "
            f"is {max_model_len}; pass --max-model-len {arch.max_position_embeddings} or less"
        )
    quant = quantization if quantization in ("int8", "int4") else "auto"
    model, _report, _packed = load_model(
        ckpt, max_model_len, device, dtype, resolve_quantization(quant, device, ckpt.quantization)
    )
    assert isinstance(model, DecoderModel), type(model)
    logger.info(
        "loaded draft model %s (%s, %d layers) on %s in %.1fs",
        ckpt.name,
        arch.architecture,
        arch.num_layers,
        device,
        time.perf_counter() - t0,
    )
    return model


def kv_bytes_per_block(model: Model, block_size: int, dtype: torch.dtype) -> int:
    """The bytes one block of the draft's KV cache takes (its K and V in every layer)."""
    cfg = model.cfg
    return kv_bytes(cfg.num_layers, block_size, cfg.num_kv_heads, cfg.head_dim, dtype)


class DraftRunner:
    """Runs the draft model over segments of sequences (catch-up chunks and one-token decodes in
    one flat batch, decodes first as the target's runner orders them) and returns the greedy
    next token of each segment that asks for one. Eager: drafts are few rows of a small model."""

    def __init__(
        self,
        model: DecoderModel,
        backend: AttentionBackend,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        cfg = model.cfg
        self.model = model
        self.backend = backend
        use_triton_layers(model, backend.triton_layers)
        self.block_size = block_size
        self.device = device
        shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.kv_caches = zero_kv_caches(cfg.num_layers, shape, dtype, device)
        self.num_forwards = 0  # forward passes run (tests: drafts are batched across sequences)

    @torch.inference_mode()
    def greedy(self, segments: list[Segment]) -> list[int]:
        """The argmax next token after each segment with `sample`, in the order given."""
        order = sorted(range(len(segments)), key=lambda i: len(segments[i].token_ids) != 1)
        batch = _Batch(self.block_size)
        for i in order:
            batch.add(segments[i])
        dev = self.device
        input_ids = torch.tensor(batch.ids, dtype=torch.int64, device=dev)
        positions = torch.from_numpy(np.concatenate(batch.positions)).to(dev)
        hidden = self.model(input_ids, positions, self.kv_caches, batch.metadata(dev), self.backend)
        self.num_forwards += 1
        rows = [batch.last_row[j] for j, i in enumerate(order) if segments[i].sample]
        if not rows:
            return []
        logits = self.model.compute_logits(hidden[torch.tensor(rows, device=dev)])  # [rows, vocab]
        tokens = logits.argmax(dim=-1).tolist()
        by_segment = dict(zip([i for i in order if segments[i].sample], tokens, strict=True))
        return [by_segment[i] for i in range(len(segments)) if segments[i].sample]


class _Batch:
    """Segments as one flat batch, and its attention metadata (the layout of the target runner's
    `_FlatBatch`: one-token segments are decode rows, first; longer ones prefill chunks)."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.ids: list[int] = []
        self.positions: list[np.ndarray] = []
        self.slots: list[np.ndarray] = []
        self.last_row: list[int] = []  # per segment added: its last token's row
        self.query_lens: list[int] = []
        self.seq_lens: list[int] = []
        self.tables: list[list[int]] = []
        self.decode_lens: list[int] = []
        self.pf_starts: list[int] = []
        self.pf_lens: list[int] = []
        self.pf_ctx: list[int] = []
        self.pf_tables: list[list[int]] = []

    def add(self, seg: Segment) -> None:
        bs, n = self.block_size, len(seg.token_ids)
        assert n > 0 and (seg.start + n + bs - 1) // bs <= len(seg.block_ids), (seg, bs)
        pos = np.arange(seg.start, seg.start + n, dtype=np.int64)
        blocks = np.asarray(seg.block_ids, dtype=np.int64)
        if n == 1:
            assert not self.pf_starts, "decode rows come before prefill chunks"
            self.decode_lens.append(seg.start + 1)
        else:
            self.pf_starts.append(len(self.ids))
            self.pf_lens.append(n)
            self.pf_ctx.append(seg.start)
            self.pf_tables.append(seg.block_ids[: -(-(seg.start + n) // bs)])
        self.ids.extend(seg.token_ids)
        self.positions.append(pos)
        self.slots.append(blocks[pos // bs] * bs + pos % bs)
        self.last_row.append(len(self.ids) - 1)
        self.query_lens.append(n)
        self.seq_lens.append(seg.start + n)
        self.tables.append(seg.block_ids)

    def metadata(self, dev: torch.device) -> AttentionMetadata:
        nd = len(self.decode_lens)
        query_start_loc = np.zeros(len(self.query_lens) + 1, dtype=np.int32)
        np.cumsum(self.query_lens, out=query_start_loc[1:])
        width = max(len(t) for t in self.tables)
        table = np.zeros((len(self.tables), width), dtype=np.int64)
        for i, t in enumerate(self.tables):
            table[i, : len(t)] = t
        return AttentionMetadata(
            slot_mapping=torch.from_numpy(np.concatenate(self.slots)).to(dev),
            num_decode_tokens=nd,
            decode_seq_lens=torch.tensor(self.decode_lens, dtype=torch.int64, device=dev),
            decode_block_tables=torch.from_numpy(table[:nd]).to(dev),
            decode_max_seq_len=max(self.decode_lens, default=0),
            prefill_query_starts=self.pf_starts,
            prefill_query_lens=self.pf_lens,
            prefill_context_lens=self.pf_ctx,
            prefill_block_tables=[torch.tensor(t, dtype=torch.int64, device=dev) for t in self.pf_tables],
            query_start_loc=torch.from_numpy(query_start_loc).to(dev),
            seq_lens=torch.tensor(self.seq_lens, dtype=torch.int32, device=dev),
            block_tables=torch.from_numpy(table.astype(np.int32)).to(dev),
            max_query_len=max(self.query_lens),
        )

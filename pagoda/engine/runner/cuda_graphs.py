"""CUDA graphs for decode steps, as vLLM captures them: the model's forward for a decode-only batch
of B sequences is recorded once per batch size B in `capture_sizes`, then replayed with the
step's inputs copied into static buffers (a batch of n runs in the smallest captured B >= n; rows
n..B are padding: slot -1 so nothing is written to the KV cache, seq_len 0 so attention reads
nothing). `--enforce-eager` turns this off; only backends that declare `supports_cuda_graphs`
(launches that depend on shapes only) are captured.
"""

from __future__ import annotations

import bisect
import logging

import torch

from pagoda.engine.models import DecoderModel
from pagoda.engine.runner.attention import AttentionBackend, AttentionMetadata

logger = logging.getLogger(__name__)


def capture_sizes(
    device: torch.device, enforce_eager: bool, backend: AttentionBackend, max_num_seqs: int
) -> list[int]:
    """Decode batch sizes to capture: 1, 2, 4, 8, then every 16 up to max_num_seqs (at most 512);
    none off CUDA, under --enforce-eager, or for a backend that cannot be captured."""
    if device.type != "cuda" or enforce_eager or not backend.supports_cuda_graphs:
        return []
    top = min(max_num_seqs, 512)
    sizes = [b for b in (1, 2, 4, 8) if b <= top] + list(range(16, top + 1, 16))
    if sizes[-1] < top:
        sizes.append(top)
    return sizes


class DecodeGraphs:
    """Static decode inputs and one graph per batch size. `replay` with `capture=False` runs the
    forward eagerly on the same padded static buffers (how the CPU tests check the padding)."""

    def __init__(
        self,
        model: DecoderModel,
        backend: AttentionBackend,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        sizes: list[int],
        max_blocks_per_seq: int,
        max_model_len: int,
        device: torch.device,
    ) -> None:
        assert sizes == sorted(sizes) and sizes, f"capture sizes must be sorted and non-empty: {sizes}"
        self.model, self.backend, self.kv_caches = model, backend, kv_caches
        self.sizes = sizes
        self.max_model_len = max_model_len
        top = sizes[-1]
        self.input_ids = torch.zeros(top, dtype=torch.int64, device=device)
        self.positions = torch.zeros(top, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((top,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.zeros(top, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros(top, max_blocks_per_seq, dtype=torch.int64, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def _meta(self, b: int) -> AttentionMetadata:
        # decode_max_seq_len is the model's limit, not the batch's: the launch (split count) is fixed
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:b],
            num_decode_tokens=b,
            decode_seq_lens=self.seq_lens[:b],
            decode_block_tables=self.block_tables[:b],
            decode_max_seq_len=self.max_model_len,
            prefill_query_starts=[],
            prefill_query_lens=[],
            prefill_context_lens=[],
            prefill_block_tables=[],
        )

    def _forward(self, b: int) -> torch.Tensor:
        return self.model(self.input_ids[:b], self.positions[:b], self.kv_caches, self._meta(b), self.backend)

    @torch.inference_mode()
    def capture(self) -> None:
        """Record one graph per size, largest first, sharing one memory pool."""
        pool = None
        for b in reversed(self.sizes):
            self._forward(b)  # warm-up: compiles the kernels outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[b] = self._forward(b)
            pool = graph.pool()
            self.graphs[b] = graph
        torch.cuda.synchronize()
        logger.info("captured CUDA graphs for decode batch sizes %s", self.sizes)

    def replay(
        self,
        input_ids: torch.Tensor,  # [n]
        positions: torch.Tensor,  # [n]
        meta: AttentionMetadata,  # a decode-only step of n sequences
        capture: bool = True,
    ) -> torch.Tensor:  # [n, hidden]
        n = input_ids.shape[0]
        assert meta.num_decode_tokens == n <= self.max_batch, f"{meta.num_decode_tokens} decodes, {n} tokens"
        b = self.sizes[bisect.bisect_left(self.sizes, n)]
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.slot_mapping[n:b].fill_(-1)
        self.seq_lens[:n].copy_(meta.decode_seq_lens)
        self.seq_lens[n:b].zero_()
        cols = meta.decode_block_tables.shape[1]
        assert cols <= self.block_tables.shape[1], (
            f"{cols} blocks per sequence, room for {self.block_tables.shape[1]}"
        )
        self.block_tables[:n, :cols].copy_(meta.decode_block_tables)
        if capture:
            self.graphs[b].replay()
            return self.outputs[b][:n]
        return self._forward(b)[:n]

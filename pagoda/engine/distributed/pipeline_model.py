"""One pipeline stage of a Llama-family model (pipeline.py): its layers, the embedding on the first
stage, the final norm and LM head on the last, and only those weights loaded.

The stage's `cfg` counts its own layers (`num_layers`), so the runner and the followers allocate
KV caches for those layers only; the checkpoint's layer i is this stage's layer i - start.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable

import torch
from torch import nn

from pagoda.engine.distributed.pipeline import PipelineStage, current_sample_rows
from pagoda.engine.distributed.sharding import TP_ARCHITECTURES, check_tensor_parallel
from pagoda.engine.distributed.tensor_parallel import TensorParallel
from pagoda.engine.models.arch_config import ModelArchConfig
from pagoda.engine.models.llama import LlamaForCausalLM
from pagoda.engine.models.weight_loading import LoadReport, Weight
from pagoda.engine.runner.attention import AttentionBackend, AttentionMetadata

_LAYER = re.compile(r"^(model\.)?layers\.(\d+)\.")


def check_pipeline(cfg: ModelArchConfig, size: int) -> None:
    """Raise ValueError, naming the flag, when `cfg` cannot be split in `size` stages."""
    if cfg.architecture not in TP_ARCHITECTURES:
        raise ValueError(
            f"--pipeline-parallel-size {size} splits the {', '.join(TP_ARCHITECTURES)} architectures; "
            f"this model is {cfg.architecture}: use --pipeline-parallel-size 1"
        )
    if size > cfg.num_layers:
        raise ValueError(
            f"--pipeline-parallel-size {size} exceeds the model's {cfg.num_layers} layers; "
            f"use at most {cfg.num_layers} stages"
        )


class LlamaStage(LlamaForCausalLM):
    """Layers [stage.start, stage.end) of the model (built on "meta" like any model)."""

    def __init__(
        self, cfg: ModelArchConfig, max_position: int, tp: TensorParallel, stage: PipelineStage
    ) -> None:
        if tp.enabled:
            check_tensor_parallel(cfg, tp.size)
        super().__init__(cfg, max_position, tp)
        self.stage = stage
        self.layers = nn.ModuleList(list(self.layers)[stage.start : stage.end])
        self.cfg = dataclasses.replace(
            cfg, num_layers=stage.end - stage.start, layer_types=cfg.layer_types[stage.start : stage.end]
        )
        tied = cfg.tie_word_embeddings
        # a tied LM head is the embedding: the last stage keeps it (the first keeps the head too,
        # which costs nothing and lets the loader tie them)
        self.holds_embed = stage.is_first or (tied and stage.is_last)
        self.holds_head = stage.is_last or (tied and stage.is_first)
        if not self.holds_embed:
            del self.embed_tokens
        if not self.holds_head:
            del self.lm_head

    def _mine(self, name: str) -> str | None:
        """The name of checkpoint tensor `name` in this stage, or None where another holds it."""
        layer = _LAYER.match(name)
        if layer is not None:
            i = int(layer.group(2))
            if not self.stage.start <= i < self.stage.end:
                return None
            return f"model.layers.{i - self.stage.start}.{name[layer.end() :]}"
        if "embed_tokens." in name and not self.holds_embed:
            return None
        if name.startswith("lm_head.") and not self.holds_head:
            return None
        return name

    def load_weights(
        self,
        weights: Iterable[tuple[str, Weight]],
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        keep_quantized: bool = True,
    ) -> LoadReport:
        mine = ((new, value) for name, value in weights if (new := self._mine(name)) is not None)
        return super().load_weights(mine, device, dtype, keep_quantized)

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens]
        positions: torch.Tensor,  # [num_tokens]
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:  # the last stage: [num_tokens, hidden]; the others: row numbers [num_tokens, 1]
        self.tp.begin_forward(input_ids, positions, meta)  # rank 0: every other rank runs it too
        stage, tokens, rows = self.stage, input_ids.shape[0], current_sample_rows()
        if stage.channel is not None and rows:  # rank 0: the logits' receive first
            stage.expect_logits(len(rows), self.cfg.vocab_size, input_ids.device)
        residual: torch.Tensor | None = None
        if stage.is_first:
            x = self.tp.embed(self.embed_tokens, input_ids, self.cfg.vocab_size)
            if self.cfg.embedding_multiplier != 1.0:
                x = x * self.cfg.embedding_multiplier
        else:
            x, residual = stage.recv_hidden(tokens, self.norm.weight)
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x, residual = layer(x, residual, positions, kv_cache, meta, backend)
        assert residual is not None, "a stage holds at least one layer"
        if not stage.is_last:
            stage.send_hidden(x, residual)
            return torch.arange(tokens, device=input_ids.device)[:, None]
        hidden: torch.Tensor = self.norm.add_forward(x, residual)[0]
        if rows:  # the rows rank 0 samples: their logits at once (gathered over this stage's TP ranks)
            logits = super().compute_logits(hidden[torch.tensor(rows, device=hidden.device)])
            if self.tp.rank == 0:
                stage.send_logits(logits)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [n, vocab] float32
        """Rank 0: `hidden` holds the row numbers of the rows to sample, whose logits the last
        stage sent after its forward (rank 0's runner named them first: `sample_rows`)."""
        assert self.stage.channel is not None, "only rank 0 asks a pipeline for logits"
        return self.stage.take_logits(hidden.shape[0])

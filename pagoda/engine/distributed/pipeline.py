"""Pipeline parallelism (`--pipeline-parallel-size N`, vLLM's meaning): the decoder layers split in
N contiguous stages, each on its own ranks, with tensor parallelism inside a stage.

Ranks: global rank = stage * tp + tp_rank (vLLM's order), so a stage's TP ranks are neighbours
and, over several nodes, a node holds whole stages where it can. Groups, each a torch.distributed
group of its own, made in this order on every rank: its stage's TP group (`tp<stage>`), its
pipeline column (`pp<tp_rank>`: the ranks of its TP rank in every stage), and the control group
of all ranks (protocol.py). Rank 0 (stage 0, TP rank 0) is the engine: it schedules and samples.

A step: rank 0 broadcasts FORWARD to every rank (protocol.py) with the rows it will sample (its
runner names them first: `sample_rows`, a speculative step's verification rows included); stage 0
embeds and runs its layers and sends the hidden states and the residual stream ([2, tokens,
hidden]) to the same TP rank of the next stage, which runs its layers, and so on; the last stage
computes the sampled rows' logits (gathered over its TP ranks) and its TP rank 0 sends them to rank
0, which posted that receive before its own stage ran. Rank 0's model returns row numbers in place
of hidden states (`LlamaStage`), so its runner picks rows as ever. Several steps are in flight at
once, each stage running them in order (micro_batches.py), so the stages work at the same time.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from pagoda.engine.distributed.protocol import Channel

HIDDEN_TAG, LOGITS_TAG = 1, 2
_SAMPLE_ROWS: ContextVar[list[int] | None] = ContextVar("pagoda_sample_rows", default=None)


@contextmanager
def sample_rows(rows: list[int] | None) -> Iterator[None]:
    """The rows of this model call whose logits will be asked for (the runner knows them before
    the forward): a pipeline's last stage computes and sends them right after its layers."""
    token = _SAMPLE_ROWS.set(rows)
    try:
        yield
    finally:
        _SAMPLE_ROWS.reset(token)


def current_sample_rows() -> list[int] | None:
    return _SAMPLE_ROWS.get()


def stage_layers(num_layers: int, size: int) -> list[tuple[int, int]]:
    """[start, end) of each stage's layers: as even as it goes, the extra layers on the stages
    before the last, the second-to-last first (vLLM's split: the last stage holds the LM head)."""
    if size > num_layers:
        raise ValueError(
            f"--pipeline-parallel-size {size} exceeds the model's {num_layers} layers; "
            f"use at most {num_layers} stages"
        )
    counts = [num_layers // size] * size
    for i in range(2, num_layers % size + 2):  # the second-to-last stage first, then backwards
        counts[-i] += 1
    bounds, start = [], 0
    for n in counts:
        bounds.append((start, start + n))
        start += n
    return bounds


def max_stage_layers(num_layers: int, size: int) -> int:
    """The layers of the largest stage: what one rank's KV cache holds at most."""
    return max(end - start for start, end in stage_layers(num_layers, size))


@dataclass(frozen=True)
class Layout:
    """Where global rank `rank` sits: its stage and its TP rank in that stage."""

    rank: int
    tp_size: int
    pp_size: int

    @property
    def stage(self) -> int:
        return self.rank // self.tp_size

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def world(self) -> int:
        return self.tp_size * self.pp_size


def join_stage_groups(
    store: Any, layout: Layout, device: torch.device, timeout: timedelta, control_timeout: timedelta
) -> tuple[Any, Any, Any]:
    """(its stage's TP group or None for one TP rank, its pipeline column, the control group),
    made in this order on every rank."""

    def group(prefix: str, rank: int, size: int, gpu: bool, t: timedelta) -> Any:
        if gpu and device.type == "cuda":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = t
            return dist.ProcessGroupNCCL(dist.PrefixStore(prefix, store), rank, size, opts)
        return dist.ProcessGroupGloo(dist.PrefixStore(prefix, store), rank, size, t)

    tp = layout.tp_size
    tp_group = group(f"tp{layout.stage}", layout.tp_rank, tp, True, timeout) if tp > 1 else None
    pp_group = group(f"pp{layout.tp_rank}", layout.stage, layout.pp_size, True, timeout)
    control = group("control", layout.rank, layout.world, False, control_timeout)
    return tp_group, pp_group, control


@dataclass(frozen=True)
class PipelineStage:
    """This rank's stage: layers [start, end) of the model, `group` its pipeline column (ranks are
    stages in it). `channel`: on rank 0 only, the control group it drives the others through."""

    stage: int
    size: int
    start: int
    end: int
    group: Any = None
    channel: Channel | None = None
    # rank 0: the logits receives posted for steps in flight, oldest first (posted before the
    # step's hidden states leave, so the last stage's send always finds its receive)
    pending: deque[tuple[torch.Tensor, Any]] = field(default_factory=deque, compare=False)

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.size - 1

    def send_hidden(self, x: torch.Tensor, residual: torch.Tensor) -> None:
        """To the next stage: [2, tokens, hidden] (the layer output and the residual stream)."""
        self.group.send([torch.stack([x, residual])], self.stage + 1, HIDDEN_TAG).wait()

    def recv_hidden(self, tokens: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """From the previous stage: (layer output, residual stream), each [tokens, hidden] in the
        dtype and on the device of `like` (a parameter)."""
        buf = torch.empty(2, tokens, like.shape[-1], dtype=like.dtype, device=like.device)
        self.group.recv([buf], self.stage - 1, HIDDEN_TAG).wait()
        return buf[0], buf[1]

    def send_logits(self, logits: torch.Tensor) -> None:
        """The last stage's TP rank 0: the sampled rows' logits [rows, vocab] float32 to rank 0."""
        self.group.send([logits.contiguous()], 0, LOGITS_TAG).wait()

    def expect_logits(self, rows: int, vocab_size: int, device: torch.device) -> None:
        """Rank 0: post the receive of a step's logits [rows, vocab] float32 from the last stage."""
        buf = torch.empty(rows, vocab_size, dtype=torch.float32, device=device)
        self.pending.append((buf, self.group.recv([buf], self.size - 1, LOGITS_TAG)))

    def take_logits(self, rows: int) -> torch.Tensor:
        """Rank 0: the oldest step's logits, once they arrived."""
        assert self.pending, "logits asked for a step that samples nothing"
        buf, work = self.pending.popleft()
        assert buf.shape[0] == rows, (buf.shape, rows)
        work.wait()
        return buf

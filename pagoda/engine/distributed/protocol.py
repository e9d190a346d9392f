"""The step protocol from rank 0 to its followers, over a gloo group of its own (the control
group: CPU tensors, whatever the device).

Every message is a header, int64 [command, payload bytes, arg], broadcast from rank 0, then the
payload (pickled CPU tensors and numbers) if any. The followers wait for headers without a
deadline that matters (an idle engine sends nothing); rank 0's side of the same group has the
collective timeout. Commands, in the order a follower meets them:

- KV_CACHE (arg: blocks; payload: block size): allocate this rank's KV cache, once after loading.
- FORWARD (payload: StepInputs): run the model over the step's tokens, keeping the hidden states.
- LOGITS (arg: rows): take those rows of hidden states, broadcast by rank 0 on the model's group,
  and compute this rank's vocabulary shard of their logits for the gather to rank 0.
- MOE_PASS: an empty batch through the MoE layers (data-parallel engines: this engine has no
  model call this round, its experts serve the other engines' tokens).
- SHUTDOWN: leave the loop and exit.

A follower's every collective inside FORWARD, LOGITS and MOE_PASS pairs with rank 0's in the same order,
because both run the same model code over the same inputs.
"""

from __future__ import annotations

import dataclasses
import enum
import pickle
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from pagoda.engine.runner.attention import AttentionMetadata


class Command(enum.IntEnum):
    KV_CACHE = 1
    FORWARD = 2
    LOGITS = 3
    SHUTDOWN = 4
    MOE_PASS = 5


@dataclass
class StepInputs:
    """One model call's inputs, as rank 0 runs it."""

    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    meta: AttentionMetadata
    prompt_start: int | None  # the runner's prompt_rows(start): quantized kernels' numerics
    sample_rows: list[int] | None = None  # a pipeline's last stage computes these rows' logits

    def to(self, device: torch.device) -> StepInputs:
        return StepInputs(
            self.input_ids.to(device),
            self.positions.to(device),
            meta_to(self.meta, device),
            self.prompt_start,
            self.sample_rows,
        )


def meta_to(meta: AttentionMetadata, device: torch.device) -> AttentionMetadata:
    """A copy of `meta` with its tensors (and lists of tensors) on `device`; per-step caches dropped."""

    def moved(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.to(device)
        if isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
            return [v.to(device) for v in value]
        return value

    fields = {
        f.name: moved(getattr(meta, f.name)) for f in dataclasses.fields(meta) if f.name != "step_cache"
    }
    return AttentionMetadata(**fields)


class Channel:
    """Rank 0's end (`send`) or a follower's (`recv`) of the control group."""

    HEADER = 3

    def __init__(self, group: Any) -> None:
        self.group = group
        self.opts = dist.BroadcastOptions()
        self.opts.rootRank = 0

    def _broadcast(self, t: torch.Tensor) -> None:
        self.group.broadcast([t], self.opts).wait()

    def send(self, command: Command, arg: int = 0, payload: Any = None) -> None:
        data = b"" if payload is None else pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
        header = torch.tensor([int(command), len(data), arg], dtype=torch.int64)
        self._broadcast(header)
        if data:
            self._broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8))

    def recv(self) -> tuple[Command, int, Any]:
        """(command, arg, payload) of rank 0's next message."""
        header = torch.empty(self.HEADER, dtype=torch.int64)
        self._broadcast(header)
        command, size, arg = (int(v) for v in header)
        payload = None
        if size:
            data = torch.empty(size, dtype=torch.uint8)
            self._broadcast(data)
            payload = pickle.loads(data.numpy().tobytes())
        return Command(command), arg, payload

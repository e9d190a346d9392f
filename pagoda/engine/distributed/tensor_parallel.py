"""A rank's place in its tensor-parallel group, and the collectives the model layers make.

Column-parallel layers (q/k/v, gate/up, the LM head) hold a slice of the output rows; row-parallel
ones (o_proj, down) a slice of the input columns, and their partial outputs are summed by one
all-reduce. The vocabulary is split in contiguous ranges: each rank embeds the ids in its range
(zeros elsewhere, summed by an all-reduce) and computes its range of the logits, gathered on rank 0.

KV heads are split like the query heads; with fewer KV heads than ranks each rank keeps the one KV
head its query heads read (replicated: `size // num_kv_heads` ranks hold each).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from pagoda.engine.distributed.shm_all_reduce import ShmAllReduce


class StepLeader(Protocol):
    """Rank 0's end of the step protocol (launcher.py): tells the followers what to run."""

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: Any) -> None: ...

    def logits(self, hidden: torch.Tensor) -> None: ...


@dataclass
class CollectiveClock:
    """Seconds this rank spent in collectives and step messages (waiting for the other ranks
    included): what `pagoda bench step` reports per step."""

    seconds: float = 0.0
    calls: int = 0

    def add(self, start: float) -> None:
        self.seconds += time.perf_counter() - start
        self.calls += 1


@dataclass(frozen=True)
class TensorParallel:
    """This rank's place in its group. `group`: a torch.distributed ProcessGroup of its own (not
    the default group: a process may hold several engines), its collectives called directly, with
    the group's timeout; `shm`, where set, takes the all-reduces that fit it. `leader`: on rank 0,
    what the model calls first to have the followers run the same call."""

    rank: int = 0
    size: int = 1
    group: Any = None
    leader: StepLeader | None = None
    shm: ShmAllReduce | None = None  # ranks on one CPU host: all-reduces through shared memory
    clock: CollectiveClock = field(default_factory=CollectiveClock, compare=False)
    # mixture-of-experts layers (expert_parallel.py): the experts split across the ranks
    # (--enable-expert-parallel) rather than each sharded; `data_parallel`: this rank's place
    # among the data-parallel engines (data_parallel_group.py), whose ranks meet at those layers
    expert_parallel: bool = False
    data_parallel: Any = None

    @property
    def enabled(self) -> bool:
        return self.size > 1

    def heads(self, num_heads: int) -> tuple[int, int]:
        """(first head, heads) of this rank's query heads."""
        per = num_heads // self.size
        return self.rank * per, per

    def kv_heads(self, num_kv_heads: int) -> tuple[int, int]:
        """(first KV head, KV heads) this rank keeps: a slice, or the one head it shares."""
        if num_kv_heads >= self.size:
            per = num_kv_heads // self.size
            return self.rank * per, per
        return self.rank * num_kv_heads // self.size, 1

    def split(self, n: int) -> tuple[int, int]:
        """(start, length) of this rank's slice of a dimension of n (divisible by size)."""
        per = n // self.size
        return self.rank * per, per

    def vocab(self, vocab_size: int) -> tuple[int, int]:
        """(start, length) of this rank's vocabulary range: ceil(vocab / size) ids, the last rank
        the rest."""
        per = -(-vocab_size // self.size)
        start = min(self.rank * per, vocab_size)
        return start, min(per, vocab_size - start)

    def begin_forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: Any) -> None:
        """Rank 0: the followers run this forward too (a no-op elsewhere)."""
        if self.leader is not None:
            start = time.perf_counter()
            self.leader.forward(input_ids, positions, meta)
            self.clock.add(start)

    def begin_logits(self, hidden: torch.Tensor) -> None:
        """Rank 0: the followers compute their vocabulary shard of these rows' logits too."""
        if self.leader is not None:
            start = time.perf_counter()
            self.leader.logits(hidden)
            self.clock.add(start)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """x summed over the ranks, in place."""
        if self.size > 1:
            start = time.perf_counter()
            if self.shm is not None and self.shm.fits(x):
                self.shm.all_reduce(x)
            else:
                self.group.allreduce([x]).wait()
            self.clock.add(start)
        return x

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's x, in place on every rank."""
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self.group.broadcast([x], opts).wait()
        return x

    def embed(self, embedding: nn.Module, ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """Token embeddings [tokens, hidden] from vocabulary-sharded `embedding` (any module
        that looks rows up by id: dense or quantized)."""
        if self.size == 1:
            return embedding(ids)  # type: ignore[no-any-return]
        start, n = self.vocab(vocab_size)
        local = ids - start
        mine = (local >= 0) & (local < n)
        rows = embedding(torch.where(mine, local, torch.zeros_like(local)))
        rows = torch.where(mine[:, None], rows, torch.zeros_like(rows))
        return self.all_reduce(rows)

    def gather_logits(self, local: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """This rank's logits [n, its vocab] -> the whole vocabulary's [n, vocab] on rank 0
        (other ranks get their own shard back: only rank 0 samples)."""
        if self.size == 1:
            return local
        per = -(-vocab_size // self.size)
        if local.shape[-1] < per:  # the last rank's shorter range, padded for the gather
            local = torch.nn.functional.pad(local, (0, per - local.shape[-1]))
        local = local.contiguous()
        shards = [torch.empty_like(local) for _ in range(self.size)] if self.rank == 0 else []
        opts = dist.GatherOptions()
        opts.rootRank = 0
        start = time.perf_counter()
        self.group.gather([shards] if shards else [], [local], opts).wait()
        self.clock.add(start)
        if not shards:
            return local
        return torch.cat(shards, dim=-1)[..., :vocab_size]


SINGLE = TensorParallel()

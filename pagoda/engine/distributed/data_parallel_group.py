"""A rank's place among the data-parallel engines (data_parallel.py), and how a MoE layer's tokens
cross them (`DataParallelRoute`, the ExpertRoute of expert_parallel.py).

The layout, vLLM's (`--data-parallel-size N --tensor-parallel-size M --enable-expert-parallel`):
N engines of M tensor-parallel ranks each; the experts split over all N*M ranks, rank (d, t)
(engine d's tensor-parallel rank t) holding the expert-parallel rank's share e = d*M + t. Two gloo
groups a rank:

- `group`: the N ranks of tensor-parallel rank t, one an engine (the engines' rank 0s for t = 0,
  the groups their rounds meet in). The ranks of one engine hold the same tokens after attention,
  so each of these groups all-gathers every engine's tokens once: every rank then holds all of them.
- `experts`: all N*M ranks (the data-parallel group itself when M = 1). Each rank runs its experts
  over the tokens routed to them, and one all-reduce here sums every rank's contribution; each rank
  keeps its engine's rows.

A shared expert (Qwen2-MoE) is sharded over an engine's tensor-parallel ranks like a dense MLP:
each adds its part to its engine's rows before that all-reduce, which sums the parts as well.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from pagoda.engine.distributed.tensor_parallel import CollectiveClock


class PeerFailed(RuntimeError):
    """Another engine failed as it started (its own error is the one to report)."""


class DataParallelGroup:
    """Engine `rank` of `size`, seen from its tensor-parallel rank `tp_rank` of `tp_size`.
    `coordinator`: the engines of rank 0's process (data_parallel.py's WaveCoordinator; None on a
    follower). `store`: the data-parallel rendezvous, where the expert-parallel group meets."""

    def __init__(
        self, rank: int, size: int, group: Any, coordinator: Any = None, store: Any = None, port: int = 0
    ) -> None:
        self.rank, self.size, self.group, self.coordinator = rank, size, group, coordinator
        self.store, self.port = store, port
        self.tp_rank, self.tp_size = 0, 1
        self.experts: Any = group  # the expert-parallel group: all N*M ranks
        self.moe_calls = 0  # MoE layers run this round (0: the round needs a dummy pass)
        self.round = 0  # rounds stepped: every MoE layer of one round has the same row counts
        self._counts: tuple[int, ...] = ()
        self._counts_round = -1
        self.served_rows = 0  # tokens the last MoE layer ran, all ranks' together
        self.clock = CollectiveClock()

    @property
    def expert_rank(self) -> int:
        return self.rank * self.tp_size + self.tp_rank

    @property
    def expert_size(self) -> int:
        return self.size * self.tp_size

    def join_experts(self, tp_rank: int, tp_size: int, timeout: timedelta) -> None:
        """Meet every engine's every tensor-parallel rank in the expert-parallel group (a
        collective: all N*M ranks call it once they have met, `meet_all`)."""
        self.tp_rank, self.tp_size = tp_rank, tp_size
        if tp_size > 1:
            prefix = dist.PrefixStore("ep", self.store)
            self.experts = dist.ProcessGroupGloo(prefix, self.expert_rank, self.expert_size, timeout)

    def begin_round(self) -> None:
        """A new round: its first MoE layer gathers the row counts afresh."""
        self.moe_calls = 0
        self.round += 1

    def row_counts(self, rows: int) -> tuple[int, ...]:
        """Every engine's rows this round: gathered at the round's first MoE layer, kept for the
        others (one forward a round: the same tokens reach every MoE layer)."""
        if self._counts_round != self.round:
            counts = self.all_gather(torch.tensor([rows], dtype=torch.int64))
            self._counts, self._counts_round = tuple(int(c.item()) for c in counts), self.round
        assert self._counts[self.rank] == rows, (self._counts, self.rank, rows)
        return self._counts

    def route(self) -> DataParallelRoute:
        return DataParallelRoute(self)

    def any_busy(self, busy: bool) -> bool:
        """Whether any engine has work this round (every engine's rank 0 calls this once per round)."""
        start = time.perf_counter()
        flag = torch.tensor([int(busy)], dtype=torch.int64)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MAX  # type: ignore[assignment]
        self.group.allreduce([flag], opts).wait()
        self.clock.add(start)
        return bool(flag.item())

    def all_gather(self, x: torch.Tensor) -> list[torch.Tensor]:
        start = time.perf_counter()
        out = [torch.empty_like(x) for _ in range(self.size)]
        self.group.allgather([out], [x.contiguous()]).wait()
        self.clock.add(start)
        return out

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """x summed over all N*M expert-parallel ranks, in place."""
        start = time.perf_counter()
        self.experts.allreduce([x]).wait()
        self.clock.add(start)
        return x


def meet_all(
    store: Any, rank: int, size: int, wait_s: float, check: Callable[[], None] | None = None
) -> None:
    """Wait until all `size` ranks of the engines (rank: d*M + t) are here, up to `wait_s` (their
    processes start at their own pace), calling `check` (raising for a rank that died) meanwhile,
    and raising when an engine failed to start (data_parallel.py sets "failed"): the gloo groups
    made next then meet within their collective timeout."""
    store.set(f"met/{rank}", "1")
    keys = [f"met/{r}" for r in range(size)]
    deadline = time.monotonic() + wait_s
    while not store.check(keys):
        if store.check(["failed"]):
            raise PeerFailed("another data-parallel engine failed as it started")
        if check is not None:
            check()
        if time.monotonic() > deadline:
            raise RuntimeError(f"the data-parallel engines' ranks did not all start within {wait_s:.0f}s")
        time.sleep(0.05)


def join_follower(
    store: Any, rank: int, size: int, tp_rank: int, tp_size: int, timeout: timedelta, wait_s: float
) -> DataParallelGroup:
    """A tensor-parallel follower's place: the group of tensor-parallel rank `tp_rank` in every
    engine, then the expert-parallel group (the engines' rank 0s meet theirs in data_parallel.py
    and launcher.py)."""
    meet_all(store, rank * tp_size + tp_rank, size * tp_size, wait_s)
    group = dist.ProcessGroupGloo(dist.PrefixStore(f"dp-tp{tp_rank}", store), rank, size, timeout)
    dp = DataParallelGroup(rank, size, group, store=store)
    dp.join_experts(tp_rank, tp_size, timeout)
    return dp


@torch.inference_mode()
def dummy_moe_pass(blocks: list[Any], dtype: torch.dtype, device: torch.device, hidden: int) -> None:
    """An engine with no model call this round: an empty batch through its MoE layers, serving
    the other engines' tokens (every rank of the engine, each with its experts)."""
    empty = torch.empty(0, hidden, dtype=dtype, device=device)
    for block in blocks:
        block(empty)


@dataclass
class DataParallelRoute:
    """ExpertRoute (expert_parallel.py) across the data-parallel engines."""

    dp: DataParallelGroup
    counts: tuple[int, ...] = ()

    def dispatch(self, x: torch.Tensor) -> torch.Tensor:  # [T, hidden] -> [sum of T, hidden]
        dp = self.dp
        dp.moe_calls += 1
        self.counts = dp.row_counts(x.shape[0])
        longest = max(self.counts)
        dp.served_rows = sum(self.counts)
        if longest == 0:  # every engine idle: the same on all ranks, so all skip the gather
            return x
        padded = x.new_zeros(longest, x.shape[1])
        padded[: x.shape[0]] = x
        rows = dp.all_gather(padded)
        return torch.cat([r[:n] for r, n in zip(rows, self.counts, strict=True)])

    def own_rows(self, partial: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The rows of `partial` [sum of T, hidden] that are this engine's tokens (a view)."""
        if not sum(self.counts):
            return partial
        start = sum(self.counts[: self.dp.rank])
        return partial[start : start + x.shape[0]]

    def combine(self, partial: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if not sum(self.counts):
            return partial
        self.dp.all_reduce(partial)  # the same [sum of T, hidden] layout on every rank
        return self.own_rows(partial, x)

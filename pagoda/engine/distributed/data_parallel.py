"""Data-parallel attention with expert parallelism for mixture-of-experts models
(`--data-parallel-size N --enable-expert-parallel`, with `--tensor-parallel-size M` or not: vLLM's
meanings).

Each data-parallel rank is an engine of its own: its own step scheduler and KV cache, attention
weights whole (or sharded over its M tensor-parallel ranks, whose followers its rank 0 starts and
drives as launcher.py does for any engine), and 1/(N*M) of each MoE layer's experts on each of its
ranks; a server registers each as a worker of its own (own queue, heartbeat, load and prefix
blocks). The engines meet at the MoE layers only (data_parallel_group.py: the groups' layout): each
layer gathers every engine's tokens (`DataParallelRoute.dispatch`: the rows padded to the longest,
one all-gather; the row counts, one all-gather, at a round's first MoE layer), runs its experts
over the tokens routed to them, and one all-reduce sums the contributions, of which each rank
keeps its engine's rows (`combine`).

Every rank must make the same collectives, so the engines step in rounds (`DataParallelEngineCore`,
as vLLM's DP engine cores): a round opens with an all-reduce of "I have work"; when no engine has,
the wave ends and the engines sleep; otherwise every engine steps, and one with nothing to run (or
whose step ran no model call) runs its MoE layers over an empty batch (`_dummy_pass`, its followers
too), serving the others' tokens. An engine that gets a request while the wave is over wakes the
others (`WaveCoordinator`: the engines of one process). The engines' rank 0s are threads of one
process (one model replica each) and meet through gloo groups, as ranks of several processes would.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from pagoda.engine.config import EngineConfig
from pagoda.engine.core.engine_core import EngineCore
from pagoda.engine.core.stats import StepStats
from pagoda.engine.distributed.data_parallel_group import DataParallelGroup, PeerFailed, dummy_moe_pass
from pagoda.engine.distributed.expert_parallel import ParallelMoeBlock
from pagoda.engine.distributed.launcher import serve_store
from pagoda.engine.distributed.tensor_parallel import CollectiveClock, TensorParallel
from pagoda.engine.loader import Checkpoint
from pagoda.engine.outputs import RequestOutput

logger = logging.getLogger(__name__)


class WaveCoordinator:
    """The data-parallel engines of one process: a rank that starts stepping wakes the others,
    so that every rank joins the round's collectives."""

    def __init__(self) -> None:
        self.cores: list[DataParallelEngineCore] = []

    def wake_others(self, rank: int) -> None:
        for core in self.cores:
            if core.dp.rank != rank:
                core.wake()


class DataParallelEngineCore(EngineCore):
    """One data-parallel rank's engine: an EngineCore whose steps are rounds with the others."""

    def __init__(
        self, config: EngineConfig, dp: DataParallelGroup, checkpoint: Checkpoint | None = None, **kw: Any
    ) -> None:
        self.dp = dp
        self.local_rank = TensorParallel(data_parallel=dp)  # what _load_model builds: this rank's part
        self._pending = False  # another rank started a wave: step, if only to serve it
        self._in_wave = False
        self.dummy_passes = 0
        self.served_only = False  # the last round ran only the dummy pass
        self.waker: Callable[[], None] | None = None  # the step loop's wake-up (AsyncEngine's)
        super().__init__(config, checkpoint, **kw)
        self.moe_blocks = [m for m in self.model.modules() if isinstance(m, ParallelMoeBlock)]

    def wake(self) -> None:
        self._pending = True
        if self.waker is not None:
            self.waker()

    def has_unfinished(self) -> bool:
        return super().has_unfinished() or self._pending

    def step(self) -> list[RequestOutput]:
        if not self.moe_blocks:  # a dense model: replicas that never meet
            return super().step()
        self._pending = False
        busy = super().has_unfinished()
        if busy and not self._in_wave:
            self.dp.coordinator.wake_others(self.dp.rank)
        self._in_wave = running = self.dp.any_busy(busy)
        if not running:
            return []  # the wave is over on every rank
        self._pending = True  # the next round, whatever this rank has
        self.dp.begin_round()
        outputs = super().step() if busy else []
        self.served_only = self.dp.moe_calls == 0
        if self.served_only:  # no model call here: the others' tokens through our experts
            self._dummy_pass()
            if self.waker is not None:
                self.waker()  # no pause before the next round
        assert self.dp.moe_calls == len(self.moe_blocks), (self.dp.moe_calls, len(self.moe_blocks))
        return outputs

    def _dummy_pass(self) -> None:
        if self.parallel is not None:  # this engine's tensor-parallel followers run theirs too
            self.parallel.dummy_moe_pass()
        norm = self.model.get_parameter("norm.weight")  # never quantized: the run's dtype and device
        dummy_moe_pass(self.moe_blocks, norm.dtype, norm.device, self.model.cfg.hidden_size)
        self.dummy_passes += 1
        # progress for the loop and the stall watch: this rank's layers served the others' tokens
        batcher = self.batcher
        self.last_stats = StepStats(
            self.dp.served_rows, batcher.num_running, batcher.num_waiting, self.kv.usage()
        )


def build_data_parallel_cores(
    config: EngineConfig, checkpoint: Checkpoint | None = None, **kw: Any
) -> list[DataParallelEngineCore]:
    """`config.parallel.data_parallel_size` engines, built side by side (their groups meet as
    they start), each in a thread of its own."""
    size = config.parallel.data_parallel_size
    if config.resolved_device().type != "cpu":
        raise ValueError(
            f"--data-parallel-size {size} runs on the CPU for now (its engines are threads of one "
            "process meeting through gloo); on GPUs use --tensor-parallel-size with --enable-expert-parallel"
        )
    timeout = timedelta(seconds=config.parallel.collective_timeout_s)
    store = serve_store("127.0.0.1", 0, size)
    port = store.port
    coordinator = WaveCoordinator()
    ranks = size * config.parallel.tensor_parallel_size  # they share the cores
    torch.set_num_threads(max(1, torch.get_num_threads() // ranks))

    def build(rank: int) -> DataParallelEngineCore:
        own = store if rank == 0 else dist.TCPStore("127.0.0.1", port, size, False, timedelta(seconds=60))
        group = dist.ProcessGroupGloo(dist.PrefixStore("dp", own), rank, size, timeout)
        dp = DataParallelGroup(rank, size, group, coordinator, own, port)
        try:
            return DataParallelEngineCore(config, dp, checkpoint, **kw)
        except BaseException:
            own.set("failed", "1")  # the others, waiting for this engine's ranks, stop too
            raise

    with ThreadPoolExecutor(size, thread_name_prefix="pagoda-dp-build") as pool:
        builds = [pool.submit(build, rank) for rank in range(size)]
    errors = [e for e in (b.exception() for b in builds) if e is not None]
    if errors:  # the engine that failed first, not the others that stopped for it
        for built in (b.result() for b in builds if b.exception() is None):
            built.close()
        raise next((e for e in errors if not isinstance(e, PeerFailed)), errors[0])
    cores = [b.result() for b in builds]
    coordinator.cores = cores
    cores[0].store = store  # type: ignore[attr-defined]  # kept alive with the engines
    tp = config.parallel.tensor_parallel_size
    logger.info(
        "data parallel: %d engines%s, experts split across their %d ranks (gloo)",
        size, f" of {tp} tensor-parallel ranks" if tp > 1 else "", size * tp,
    )  # fmt: skip
    return cores


class DataParallelEngines:
    """The offline API's engine (`LLM(..., data_parallel_size=N)`): the N engines stepped together,
    each in a thread of its own; a request goes to the engine with the fewest. What else it is
    asked (tokenizer, model name, limits) rank 0 answers."""

    def __init__(self, config: EngineConfig, checkpoint: Checkpoint | None = None) -> None:
        self.engines = build_data_parallel_cores(config, checkpoint)
        self._threads = [
            ThreadPoolExecutor(1, thread_name_prefix=f"pagoda-dp{i}") for i in range(len(self.engines))
        ]
        self._placed: dict[str, int] = {}  # request id -> its engine
        self.requests_per_engine = [0] * len(self.engines)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engines[0], name)

    def add_request(self, request_id: str, *args: Any, **kwargs: Any) -> None:
        load = [e.batcher.num_running + e.batcher.num_waiting for e in self.engines]
        rank = load.index(min(load))
        self.engines[rank].add_request(request_id, *args, **kwargs)
        self._placed[request_id] = rank
        self.requests_per_engine[rank] += 1

    def abort(self, request_ids: list[str]) -> list[RequestOutput]:
        out: list[RequestOutput] = []
        for rid in request_ids:
            out += self.engines[self._placed.get(rid, 0)].abort([rid])
        return out

    def has_unfinished(self) -> bool:
        return any(e.has_unfinished() for e in self.engines)

    @property
    def last_stats(self) -> StepStats:
        """The engines' last step together (tokens, sequences: sums; KV usage: the mean)."""
        stats = [e.last_stats for e in self.engines]
        return StepStats(
            sum(e.last_stats.num_scheduled_tokens for e in self.engines if not e.served_only),
            sum(s.num_running for s in stats),
            sum(s.num_waiting for s in stats),
            sum(s.kv_usage for s in stats) / len(stats),
            sum(s.num_preempted for s in stats),
        )

    @property
    def clock(self) -> CollectiveClock:
        """Rank 0's time in the data-parallel collectives (waits for the others included)."""
        return self.engines[0].dp.clock

    def step(self) -> list[RequestOutput]:
        steps = [t.submit(e.step) for t, e in zip(self._threads, self.engines, strict=True)]
        outputs = [out for s in steps for out in s.result()]
        for out in outputs:
            if out.finished:
                self._placed.pop(out.request_id, None)
        return outputs

    def close(self) -> None:
        for engine in self.engines:
            engine.close()
        for thread in self._threads:
            thread.shutdown(wait=False)

"""The ranks of a pipeline-parallel engine (pipeline.py), or of any engine over several nodes:
rank 0's side (`PipelineRanks`, what `start_ranks` returns) and a follower's (`serve_stage`).

One node: rank 0 starts the other ranks itself, as for tensor parallelism (launcher.py). Several
nodes (`--nnodes`): rank 0 hosts the rendezvous (a TCPStore on `--master-port`) and publishes its
FollowerSpec there; each other node's `pagoda worker --node-rank N` (nodes.py) starts that node's
ranks from it and beats a heartbeat into the store, which rank 0 checks between steps, so a node
that went away fails the engine within the collective timeout even while it is idle.
"""

from __future__ import annotations

import atexit
import logging
import os
import pickle
import time
from dataclasses import replace
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from pagoda.engine.config import EngineConfig
from pagoda.engine.distributed.launcher import (
    IDLE_TIMEOUT,
    LOAD_TIMEOUT_S,
    FollowerSpec,
    TensorParallelRanks,
    _Leader,
    _spawn,
    serve_store,
)
from pagoda.engine.distributed.pipeline import (
    Layout,
    PipelineStage,
    current_sample_rows,
    join_stage_groups,
    stage_layers,
)
from pagoda.engine.distributed.pipeline_model import check_pipeline
from pagoda.engine.distributed.protocol import Channel, Command, StepInputs, meta_to
from pagoda.engine.distributed.sharding import check_tensor_parallel
from pagoda.engine.distributed.tensor_parallel import TensorParallel
from pagoda.engine.loader import Checkpoint
from pagoda.engine.quantization.vnni import current_prompt_start

logger = logging.getLogger(__name__)

BEAT_S = 1.0  # a node's heartbeat period, and how often rank 0 reads them


def local_ranks(config: EngineConfig, node_rank: int) -> range:
    """The global ranks node `node_rank` runs: an equal share, in rank order."""
    par = config.parallel
    per = par.tensor_parallel_size * par.pipeline_parallel_size // par.nnodes
    return range(node_rank * per, (node_rank + 1) * per)


def store_host(config: EngineConfig) -> str:
    return config.parallel.master_addr if config.parallel.nnodes > 1 else "127.0.0.1"


class _StageLeader(_Leader):
    """Rank 0's step messages: as tensor parallelism's, with the rows to sample (the last stage
    computes their logits after its layers: pipeline.py)."""

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: Any) -> None:
        cpu = torch.device("cpu")
        step = StepInputs(
            input_ids.to(cpu), positions.to(cpu), meta_to(meta, cpu), current_prompt_start(),
            current_sample_rows(),
        )  # fmt: skip
        self.channel.send(Command.FORWARD, payload=step)


class PipelineRanks(TensorParallelRanks):
    """Rank 0's other ranks: the local ones started, the remote ones met in the store; joined and
    loaded when the constructor returns (as TensorParallelRanks, whose check, close and KV cache
    message it keeps). `stage`: rank 0's stage (None with one stage)."""

    def __init__(
        self,
        config: EngineConfig,
        checkpoint: str,
        device: torch.device,
        dtype: torch.dtype,
        quantization: str,
        max_model_len: int,
        num_layers: int,
    ) -> None:
        par = config.parallel
        self.layout = Layout(0, par.tensor_parallel_size, par.pipeline_parallel_size)
        self.num_layers = num_layers
        local = len(local_ranks(config, 0))
        threads = (
            max(1, torch.get_num_threads() // local) if device.type == "cpu" else torch.get_num_threads()
        )
        torch.set_num_threads(threads)
        self.procs = []
        self.channel = None
        self.shm = None  # stages reduce over gloo (or NCCL)
        self.stage: PipelineStage | None = None
        self._closed = False
        self._beats: dict[int, tuple[int, float]] = {}  # node -> (last beat count, when it changed)
        self._read_beats = 0.0
        self.nnodes = par.nnodes
        # a node silent this long is gone: half the collective timeout (a few beats at least), so
        # that the engine stops, and its worker exits, within the timeout
        self.stale_s = min(par.collective_timeout_s, max(3 * BEAT_S, par.collective_timeout_s / 2))
        atexit.register(self.close)
        spec = FollowerSpec(
            0, self.layout.world, 0, os.getpid(), checkpoint, config, dtype, quantization, max_model_len,
            threads, None,
        )  # fmt: skip
        try:
            self._start(spec, device, timedelta(seconds=par.collective_timeout_s))
        except BaseException:
            self.close()
            raise

    def _start(self, spec: FollowerSpec, device: torch.device, timeout: timedelta) -> None:
        config, layout = spec.config, self.layout
        par = config.parallel
        self.store = serve_store(store_host(config), par.master_port if par.nnodes > 1 else 0, None)
        spec = replace(spec, port=self.store.port)
        if par.nnodes > 1:
            store: Any = self.store
            store.set("spec", pickle.dumps(spec))  # what the other nodes start their ranks from
        self.procs += [_spawn(replace(spec, rank=rank)) for rank in local_ranks(config, 0)[1:]]
        if par.nnodes > 1:
            logger.info(
                "waiting for ranks %d-%d of nodes 1-%d at %s:%d (`pagoda worker --node-rank N`)",
                len(local_ranks(config, 0)), layout.world - 1, par.nnodes - 1, par.master_addr, spec.port,
            )  # fmt: skip
        self._wait_for("joined")
        tp_group, pp_group, control = join_stage_groups(self.store, layout, device, timeout, timeout)
        self.channel = channel = Channel(control)
        leader = _StageLeader(channel, tp_group) if layout.pp_size > 1 else _Leader(channel, tp_group)
        ep = par.enable_expert_parallel  # (tensor parallelism across nodes: MoE models too)
        self.tp = TensorParallel(0, layout.tp_size, tp_group, leader, expert_parallel=ep)
        if layout.pp_size > 1:
            start, end = stage_layers(self.num_layers, layout.pp_size)[0]
            self.stage = PipelineStage(0, layout.pp_size, start, end, pp_group, channel)
        logger.info(
            "parallel engine: %d ranks (tensor %d x pipeline %d) over %d node(s); local followers %s, "
            "%d threads each; %s",
            layout.world, layout.tp_size, layout.pp_size, par.nnodes, [p.pid for p in self.procs],
            spec.num_threads, "NCCL" if device.type == "cuda" else "gloo",
        )  # fmt: skip

    def close(self) -> None:
        """As TensorParallelRanks', but once a local rank has died the others are ended at once:
        a stage waiting for the dead one's hidden states would not read SHUTDOWN in time."""
        if not self._closed and any(p.poll() is not None for p in self.procs):
            for proc in self.procs:
                if proc.poll() is None:
                    proc.terminate()
        super().close()

    ranks_name = "parallel ranks"

    def _world(self) -> int:
        """Ranks in all, those of other nodes included."""
        return self.layout.world

    def check(self) -> None:
        """Raise RuntimeError when a local rank's process ended, or another node stopped beating
        for `stale_s` (read at most every BEAT_S)."""
        super().check()
        now = time.monotonic()
        if self.nnodes == 1 or self._closed or now - self._read_beats < BEAT_S:
            return
        self._read_beats = now
        for node in range(1, self.nnodes):
            beats = int(self.store.add(f"beat/{node}", 0))
            last, since = self._beats.get(node, (0, now))
            if beats != last:
                self._beats[node] = (beats, now)
            elif beats and now - since > self.stale_s:
                raise RuntimeError(
                    f"node {node} sent no heartbeat for {now - since:.0f}s; the engine stops (a worker "
                    "exits and its requests move to other workers)"
                )


def start_pipeline(
    config: EngineConfig,
    ckpt: Checkpoint,
    device: torch.device,
    dtype: torch.dtype,
    quantization: str,
    max_model_len: int,
) -> PipelineRanks:
    """Rank 0's other ranks for pipeline stages or several nodes; ValueError naming the flag for
    a model that cannot be split so."""
    par = config.parallel
    if par.node_rank > 0:
        raise ValueError(
            f"node rank {par.node_rank} runs only its ranks, not an engine: start it with "
            f"`pagoda worker --node-rank {par.node_rank}` (rank 0's node runs the engine)"
        )
    if par.pipeline_parallel_size > 1:
        check_pipeline(ckpt.arch, par.pipeline_parallel_size)
    elif par.tensor_parallel_size > 1:
        check_tensor_parallel(ckpt.arch, par.tensor_parallel_size, par.enable_expert_parallel)
    if not ckpt.path:
        raise ValueError("parallel ranks need a checkpoint on disk (each rank loads its part)")
    local = len(local_ranks(config, 0))
    if device.type == "cuda" and torch.cuda.device_count() < local:
        raise ValueError(
            f"{local} ranks on this node (tensor x pipeline parallel size / --nnodes) need {local} GPUs, "
            f"{torch.cuda.device_count()} are visible"
        )
    ranks = PipelineRanks(config, ckpt.path, device, dtype, quantization, max_model_len, ckpt.arch.num_layers)
    return ranks


def serve_stage(spec: FollowerSpec) -> None:
    """A follower rank of a pipeline (or multi-node) engine: join, load this rank's part, then run
    rank 0's commands (follower.py's loop) until SHUTDOWN."""
    from pagoda.engine.core.model_loading import load_model
    from pagoda.engine.distributed.follower import Follower
    from pagoda.engine.loader import load_checkpoint
    from pagoda.engine.models import DecoderModel
    from pagoda.engine.runner.attention import get_backend

    config = spec.config
    par = config.parallel
    torch.set_num_threads(spec.num_threads)
    device = config.resolved_device()
    if device.type == "cuda":  # the node's GPUs, one per local rank
        device = torch.device("cuda", spec.rank % len(local_ranks(config, 0)))
        torch.cuda.set_device(device)
    store: Any = dist.TCPStore(store_host(config), spec.port, None, False, timedelta(seconds=LOAD_TIMEOUT_S))
    store.set(f"joined/{spec.rank}", "1")
    ckpt = load_checkpoint(spec.checkpoint)
    layout = Layout(spec.rank, par.tensor_parallel_size, par.pipeline_parallel_size)
    timeout = timedelta(seconds=par.collective_timeout_s)
    tp_group, pp_group, control = join_stage_groups(store, layout, device, timeout, IDLE_TIMEOUT)
    tp = TensorParallel(layout.tp_rank, layout.tp_size, tp_group, expert_parallel=par.enable_expert_parallel)
    stage = None
    if layout.pp_size > 1:
        start, end = stage_layers(ckpt.arch.num_layers, layout.pp_size)[layout.stage]
        stage = PipelineStage(layout.stage, layout.pp_size, start, end, pp_group)
    t0 = time.perf_counter()
    model, _, _ = load_model(ckpt, spec.max_model_len, device, spec.dtype, spec.quantization, tp, stage)
    assert isinstance(model, DecoderModel), type(model)
    logger.info(
        "rank %d of %d (stage %d, tensor rank %d): loaded in %.1fs",
        spec.rank, spec.size, layout.stage, layout.tp_rank, time.perf_counter() - t0,
    )  # fmt: skip
    backend = get_backend(config.attention_backend, device, model.attention_needs)
    store.set(f"loaded/{spec.rank}", "1")
    Follower(model, backend, Channel(control), tp).run()

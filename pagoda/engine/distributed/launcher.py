"""Rank 0's side of a tensor-parallel engine: it starts the follower ranks (one process each,
`python -m pagoda.engine.distributed.follower`), meets them over a TCPStore, sends them each
model call (protocol.py), watches that they live, and ends them.

Failure: the model's collectives and rank 0's sends time out after `collective_timeout_s`, and a
rank whose process ended breaks them at once (its sockets close); `check()` (called by the engine
between steps, also when idle) raises when a follower exited. Either way the engine fails, and a
worker exits as for any engine failure (its requests fail over). Followers leave on SHUTDOWN
(`close()`, also at exit), or on their own when rank 0's process is gone.
"""

from __future__ import annotations

import atexit
import logging
import os
import pickle
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pagoda.engine.config import EngineConfig
from pagoda.engine.distributed.data_parallel_group import DataParallelGroup, meet_all
from pagoda.engine.distributed.moe_checks import check_expert_split
from pagoda.engine.distributed.protocol import Channel, Command, StepInputs, meta_to
from pagoda.engine.distributed.sharding import check_tensor_parallel
from pagoda.engine.distributed.shm_all_reduce import ShmAllReduce, shm_path
from pagoda.engine.distributed.tensor_parallel import TensorParallel
from pagoda.engine.loader import Checkpoint
from pagoda.engine.quantization.vnni import current_prompt_start

logger = logging.getLogger(__name__)

LOAD_TIMEOUT_S = 900.0  # followers start, join and load their shards within this
IDLE_TIMEOUT = timedelta(days=7)  # a follower's wait for rank 0's next command (an idle engine)


@dataclass(frozen=True)
class FollowerSpec:
    """What a follower process needs to build its shard as rank 0 builds its own."""

    rank: int
    size: int
    port: int
    parent_pid: int
    checkpoint: str  # the path rank 0 loaded
    config: EngineConfig
    dtype: torch.dtype
    quantization: str
    max_model_len: int
    num_threads: int
    shm_path: str | None  # the shared-memory all-reduce's file (CPU ranks), or None: gloo's
    # --data-parallel-size: this engine's rank among the engines, and their rendezvous's port (0: none)
    dp_rank: int = 0
    dp_port: int = 0


def join_groups(
    store: Any, rank: int, size: int, device: torch.device, timeout: timedelta
) -> tuple[Any, Any]:
    """(the model's group: NCCL on GPUs, gloo on CPUs; the control group: gloo), created in this
    order on every rank. Each is a group of its own, not the default one."""
    model_group: Any
    if device.type == "cuda":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        model_group = dist.ProcessGroupNCCL(dist.PrefixStore("tp", store), rank, size, opts)
    else:
        model_group = dist.ProcessGroupGloo(dist.PrefixStore("tp", store), rank, size, timeout)
    control_timeout = timeout if rank == 0 else IDLE_TIMEOUT
    control = dist.ProcessGroupGloo(dist.PrefixStore("control", store), rank, size, control_timeout)
    return model_group, control


class _Leader:
    """The StepLeader of rank 0's model (tensor_parallel.py): each call, sent first."""

    def __init__(self, channel: Channel, model_group: Any) -> None:
        self.channel, self.model_group = channel, model_group
        self.opts = dist.BroadcastOptions()
        self.opts.rootRank = 0

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: Any) -> None:
        cpu = torch.device("cpu")
        step = StepInputs(input_ids.to(cpu), positions.to(cpu), meta_to(meta, cpu), current_prompt_start())
        self.channel.send(Command.FORWARD, payload=step)

    def logits(self, hidden: torch.Tensor) -> None:
        self.channel.send(Command.LOGITS, arg=int(hidden.shape[0]))
        self.model_group.broadcast([hidden.contiguous()], self.opts).wait()


class TensorParallelRanks:
    """Rank 0's followers: started, joined and loaded by the constructor (which returns once
    they hold their shards), driven through `tp.leader` by rank 0's model."""

    def __init__(
        self,
        config: EngineConfig,
        checkpoint: str,
        device: torch.device,
        dtype: torch.dtype,
        quantization: str,
        max_model_len: int,
        data_parallel: DataParallelGroup | None = None,
    ) -> None:
        """`data_parallel`: this engine's place among the data-parallel engines (their groups
        have shared the cores out already), whose experts its ranks hold a share of."""
        size = config.parallel.tensor_parallel_size
        timeout = timedelta(seconds=config.parallel.collective_timeout_s)
        threads = torch.get_num_threads()
        if device.type == "cpu" and data_parallel is None:
            threads = max(1, threads // size)
        torch.set_num_threads(threads)  # the ranks share the cores (threads made from now on)
        self.data_parallel = data_parallel
        self.procs: list[subprocess.Popen[bytes]] = []
        self.channel: Channel | None = None
        self.shm: ShmAllReduce | None = None
        self._closed = False
        atexit.register(self.close)  # whatever fails from here on, nothing is left behind
        if device.type == "cpu" and os.environ.get("PAGODA_SHM_ALL_REDUCE", "1") != "0":
            self.shm = ShmAllReduce(shm_path(), 0, size, config.parallel.collective_timeout_s, create=True)
        shm = self.shm.path if self.shm is not None else None
        dp_rank, dp_port = (0, 0) if data_parallel is None else (data_parallel.rank, data_parallel.port)
        spec = FollowerSpec(  # rank and port filled in by _start
            0, size, 0, os.getpid(), checkpoint, config, dtype, quantization, max_model_len, threads, shm,
            dp_rank, dp_port,
        )  # fmt: skip
        try:
            self._start(spec, device, timeout)
        except BaseException:
            self.close()
            raise

    def _start(self, spec: FollowerSpec, device: torch.device, timeout: timedelta) -> None:
        """Spawn the followers, then meet them in the groups."""
        size = spec.size
        self.store = serve_store("127.0.0.1", 0, size)
        port = self.store.port
        self.procs += [_spawn(replace(spec, rank=rank, port=port)) for rank in range(1, size)]
        self._wait_for("joined")  # each mapped the shared memory first: it can go from the file system
        if self.shm is not None:
            self.shm.unlink()
            self.shm.watch = self.check
        model_group, control = join_groups(self.store, 0, size, device, timeout)
        self.channel = channel = Channel(control)
        dp = self.data_parallel
        if dp is not None:  # every engine's every rank: the experts' group
            meet_all(dp.store, dp.rank * size, dp.size * size, LOAD_TIMEOUT_S, self.check)
            dp.join_experts(0, size, timeout)
        leader, ep = _Leader(channel, model_group), spec.config.parallel.enable_expert_parallel
        self.tp = TensorParallel(0, size, model_group, leader, self.shm, expert_parallel=ep, data_parallel=dp)
        backend = "NCCL" if device.type == "cuda" else "gloo" + (" + shared memory" if self.shm else "")
        logger.info(
            "tensor parallel: %d ranks (%d followers started, pids %s), %d threads each, %s",
            size, size - 1, [p.pid for p in self.procs], spec.num_threads, backend,
        )  # fmt: skip

    def init_kv_cache(self, num_blocks: int, block_size: int) -> None:
        """Once every follower holds its shard (rank 0 loaded its own meanwhile): their KV caches,
        as many blocks as rank 0's."""
        self._wait_for("loaded")
        assert self.channel is not None
        self.channel.send(Command.KV_CACHE, arg=num_blocks, payload=block_size)

    def dummy_moe_pass(self) -> None:
        """The followers pass an empty batch through their MoE layers (data_parallel.py: an engine
        with no model call this round serves the others' tokens)."""
        assert self.channel is not None
        self.channel.send(Command.MOE_PASS)

    def check(self) -> None:
        """Raise RuntimeError when a follower's process has ended."""
        for rank, proc in enumerate(self.procs, start=1):
            code = proc.poll()
            if code is not None and not self._closed:
                raise RuntimeError(
                    f"tensor-parallel rank {rank} (pid {proc.pid}) exited with code {code}; the engine "
                    "stops (a worker exits and its requests move to other workers)"
                )

    def close(self) -> None:
        """End the followers: SHUTDOWN, then a signal to any that did not leave."""
        if self._closed:
            return
        self._closed = True
        if self.shm is not None:
            self.shm.unlink()
        atexit.unregister(self.close)
        if self.channel is not None and all(p.poll() is None for p in self.procs):
            try:
                self.channel.send(Command.SHUTDOWN)
            except Exception as exc:  # a broken group: the signals below end them
                logger.debug("SHUTDOWN not sent: %s", exc)
        for proc in self.procs:
            try:
                # 15 s: a follower leaving its process group can take seconds on a loaded host; not
                # joined yet: nothing to wait for
                proc.wait(15.0 if self.channel is not None else 0.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    ranks_name = "tensor-parallel followers"  # in the message of a load that timed out

    def _world(self) -> int:
        """Ranks in all, rank 0 included (here every other rank is a local process)."""
        return len(self.procs) + 1

    def _wait_for(self, stage: str) -> None:
        keys = [f"{stage}/{rank}" for rank in range(1, self._world())]
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        while not self.store.check(keys):
            self.check()
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.ranks_name} not {stage} after {LOAD_TIMEOUT_S:.0f}s")
            time.sleep(0.05)


def start_ranks(
    config: EngineConfig,
    ckpt: Checkpoint,
    device: torch.device,
    dtype: torch.dtype,
    quantization: str,
    max_model_len: int,
    data_parallel: DataParallelGroup | None = None,
) -> TensorParallelRanks | None:
    """The followers of a tensor-parallel engine (None for one rank); ValueError, naming the flag,
    for a model or checkpoint that cannot be split. `data_parallel`: the engine's place among the
    data-parallel engines (data_parallel.py)."""
    size = config.parallel.tensor_parallel_size
    if data_parallel is not None:
        check_expert_split(ckpt.arch, data_parallel.size, size)
    if config.parallel.pipeline_parallel_size > 1 or config.parallel.nnodes > 1:
        from pagoda.engine.distributed.pipeline_ranks import start_pipeline  # (it imports this module)

        return start_pipeline(config, ckpt, device, dtype, quantization, max_model_len)
    if size == 1:
        return None
    check_tensor_parallel(ckpt.arch, size, config.parallel.enable_expert_parallel)
    if not ckpt.path:
        raise ValueError(
            f"--tensor-parallel-size {size} needs a checkpoint on disk (each rank loads its shard)"
        )
    if device.type == "cuda" and torch.cuda.device_count() < size:
        raise ValueError(
            f"--tensor-parallel-size {size} needs {size} GPUs, {torch.cuda.device_count()} are visible"
        )
    return TensorParallelRanks(config, ckpt.path, device, dtype, quantization, max_model_len, data_parallel)


def _spawn(spec: FollowerSpec) -> subprocess.Popen[bytes]:
    root = str(Path(__file__).resolve().parents[3])  # the directory holding the pagoda package
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen(
        [sys.executable, "-m", "pagoda.engine.distributed.follower"], stdin=subprocess.PIPE, env=env
    )
    assert proc.stdin is not None
    proc.stdin.write(pickle.dumps(spec))
    proc.stdin.close()
    return proc


def serve_store(host: str, port: int, world_size: int | None) -> dist.TCPStore:
    """The rendezvous store that rank 0 serves on `port`, or with 0 on a port the OS picks as it
    binds (`store.port`): a port found free and bound later could be taken in between, by the
    store of another engine starting beside this one (seen: EADDRINUSE)."""
    return dist.TCPStore(host, port, world_size, True, timedelta(seconds=LOAD_TIMEOUT_S), False)

"""A follower rank of a tensor-parallel engine: `python -m pagoda.engine.distributed.follower`,
started by rank 0 (launcher.py) with a pickled FollowerSpec on stdin. It loads its shard, then runs
what rank 0 sends (protocol.py) until SHUTDOWN; it exits when rank 0's process is gone."""

from __future__ import annotations

import logging
import os
import pickle
import signal
import sys
import threading
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from pagoda.engine.core.model_loading import load_model
from pagoda.engine.distributed.data_parallel_group import DataParallelGroup, dummy_moe_pass, join_follower
from pagoda.engine.distributed.expert_parallel import ParallelMoeBlock
from pagoda.engine.distributed.launcher import LOAD_TIMEOUT_S, FollowerSpec, join_groups
from pagoda.engine.distributed.pipeline import sample_rows
from pagoda.engine.distributed.protocol import Channel, Command, StepInputs
from pagoda.engine.distributed.shm_all_reduce import ShmAllReduce
from pagoda.engine.distributed.tensor_parallel import TensorParallel
from pagoda.engine.loader import load_checkpoint
from pagoda.engine.models import DecoderModel
from pagoda.engine.quantization.vnni import prompt_rows
from pagoda.engine.runner.attention import AttentionBackend, get_backend

logger = logging.getLogger("pagoda.engine.distributed.follower")


class Follower:
    """One rank's shard and KV cache, stepped by rank 0's commands."""

    def __init__(
        self, model: DecoderModel, backend: AttentionBackend, channel: Channel, tp: TensorParallel
    ) -> None:
        self.model, self.backend, self.channel, self.tp = model, backend, channel, tp
        norm = model.norm.weight  # never quantized: the run's device and dtype
        self.device, self.dtype = norm.device, norm.dtype
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.dp: DataParallelGroup | None = tp.data_parallel  # data-parallel engines: their MoE layers
        self.moe_blocks = [m for m in model.modules() if isinstance(m, ParallelMoeBlock)]

    @torch.inference_mode()
    def run(self) -> None:
        while True:
            command, arg, payload = self.channel.recv()
            if command is Command.SHUTDOWN:
                return
            if command is Command.KV_CACHE:
                self._allocate(num_blocks=arg, block_size=payload)
            elif command is Command.FORWARD:
                self._forward(payload)
            elif command is Command.MOE_PASS:
                self._begin_round()
                dummy_moe_pass(self.moe_blocks, self.dtype, self.device, self.model.cfg.hidden_size)
            elif command is Command.LOGITS:
                rows = torch.empty(arg, self.model.cfg.hidden_size, dtype=self.dtype, device=self.device)
                self.model.compute_logits(self.tp.broadcast(rows))  # this rank's shard, gathered on rank 0

    def _allocate(self, num_blocks: int, block_size: int) -> None:
        cfg = self.model.cfg
        shape = (num_blocks, block_size, getattr(self.model, "num_kv_heads", cfg.num_kv_heads), cfg.head_dim)
        self.kv_caches = [(self._zeros(shape), self._zeros(shape)) for _ in range(cfg.num_layers)]

    def _zeros(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    def _begin_round(self) -> None:
        """Data-parallel engines: each model call or MoE pass is a round of rank 0's."""
        if self.dp is not None:
            self.dp.begin_round()

    def _forward(self, step: StepInputs) -> None:
        self._begin_round()
        step = step.to(self.device)
        with prompt_rows(step.prompt_start), sample_rows(step.sample_rows):  # (a pipeline's last stage)
            self.model(step.input_ids, step.positions, self.kv_caches, step.meta, self.backend)


def _watch_parent(parent_pid: int) -> None:
    """Exit when rank 0's process is gone (this process then has another parent)."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(3)

    threading.Thread(target=watch, name="pagoda-parent-watch", daemon=True).start()


def serve(spec: FollowerSpec) -> None:
    config = spec.config
    if config.parallel.pipeline_parallel_size > 1 or config.parallel.nnodes > 1:
        from pagoda.engine.distributed.pipeline_ranks import serve_stage

        return serve_stage(spec)
    torch.set_num_threads(spec.num_threads)
    device = config.resolved_device()
    if device.type == "cuda":
        device = torch.device("cuda", spec.rank)
        torch.cuda.set_device(device)
    store: Any = dist.TCPStore("127.0.0.1", spec.port, spec.size, False, timedelta(seconds=LOAD_TIMEOUT_S))
    timeout_s = config.parallel.collective_timeout_s
    shm = None if spec.shm_path is None else ShmAllReduce(spec.shm_path, spec.rank, spec.size, timeout_s)
    store.set(f"joined/{spec.rank}", "1")
    model_group, control = join_groups(store, spec.rank, spec.size, device, timedelta(seconds=timeout_s))
    ep = config.parallel.enable_expert_parallel
    dp = _join_data_parallel(spec, timedelta(seconds=timeout_s))
    tp = TensorParallel(spec.rank, spec.size, model_group, shm=shm, expert_parallel=ep, data_parallel=dp)
    t0 = time.perf_counter()
    ckpt = load_checkpoint(spec.checkpoint)
    logger.debug("checkpoint opened in %.1fs", time.perf_counter() - t0)
    model, _, _ = load_model(ckpt, spec.max_model_len, device, spec.dtype, spec.quantization, tp)
    logger.info("rank %d of %d: shard loaded in %.1fs", spec.rank, spec.size, time.perf_counter() - t0)
    assert isinstance(model, DecoderModel), type(model)
    backend = get_backend(config.attention_backend, device, model.attention_needs)
    store.set(f"loaded/{spec.rank}", "1")
    Follower(model, backend, Channel(control), tp).run()


def _join_data_parallel(spec: FollowerSpec, timeout: timedelta) -> DataParallelGroup | None:
    """With --data-parallel-size: this rank's groups among the engines (data_parallel_group.py)."""
    size = spec.config.parallel.data_parallel_size
    if size == 1:
        return None
    store = dist.TCPStore("127.0.0.1", spec.dp_port, size, False, timedelta(seconds=LOAD_TIMEOUT_S))
    return join_follower(store, spec.dp_rank, size, spec.rank, spec.size, timeout, LOAD_TIMEOUT_S)


def main() -> int:
    spec: FollowerSpec = pickle.load(sys.stdin.buffer)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches rank 0, which ends the followers
    _watch_parent(spec.parent_pid)
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s %(levelname)s rank {spec.rank} %(name)s: %(message)s"
    )
    try:
        serve(spec)
    except Exception:
        logger.exception("tensor-parallel rank %d failed", spec.rank)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

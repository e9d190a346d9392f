"""A node other than node 0 of a multi-node engine: `pagoda worker --node-rank N` (or `pagoda
serve --node-rank N`) runs this node's ranks and nothing else (no bus, no engine).

It meets rank 0 at `--master-addr:--master-port`, reads the FollowerSpec rank 0 published there
(so every rank builds the model as rank 0 does: the checkpoint must be at the same path on every
node), starts its ranks (`python -m pagoda.engine.distributed.follower` each), and then beats a
heartbeat into the store every BEAT_S while watching them. It exits when its ranks do (0 after
rank 0's SHUTDOWN), when one of them fails (1, the others ended), or when the store is gone (1:
node 0 went away). torchrun's environment gives the defaults of the flags (`torchrun_defaults`).
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import subprocess
import time
from dataclasses import replace
from datetime import timedelta
from typing import Any

from pagoda.engine.config import EngineConfig

logger = logging.getLogger(__name__)


def torchrun_defaults(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """The node flags torchrun's (or a launcher's) environment sets: MASTER_ADDR, MASTER_PORT,
    NNODES (else WORLD_SIZE / LOCAL_WORLD_SIZE: torchrun with one process per node), NODE_RANK
    (else GROUP_RANK). Only those present."""
    env = os.environ if environ is None else environ
    found: dict[str, Any] = {}
    if "MASTER_ADDR" in env:
        found["master_addr"] = env["MASTER_ADDR"]
    if "MASTER_PORT" in env:
        found["master_port"] = int(env["MASTER_PORT"])
    if "NNODES" in env:
        found["nnodes"] = int(env["NNODES"])
    elif "WORLD_SIZE" in env and "LOCAL_WORLD_SIZE" in env:
        found["nnodes"] = int(env["WORLD_SIZE"]) // max(1, int(env["LOCAL_WORLD_SIZE"]))
    rank = env.get("NODE_RANK", env.get("GROUP_RANK"))
    if rank is not None:
        found["node_rank"] = int(rank)
    return found


def node_flags(world: int, given: dict[str, Any], environ: dict[str, str] | None = None) -> dict[str, Any]:
    """ParallelConfig's node fields: those `given` (None: unset), else torchrun's environment where
    the engine spans ranks (`world` > 1). A one-rank engine in each process of a torchrun job (data
    parallel by hand) is no multi-node engine: the environment is not its."""
    env = torchrun_defaults(environ) if world > 1 else {}
    return {**env, **{k: v for k, v in given.items() if v is not None}}


def run_node(config: EngineConfig) -> int:
    """Run node `config.parallel.node_rank`'s ranks until they end; the exit status."""
    import torch
    import torch.distributed as dist

    from pagoda.engine.distributed.launcher import LOAD_TIMEOUT_S, FollowerSpec, _spawn
    from pagoda.engine.distributed.pipeline_ranks import BEAT_S, local_ranks

    par = config.parallel
    store: Any = dist.TCPStore(
        par.master_addr, par.master_port, None, False, timedelta(seconds=LOAD_TIMEOUT_S)
    )
    logger.info(
        "node %d of %d: waiting for rank 0 at %s:%d",
        par.node_rank,
        par.nnodes,
        par.master_addr,
        par.master_port,
    )
    spec: FollowerSpec = pickle.loads(store.get("spec"))
    theirs = spec.config.parallel
    if (theirs.nnodes, theirs.world_size) != (par.nnodes, par.world_size):
        raise ValueError(
            f"node 0 runs {theirs.world_size} ranks over --nnodes {theirs.nnodes}, this node was "
            f"given {par.world_size} over {par.nnodes}: start every node with the same parallel flags"
        )
    ranks = local_ranks(spec.config, par.node_rank)
    if spec.config.resolved_device().type == "cuda" and torch.cuda.device_count() < len(ranks):
        raise ValueError(
            f"node {par.node_rank} runs {len(ranks)} ranks and needs {len(ranks)} GPUs, "
            f"{torch.cuda.device_count()} are visible"
        )
    threads = max(1, torch.get_num_threads() // len(ranks))
    config = replace(
        spec.config, parallel=replace(theirs, node_rank=par.node_rank, master_addr=par.master_addr)
    )
    spec = replace(spec, config=config, parent_pid=os.getpid(), num_threads=threads)
    procs = [_spawn(replace(spec, rank=rank)) for rank in ranks]
    logger.info("node %d: ranks %s started (pids %s)", par.node_rank, list(ranks), [p.pid for p in procs])
    return _supervise(store, par.node_rank, procs, BEAT_S)


def _supervise(store: Any, node_rank: int, procs: list[subprocess.Popen[bytes]], beat_s: float) -> int:
    stopping = False

    def stop(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    code = 0
    try:
        while not stopping:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes):
                code = max(c or 0 for c in codes)
                logger.info("node %d: its ranks ended (codes %s)", node_rank, codes)
                break
            if any(c for c in codes):
                logger.error("node %d: a rank failed (codes %s); ending the others", node_rank, codes)
                code = 1
                break
            try:
                store.add(f"beat/{node_rank}", 1)
            except Exception as exc:  # the store lives in rank 0's process: node 0 is gone
                code = _after_store_gone(procs)
                if code:
                    logger.error("node %d: rank 0's store is gone (%s); ending its ranks", node_rank, exc)
                break
            time.sleep(beat_s)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(5.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return code


def _after_store_gone(procs: list[subprocess.Popen[bytes]]) -> int:
    """0 when the ranks end on their own within a few seconds, all with 0 (rank 0 sent SHUTDOWN,
    then its process and store went), else 1."""
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.1)
    return 0 if all(p.poll() == 0 for p in procs) else 1

"""Data-parallel engines of tensor-parallel ranks (`--data-parallel-size 2 --tensor-parallel-size 2
--enable-expert-parallel`, vLLM's layout) on the CPU: two engines, each of two ranks (rank 0 a
thread, its follower a process of its own), the experts split over all four; the greedy tokens (and
log-probs) of one rank holding everything, with one engine idle for rounds while the other works;
a dead rank fails the engines within the collective timeout. Sizes whose product does not divide
the experts are refused naming the flags."""

from __future__ import annotations

import argparse
import subprocess
import time
from pathlib import Path

import pytest

from pagoda.engine import LLM, SamplingParams
from pagoda.engine.config import ParallelConfig
from pagoda.engine.distributed.moe_checks import check_expert_split
from pagoda.engine.engine_args import add_engine_args, engine_config_from_args
from pagoda.engine.models.arch_config import ModelArchConfig

# prompt 0 runs 6 steps on one engine, prompt 1 two on the other: that engine is idle after, its
# ranks passing empty batches through their MoE layers while the other's tokens need their experts
PROMPTS = [[1, 2, 3, 4, 5], list(range(40, 52))]
PARAMS = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=1) for n in (6, 2)]


def _generate(llm: LLM) -> tuple[list[list[int]], list[list[float]]]:
    outs = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    return (
        [o.outputs[0].token_ids for o in outs],
        [[lp.logprob for lp in o.outputs[0].logprobs or []] for o in outs],
    )


@pytest.fixture(scope="module")
def qwen2_moe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen2-MoE: 4 experts, one a rank; its shared expert split over each engine's two ranks, as
    its dense layer and attention."""
    from tests.tiny_moe_models import make_tiny_moe

    path = tmp_path_factory.mktemp("dptp")
    make_tiny_moe("qwen2_moe", path)
    return path


def _dp_tp(model: Path, timeout_s: float) -> LLM:
    return LLM(
        str(model), dtype="float32", kv_cache_memory=1 << 22, data_parallel_size=2,
        tensor_parallel_size=2, enable_expert_parallel=True, collective_timeout_s=timeout_s,
    )  # fmt: skip


def test_two_engines_of_two_ranks_give_one_ranks_greedy_tokens(qwen2_moe: Path) -> None:
    tokens, logprobs = _generate(LLM(str(qwen2_moe), dtype="float32", kv_cache_memory=1 << 22))
    llm = _dp_tp(qwen2_moe, 30.0)
    engines = llm.engine.engines  # type: ignore[attr-defined]
    try:
        got_tokens, got_logprobs = _generate(llm)
        for d, engine in enumerate(engines):
            assert engine.parallel is not None and engine.parallel.tp.size == 2  # a follower each
            assert (engine.dp.expert_rank, engine.dp.expert_size) == (2 * d, 4)
            block = engine.moe_blocks[0]  # rank 0 of engine d: expert 2d of 4, half the shared units
            assert (block.plan.first_expert, block.plan.num_local, block.plan.shared_inter) == (2 * d, 1, 24)
        assert llm.engine.requests_per_engine == [1, 1]  # type: ignore[attr-defined]
        # the engine of the short prompt idled through the other's last rounds, its follower too
        # (the round's all-reduce spans all four ranks: it returns only when every rank joined)
        assert engines[1].dummy_passes >= 3 and engines[0].dummy_passes == 0
        assert got_tokens == tokens
        for got, want in zip(got_logprobs, logprobs, strict=True):
            assert got == pytest.approx(want, abs=1e-4)
    finally:
        llm.engine.close()
    assert all(p.poll() is not None for e in engines for p in e.parallel.procs)  # the followers left


def test_a_dead_follower_fails_the_engines_within_the_collective_timeout(qwen2_moe: Path) -> None:
    """Engine 1's follower is killed: engine 0, whose MoE layers wait for its experts, fails after
    --distributed-timeout rather than hanging; closing ends what is left."""
    llm = _dp_tp(qwen2_moe, 2.0)
    engines = llm.engine.engines  # type: ignore[attr-defined]
    try:
        engines[1].parallel.procs[0].kill()
        start = time.monotonic()
        with pytest.raises(RuntimeError):
            _generate(llm)
        assert time.monotonic() - start < 15
    finally:
        llm.engine.close()
    assert all(p.poll() is not None for e in engines for p in e.parallel.procs)


def test_an_engine_that_fails_to_start_stops_the_others(
    qwen2_moe: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Engine 1 cannot start its follower: engine 0, waiting for every rank before the groups
    among the engines are made, gives up at once (not after the load timeout) and ends its own."""
    from pagoda.engine.distributed import launcher

    spawned: list[subprocess.Popen[bytes]] = []

    def spawn(spec: launcher.FollowerSpec) -> subprocess.Popen[bytes]:
        if spec.dp_rank == 1:
            raise OSError("no follower for engine 1")
        spawned.append(real(spec))
        return spawned[-1]

    real = launcher._spawn
    monkeypatch.setattr(launcher, "_spawn", spawn)
    start = time.monotonic()
    with pytest.raises(OSError, match="no follower for engine 1"):
        _dp_tp(qwen2_moe, 30.0)
    assert time.monotonic() - start < 30
    assert len(spawned) == 1 and spawned[0].wait(15) is not None


def _moe(num_experts: int) -> ModelArchConfig:
    return ModelArchConfig(
        architecture="mixtral", vocab_size=261, hidden_size=64, intermediate_size=96, num_layers=1,
        num_heads=8, num_kv_heads=2, head_dim=8, num_experts=num_experts, num_experts_per_tok=2,
        moe_intermediate_size=96,
    )  # fmt: skip


def test_the_flags_combine_and_what_cannot_split_is_refused() -> None:
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    config = engine_config_from_args(parser.parse_args(["-dp", "2", "-tp", "2", "-ep"]))
    assert config.parallel == ParallelConfig(
        tensor_parallel_size=2, data_parallel_size=2, enable_expert_parallel=True
    )
    check_expert_split(_moe(8), 2, 2)  # 2 experts a rank
    check_expert_split(_moe(6), 2, 1)  # data parallel alone: 3 a rank
    with pytest.raises(ValueError, match="-size 2 x --tensor-parallel-size 2 splits the experts over 4"):
        check_expert_split(_moe(6), 2, 2)
    with pytest.raises(ValueError, match="--data-parallel-size 4 splits the experts over 4 ranks"):
        check_expert_split(_moe(6), 4, 1)
    with pytest.raises(ValueError, match="add --enable-expert-parallel"):
        ParallelConfig(data_parallel_size=2, tensor_parallel_size=2)

"""Pipeline parallelism on the CPU (gloo): an engine of 2 stages (its second a real process), and
of 2 stages x 2 tensor-parallel ranks (4 processes), gives the greedy tokens and log-probs of one
rank; each stage holds its layers and their KV cache only, and the KV budget counts that."""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from pagoda.engine import LLM, SamplingParams, add_engine_args, engine_config_from_args
from pagoda.engine.config import BatcherConfig, EngineConfig, LoRAConfig, ParallelConfig
from pagoda.engine.distributed.micro_batches import MicroBatches
from pagoda.engine.distributed.nodes import torchrun_defaults
from pagoda.engine.distributed.pipeline import max_stage_layers, stage_layers
from pagoda.engine.distributed.pipeline_model import LlamaStage, check_pipeline
from pagoda.engine.kv.kv_cache_manager import KVCacheManager
from pagoda.engine.runner.kv_caches import kv_bytes_per_block
from pagoda.engine.scheduling.batcher import Batcher, BatchPlan, RunnerOutput
from pagoda.engine.scheduling.request import Request
from tests.unit.test_tensor_parallel_plan import _arch

PROMPTS = [[1, 2, 3, 4, 5], list(range(40, 75))]  # a short prompt and one of three KV blocks
GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=1)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    from tests.tiny_gguf import Q, write_tiny_llama_gguf
    from tests.tiny_models import make_tiny_model

    root = tmp_path_factory.mktemp("pp")
    for kind in ("llama", "qwen2"):  # untied LM head; tied (the last stage keeps the embedding)
        (root / kind).mkdir()
        make_tiny_model(kind, root / kind, num_layers=3)  # stages of 2 and 1 layers
    gguf = write_tiny_llama_gguf(root / "tiny-q8.gguf", Q.Q8_0, Q.Q8_0, num_layers=3)  # quantized, tied
    yield {"llama": root / "llama", "qwen2": root / "qwen2", "gguf-q8_0": gguf}


def _run(model: Path, **kwargs: object) -> tuple[list[list[int]], list[list[float]], LLM]:
    llm = LLM(str(model), dtype="float32", kv_cache_memory=1 << 22, **kwargs)
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    logprobs = [[lp.logprob for lp in o.outputs[0].logprobs or []] for o in outs]
    return [o.outputs[0].token_ids for o in outs], logprobs, llm


@pytest.mark.parametrize(
    ("name", "tp", "pp_size"),
    [("llama", 1, 3), ("qwen2", 2, 2), ("gguf-q8_0", 1, 2)],  # llama: a middle stage (no embedding, no head)
)
def test_stages_give_one_ranks_greedy_tokens(
    models: dict[str, Path], name: str, tp: int, pp_size: int
) -> None:
    tokens, logprobs, one = _run(models[name])
    pp_tokens, pp_logprobs, pp = _run(
        models[name], pipeline_parallel_size=pp_size, tensor_parallel_size=tp, collective_timeout_s=20.0
    )
    try:
        ranks = pp.engine.parallel
        assert ranks is not None and len(ranks.procs) == pp_size * tp - 1
        assert all(p.poll() is None for p in ranks.procs)  # they ran every step with rank 0
        model = pp.engine.model
        start, end = stage_layers(3, pp_size)[0]
        assert isinstance(model, LlamaStage) and len(model.layers) == end - start  # stage 0's layers only
        assert not hasattr(model, "lm_head") or model.cfg.tie_word_embeddings  # the last stage's logits
        assert len(pp.engine.runner.kv_caches) == end - start  # its layers' KV only
        # the KV budget per rank holds the largest stage's layers (of its KV heads), not all 3
        cfg = one.engine.model.cfg
        layers = max_stage_layers(3, pp_size)
        per_block = kv_bytes_per_block(layers, 16, cfg.num_kv_heads // tp, cfg.head_dim, torch.float32)
        assert (1 << 22) // per_block == pp.engine.num_blocks > one.engine.num_blocks
        assert pp_tokens == tokens
        # two micro-batches in flight: the prompts ran apart (other matmul shapes), as with TP's split sums
        assert pp.engine.micro_batches is not None and pp.engine.micro_batches.most_in_flight == 2
        tol = 1e-5
        assert (
            max(
                abs(a - b)
                for x, y in zip(logprobs, pp_logprobs, strict=True)
                for a, b in zip(x, y, strict=True)
            )
            <= tol
        )
        if name == "llama":
            _killed_stage_fails_the_engine(pp)
            return
    finally:
        pp.engine.close()
    assert all(p.poll() == 0 for p in ranks.procs)  # SHUTDOWN ends them cleanly


def _killed_stage_fails_the_engine(pp: LLM) -> None:
    """The last stage's process killed: the next generate raises at once, it does not hang."""
    ranks = pp.engine.parallel
    assert ranks is not None
    ranks.procs[0].kill()
    ranks.procs[0].wait()
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"rank 1 \(pid \d+\) exited|Connection|closed|peer"):
        pp.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert time.monotonic() - start < 5.0


def test_layers_split_evenly_extra_layers_before_the_last_stage() -> None:
    assert stage_layers(4, 2) == [(0, 2), (2, 4)]
    assert stage_layers(3, 2) == [(0, 2), (2, 3)]  # vLLM's: the extra on the second-to-last
    assert stage_layers(10, 4) == [(0, 2), (2, 5), (5, 8), (8, 10)]
    for layers in range(1, 12):
        for size in range(1, layers + 1):
            bounds = stage_layers(layers, size)
            assert [b[0] for b in bounds[1:]] == [b[1] for b in bounds[:-1]]  # contiguous
            assert bounds[0][0] == 0 and bounds[-1][1] == layers and all(e > s for s, e in bounds)
            assert max_stage_layers(layers, size) - min(e - s for s, e in bounds) <= 1
    with pytest.raises(ValueError, match="--pipeline-parallel-size 5 exceeds the model's 4 layers"):
        stage_layers(4, 5)


def test_what_cannot_run_in_stages_is_refused_naming_the_flag() -> None:
    with pytest.raises(ValueError, match="--pipeline-parallel-size 2 splits the llama"):
        check_pipeline(_arch(architecture="gemma2"), 2)
    with pytest.raises(ValueError, match="exceeds the model's 2 layers"):
        check_pipeline(_arch(num_layers=2), 3)
    with pytest.raises(ValueError, match="pipeline_parallel_size must be at least 1"):
        ParallelConfig(pipeline_parallel_size=0)
    with pytest.raises(ValueError, match="--enable-lora does not run with --pipeline-parallel-size 2"):
        EngineConfig(parallel=ParallelConfig(pipeline_parallel_size=2), lora=LoRAConfig(enable_lora=True))
    with pytest.raises(ValueError, match="--nnodes 2 must divide the 3 ranks"):
        ParallelConfig(pipeline_parallel_size=3, nnodes=2)
    with pytest.raises(ValueError, match="--data-parallel-size 2 with --pipeline-parallel-size or --nnodes"):
        ParallelConfig(pipeline_parallel_size=2, data_parallel_size=2, enable_expert_parallel=True)
    with pytest.raises(ValueError, match=r"--node-rank 2 must be in \[0, --nnodes 2\)"):
        ParallelConfig(pipeline_parallel_size=2, nnodes=2, node_rank=2)


def test_node_flags_default_to_torchrun_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "29511", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1"}
    assert torchrun_defaults({**env, "GROUP_RANK": "1"}) == {
        "master_addr": "10.0.0.5", "master_port": 29511, "nnodes": 2, "node_rank": 1,
    }  # fmt: skip
    assert torchrun_defaults({"NNODES": "3", "NODE_RANK": "2"}) == {"nnodes": 3, "node_rank": 2}
    for key, value in {**env, "NODE_RANK": "1"}.items():
        monkeypatch.setenv(key, value)
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    config = engine_config_from_args(parser.parse_args(["-pp", "2", "--master-port", "29600"]))
    assert config.parallel == ParallelConfig(
        pipeline_parallel_size=2, nnodes=2, node_rank=1, master_addr="10.0.0.5", master_port=29600
    )
    # one rank per torchrun process (data parallel by hand): the environment is not the engine's
    assert engine_config_from_args(parser.parse_args([])).parallel == ParallelConfig()
    with pytest.raises(ValueError, match="pagoda worker --node-rank 1"):
        LLM("unused-model", pipeline_parallel_size=2)


def test_a_worker_of_node_zero_still_needs_the_bus_and_store(capsys: pytest.CaptureFixture[str]) -> None:
    """`pagoda worker` leaves --bus/--store to its config (node rank > 0 needs neither)."""
    from pagoda.services.cli.main import main

    for argv in (["worker"], ["worker", "--bus", "amqp://guest:guest@127.0.0.1:5672/"]):
        assert main(argv) == 2
        assert "`pagoda worker` runs alone: give it --bus amqp://... and --store" in capsys.readouterr().err


class _Runner:
    """What MicroBatches needs of a ModelRunner: launch applies a plan's diff, finish samples."""

    def __init__(self) -> None:
        self.held: set[str] = set()
        self.launched: list[BatchPlan] = []

    def launch(self, plan: BatchPlan) -> Any:
        self.held -= plan.finished_req_ids
        self.held |= {n.req_id for n in plan.new_requests}
        self.launched.append(plan)
        return None if plan.is_empty else plan

    def finish(self, plan: BatchPlan | None) -> RunnerOutput:
        if plan is None:
            return RunnerOutput()
        assert set(plan.num_scheduled_tokens) <= self.held  # the runner still holds their state
        return RunnerOutput(sampled_token_ids=dict.fromkeys(plan.num_scheduled_tokens, 7))


def test_micro_batches_split_the_running_requests_and_never_share_one() -> None:
    kv = KVCacheManager(64, block_size=4)
    batcher = Batcher(BatcherConfig(max_num_batched_tokens=64), kv, 64, [0])
    runner = _Runner()
    steps = MicroBatches(batcher, runner, depth=2)  # type: ignore[arg-type]
    for i in range(4):
        batcher.add_request(Request(f"r{i}", [10 * i + 1, 10 * i + 2], SamplingParams(max_tokens=5)))
    plan, res = steps.advance()  # the 4 prompts in one step (nothing was running), then nothing more
    assert set(plan.num_scheduled_tokens) == {"r0", "r1", "r2", "r3"} and not steps.in_flight
    batcher.update(plan, res)
    plan, res = steps.advance()  # 4 decoding: 2 per micro-batch, the second still in flight
    assert set(plan.num_scheduled_tokens) == {"r0", "r1"} and steps.most_in_flight == 2
    ((second, _),) = steps.in_flight
    assert set(second.num_scheduled_tokens) == {"r2", "r3"}
    batcher.update(plan, res)
    batcher.finish_requests(["r2"], "abort")  # in flight: the runner must keep its state until it ends
    plan, res = steps.advance()
    assert set(plan.num_scheduled_tokens) == {"r2", "r3"}  # the older step finishes first
    assert "r2" not in runner.launched[-1].finished_req_ids and steps.deferred == {"r2"}
    assert set(runner.launched[-1].num_scheduled_tokens) == {"r0", "r1"}  # never r2 or r3
    batcher.update(plan, res)
    steps.advance()
    assert "r2" in runner.launched[-1].finished_req_ids and "r2" not in runner.held and not steps.deferred

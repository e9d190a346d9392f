"""Mixture-of-experts models over 2 ranks on the CPU (gloo, the follower a real process): with
--enable-expert-parallel each rank holds half the experts whole (Mixtral, Qwen3-MoE), under plain
tensor parallelism each expert's half of the units (Qwen2-MoE: its shared expert and dense layer
sharded too; Granite-MoE: stacked expert tensors in the checkpoint); either way the greedy tokens
(and log-probs) of one rank, offline and served. What cannot split is refused naming the flag."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from pagoda.engine import LLM, SamplingParams
from pagoda.engine.config import ParallelConfig
from pagoda.engine.distributed.expert_parallel import ParallelMoeBlock
from pagoda.engine.distributed.sharding import check_tensor_parallel
from pagoda.engine.engine_args import add_engine_args, engine_config_from_args
from pagoda.engine.models.arch_config import ModelArchConfig
from pagoda.engine.models.moe_experts import Int8Experts, StackedExperts
from tests.processes import Proc, free_port, wait_ready

PROMPTS = [[1, 2, 3, 4, 5], list(range(40, 75))]
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=1)


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    from tests.tiny_moe_models import make_tiny_moe

    root = tmp_path_factory.mktemp("ep")
    paths = {}
    for kind in ("mixtral", "qwen3_moe", "qwen2_moe", "granitemoe"):
        (root / kind).mkdir()
        make_tiny_moe(kind, root / kind)
        paths[kind] = root / kind
    yield paths


def _run(model: Path, **kwargs: object) -> tuple[list[list[int]], list[list[float]], LLM]:
    llm = LLM(str(model), dtype="float32", kv_cache_memory=1 << 22, **kwargs)
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    tokens = [o.outputs[0].token_ids for o in outs]
    return tokens, [[lp.logprob for lp in o.outputs[0].logprobs or []] for o in outs], llm


@pytest.mark.parametrize(
    ("kind", "expert_parallel", "local_experts", "inter"),
    [
        ("mixtral", True, 2, 96),
        ("qwen3_moe", True, 4, 32),
        ("qwen2_moe", False, 4, 16),
        ("granitemoe", False, 4, 48),
    ],
)
def test_two_ranks_give_one_ranks_greedy_tokens(
    moe_models: dict[str, Path], kind: str, expert_parallel: bool, local_experts: int, inter: int
) -> None:
    """`local_experts`, `inter`: what rank 0's MoE layers hold (half the experts whole, or every
    expert's half of the units)."""
    tokens, logprobs, _ = _run(moe_models[kind])
    two_tokens, two_logprobs, two = _run(
        moe_models[kind], tensor_parallel_size=2, enable_expert_parallel=expert_parallel,
        collective_timeout_s=20.0,
    )  # fmt: skip
    try:
        parallel = two.engine.parallel
        assert parallel is not None and parallel.procs[0].poll() is None
        assert parallel.tp.clock.calls > 0  # the follower met rank 0 in the collectives
        blocks = [m for m in two.engine.model.modules() if isinstance(m, ParallelMoeBlock)]
        assert blocks, "no MoE layer was built for a rank"
        for block in blocks:
            experts = block.experts
            assert isinstance(experts, StackedExperts)
            assert (experts.num_experts, experts.inter) == (local_experts, inter)
            assert block.plan.first_expert == 0
        assert two_tokens == tokens
        for got, want in zip(two_logprobs, logprobs, strict=True):
            assert got == pytest.approx(want, abs=1e-4)
    finally:
        two.engine.close()


def test_int8_experts_split_too(moe_models: dict[str, Path]) -> None:
    """--quantization int8 turns each rank's own experts into int8 per expert and channel: rank 0
    holds the first half of one rank's experts with the same codes and scales, and the first
    token is one rank's. Not the whole greedy run: the attention's row-parallel int8 layers
    quantize each rank's slice of a row on their own, and without VNNI (7-bit activations) that
    moved a random model's router to other experts by the second token."""
    tokens, _, one = _run(moe_models["mixtral"], quantization="int8")
    two_tokens, _, two = _run(
        moe_models["mixtral"], quantization="int8", tensor_parallel_size=2, enable_expert_parallel=True
    )
    try:
        experts = [m for m in two.engine.model.modules() if isinstance(m, Int8Experts)]
        whole = [m for m in one.engine.model.modules() if isinstance(m, Int8Experts)]
        assert experts and all(e.num_experts == 2 for e in experts) and len(whole) == len(experts)
        for mine, all_of_them in zip(experts, whole, strict=True):
            for name in ("gate_up_codes", "gate_up_scales", "down_codes", "down_scales"):
                assert torch.equal(getattr(mine, name), getattr(all_of_them, name)[:2]), name
    finally:
        two.engine.close()
    assert [t[0] for t in two_tokens] == [t[0] for t in tokens]


def _moe(**kw: object) -> ModelArchConfig:
    base: dict[str, object] = dict(
        architecture="mixtral", vocab_size=261, hidden_size=64, intermediate_size=96, num_layers=1,
        num_heads=8, num_kv_heads=2, head_dim=8, num_experts=6, num_experts_per_tok=2,
        moe_intermediate_size=96,
    )  # fmt: skip
    return ModelArchConfig(**{**base, **kw})  # type: ignore[arg-type]


def test_what_cannot_split_is_refused_naming_the_flag() -> None:
    check_tensor_parallel(_moe(), 2, expert_parallel=True)  # 6 experts over 2 ranks
    with pytest.raises(ValueError, match="6 experts: --enable-expert-parallel needs"):
        check_tensor_parallel(_moe(), 4, expert_parallel=True)
    with pytest.raises(ValueError, match="expert intermediate size 90: pick a divisor of it, or split"):
        check_tensor_parallel(_moe(moe_intermediate_size=90), 4)
    with pytest.raises(ValueError, match="add --enable-expert-parallel"):
        ParallelConfig(data_parallel_size=2)


def test_the_flags_build_the_parallel_config() -> None:
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    config = engine_config_from_args(parser.parse_args(["-tp", "2", "--enable-expert-parallel"]))
    assert config.parallel == ParallelConfig(tensor_parallel_size=2, enable_expert_parallel=True)
    config = engine_config_from_args(parser.parse_args(["--data-parallel-size", "2", "-ep"]))
    assert config.parallel == ParallelConfig(data_parallel_size=2, enable_expert_parallel=True)


def test_served_expert_parallel_answers_as_one_rank(moe_models: dict[str, Path]) -> None:
    """`pagoda serve -tp 2 --enable-expert-parallel` (Qwen3-MoE: 4 of 8 experts a rank): the
    log-probs of one rank's greedy completion."""
    model = moe_models["qwen3_moe"]
    greedy = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=0)
    out = LLM(str(model), dtype="float32").generate("The quick brown fox", greedy, use_tqdm=False)[0]
    expected = [lp.logprob for lp in out.outputs[0].logprobs or []]
    port = free_port()
    proc = Proc(
        "serve", "--model", str(model), "--served-model-name", "tiny", "--dtype", "float32",
        "--kv-cache-memory", "16MiB", "--port", str(port), "--tensor-parallel-size", "2",
        "--enable-expert-parallel", "--distributed-timeout", "10",
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, [proc], timeout=120)
        body = {"model": "tiny", "prompt": "The quick brown fox", "max_tokens": 10, "temperature": 0}
        body |= {"ignore_eos": True, "logprobs": 0}
        answer = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["logprobs"]["token_logprobs"] == pytest.approx(expected, abs=1e-4)
        assert "followers started" in proc.output()
        assert proc.stop() == 0, proc.output()[-3000:]
    finally:
        if proc.alive():
            proc.p.kill()
            proc.p.wait()

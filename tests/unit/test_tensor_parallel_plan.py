"""Tensor parallelism's bookkeeping, without processes: which heads, KV heads, rows and columns
each rank holds; what cannot be split is refused with the flag to change; the flags themselves."""

from __future__ import annotations

import argparse
from typing import Any

import pytest
import torch

from pagoda.engine.config import EngineConfig, LoRAConfig, ParallelConfig
from pagoda.engine.distributed.sharding import LlamaShards, check_tensor_parallel
from pagoda.engine.distributed.tensor_parallel import TensorParallel
from pagoda.engine.engine_args import add_engine_args, engine_config_from_args
from pagoda.engine.models.arch_config import ModelArchConfig
from pagoda.engine.quantization.weights import QuantizedWeight


def _arch(**kw: Any) -> ModelArchConfig:
    base: dict[str, Any] = dict(
        architecture="llama", vocab_size=261, hidden_size=64, intermediate_size=96, num_layers=1,
        num_heads=8, num_kv_heads=2, head_dim=8,
    )  # fmt: skip
    return ModelArchConfig(**{**base, **kw})


@pytest.mark.parametrize("size", [2, 4, 8])
def test_each_rank_keeps_the_kv_heads_its_query_heads_read(size: int) -> None:
    """GQA: query head h reads KV head h // (heads / kv_heads); a rank's KV heads (split, or one
    shared when there are fewer than ranks) are exactly those its query heads read."""
    heads, kv_heads = 8, 2
    for rank in range(size):
        tp = TensorParallel(rank, size)
        q0, nq = tp.heads(heads)
        kv0, nkv = tp.kv_heads(kv_heads)
        read = {h // (heads // kv_heads) for h in range(q0, q0 + nq)}
        assert read == set(range(kv0, kv0 + nkv)), (rank, read, kv0, nkv)


def test_vocabulary_ranges_cover_it_once_with_a_shorter_last_range() -> None:
    ranges = [TensorParallel(r, 4).vocab(261) for r in range(4)]
    assert ranges == [(0, 66), (66, 66), (132, 66), (198, 63)]


def test_shards_of_a_layer_put_back_together_give_the_layer() -> None:
    cfg = _arch()
    w = {
        "layers.0.self_attn.k_proj.weight": torch.randn(16, 64),
        "layers.0.self_attn.o_proj.weight": torch.randn(64, 64),
        "layers.0.mlp.up_proj.weight": torch.randn(96, 64),
        "embed_tokens.weight": torch.randn(261, 64),
        "norm.weight": torch.randn(64),
    }
    shards = [LlamaShards(cfg, TensorParallel(r, 2)) for r in range(2)]
    for name, dim in [("k_proj", 0), ("o_proj", 1), ("up_proj", 0), ("embed_tokens", 0)]:
        full = next(v for n, v in w.items() if name in n)
        key = next(n for n in w if name in n)
        parts = [s(key, full) for s in shards]
        assert all(isinstance(p, torch.Tensor) for p in parts)
        assert torch.equal(torch.cat(parts, dim), full), name  # type: ignore[arg-type]
    assert all(s("norm.weight", w["norm.weight"]) is w["norm.weight"] for s in shards)  # replicated


def _quantized(out_f: int, in_f: int, group: int) -> QuantizedWeight:
    codes = torch.randint(0, 16, (out_f, in_f), dtype=torch.int16)
    return QuantizedWeight(codes, torch.rand(out_f, in_f // group), torch.randn(out_f, in_f // group), bits=4)


def test_quantized_weights_split_by_rows_and_whole_groups_of_columns() -> None:
    qw = _quantized(8, 128, 32)
    w = qw.dequantize()
    assert torch.equal(qw.rows(2, 4).dequantize(), w[2:6])
    assert torch.equal(qw.columns(64, 64).dequantize(), w[:, 64:])
    with pytest.raises(ValueError, match=r"groups of 32 inputs cannot be split at columns 48\.\.112"):
        qw.columns(48, 64)
    per_channel = _quantized(8, 96, 96)  # one scale per row: any columns
    assert torch.equal(per_channel.columns(48, 48).dequantize(), per_channel.dequantize()[:, 48:])


@pytest.mark.parametrize(
    ("arch", "size", "message"),
    [
        (
            dict(architecture="mixtral", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=33),
            2,
            "mixture-of-experts model's expert intermediate size 33",
        ),
        (dict(architecture="gemma2"), 2, "this model is gemma2"),
        (dict(num_heads=6, num_kv_heads=6), 4, "must divide the model's 6 attention heads"),
        (dict(intermediate_size=90), 4, "must divide the model's 90 intermediate size"),
        (dict(num_heads=12, num_kv_heads=3), 2, "the model's 3 KV heads: one must divide"),
    ],
)
def test_models_that_cannot_split_are_refused_naming_the_flag(
    arch: dict[str, Any], size: int, message: str
) -> None:
    with pytest.raises(ValueError, match=f"--tensor-parallel-size {size}") as err:
        check_tensor_parallel(_arch(**arch), size)
    assert message in str(err.value)


def test_unsupported_combinations_name_the_flag() -> None:
    two = ParallelConfig(tensor_parallel_size=2)
    with pytest.raises(ValueError, match="--enable-lora does not run with --tensor-parallel-size 2"):
        EngineConfig(parallel=two, lora=LoRAConfig(enable_lora=True))
    with pytest.raises(ValueError, match="drop --compile"):
        EngineConfig(parallel=two, compile="on")


def test_the_flags_build_the_parallel_config() -> None:
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    config = engine_config_from_args(parser.parse_args(["-tp", "2", "--distributed-timeout", "7.5"]))
    assert config.parallel == ParallelConfig(tensor_parallel_size=2, collective_timeout_s=7.5)
    assert engine_config_from_args(parser.parse_args([])).parallel == ParallelConfig()

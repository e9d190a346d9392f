"""The sequential calibration pass (pagoda/compress/sequential.py) runs the engine's own layers:
advanced with unchanged weights it ends exactly where `forward_tokens` does; its records count
every token; advanced with changed weights, the next layer sees their outputs."""

from __future__ import annotations

from pathlib import Path

import torch

from pagoda.compress.calibration import Needs, build_float_model
from pagoda.compress.sequential import LayerRunner
from pagoda.engine.loader import load_checkpoint
from pagoda.engine.runner.forward import forward_tokens
from tests.tiny_models import make_tiny_model

SAMPLES = [list(range(5, 37)), list(range(40, 57))]


def _runner(tmp_path: Path) -> tuple[LayerRunner, dict[str, torch.Tensor]]:
    make_tiny_model("qwen3", tmp_path)
    ckpt = load_checkpoint(str(tmp_path))
    weights = {n: t.float() for n, t in ckpt.weights()}
    model = build_float_model(ckpt.arch, weights.items(), 64)
    return LayerRunner(model, SAMPLES, Needs(hessian=True, absmax=True), progress=False), weights


def _layer(weights: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    return {n: t for n, t in weights.items() if n.startswith(f"model.layers.{i}.")}


def test_layer_by_layer_ends_where_forward_tokens_does(tmp_path: Path) -> None:
    runner, weights = _runner(tmp_path)
    model = runner.model
    expected = [forward_tokens(model, ids) for ids in SAMPLES]
    for i in range(len(model.layers)):
        stats = runner.collect(i)
        qkv = stats[f"layers.{i}.self_attn.qkv_proj"]
        assert qkv.hessian is not None and qkv.hessian.count == sum(map(len, SAMPLES))
        assert qkv.absmax is not None and qkv.absmax.shape == (model.cfg.hidden_size,)
        runner.advance(i, _layer(weights, i))  # the same weights: the float model's outputs
    for seq, hidden in zip(runner.sequences, expected, strict=True):
        assert seq.residual is not None
        assert torch.equal(model.norm.add_forward(seq.h, seq.residual)[0], hidden)


def test_the_next_layer_sees_the_advanced_weights(tmp_path: Path) -> None:
    runner, weights = _runner(tmp_path)
    before = runner.collect(1)["layers.1.mlp.down_proj"].hessian
    changed = _layer(weights, 0)
    changed["model.layers.0.mlp.down_proj.weight"] = changed["model.layers.0.mlp.down_proj.weight"] * 0.5
    runner.advance(0, changed)
    after = runner.collect(1)["layers.1.mlp.down_proj"].hessian
    assert before is not None and after is not None
    assert not torch.allclose(before.hessian(), after.hessian(), rtol=1e-3)
    down = runner.model.get_parameter("layers.0.mlp.down_proj.weight")
    assert torch.equal(down, changed["model.layers.0.mlp.down_proj.weight"])  # loaded into the engine

"""PEFT adapter directories the engine cannot serve are refused with a message naming the thing;
block hashes keep adapters (and cache salts) apart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from pagoda.engine.config import LoRAConfig
from pagoda.engine.kv.block_hash import hash_block, hash_full_blocks
from pagoda.engine.lora.peft_adapter import load_adapter, projection_shapes, read_adapter_config

SHAPES = projection_shapes(hidden=64, num_heads=4, num_kv_heads=2, head_dim=16, intermediate=96)
PREFIX = "base_model.model.model.layers"


def _adapter(path: Path, tensors: dict[str, torch.Tensor] | None = None, **config: Any) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], **config}
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    if tensors is None:
        tensors = {
            f"{PREFIX}.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 64),
            f"{PREFIX}.0.self_attn.q_proj.lora_B.weight": torch.randn(64, 4),
        }
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return path


def test_a_good_adapter_loads_scaled(tmp_path: Path) -> None:
    path = _adapter(tmp_path / "ok", use_rslora=True)
    weights = load_adapter(path, SHAPES, num_layers=2, max_lora_rank=16)
    a, b = weights.modules[(0, "q_proj")]
    assert a.shape == (4, 64) and b.shape == (64, 4)
    assert weights.config.scaling == 8 / 2  # rsLoRA: alpha / sqrt(r)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"r": 64}, "rank 64, above --max-lora-rank 16; start the engine with --max-lora-rank 64"),
        ({"target_modules": ["q_proj", "lm_head"]}, "targets lm_head; served target modules are q_proj"),
        ({"target_modules": ["embed_tokens"]}, "targets embed_tokens"),
        ({"use_dora": True}, "DoRA adapters"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"peft_type": "IA3"}, "is a IA3 adapter"),
        ({"bias": "all"}, "trains biases"),
        ({"rank_pattern": {"q_proj": 8}}, "per-module ranks"),
    ],
)
def test_unservable_configs_are_refused(tmp_path: Path, config: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        read_adapter_config(_adapter(tmp_path / "bad", **config), max_lora_rank=16)


@pytest.mark.parametrize(
    ("key", "shape", "message"),
    [
        ("base_model.model.model.embed_tokens.lora_embedding_A", (4, 260), "embedding adapters"),
        (f"{PREFIX}.0.self_attn.q_proj.lora_A.weight", (4, 48), r"lora_A \(4, 48\).*another base model"),
        (f"{PREFIX}.5.self_attn.q_proj.lora_A.weight", (4, 64), "layer 5 but the model has 2 layers"),
        (f"{PREFIX}.0.mlp.lm_head.lora_A.weight", (4, 64), "targets lm_head"),
    ],
)
def test_unservable_tensors_are_refused(
    tmp_path: Path, key: str, shape: tuple[int, int], message: str
) -> None:
    tensors = {key: torch.randn(shape), key.replace("lora_A", "lora_B"): torch.randn(64, 4)}
    path = _adapter(tmp_path / "bad", tensors, target_modules="all-linear")
    with pytest.raises(ValueError, match=message):
        load_adapter(path, SHAPES, num_layers=2, max_lora_rank=16)


def test_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"has no adapter_config\.json"):
        read_adapter_config(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"has no adapter_model\.safetensors"):
        read_adapter_config(tmp_path)


def test_lora_config_errors_give_numbers() -> None:
    with pytest.raises(ValueError, match="max_cpu_loras 2 must be at least max_loras 4"):
        LoRAConfig(enable_lora=True, max_loras=4, max_cpu_loras=2)
    with pytest.raises(ValueError, match="max_lora_rank must be in \\[1, 512\\], got 0"):
        LoRAConfig(max_lora_rank=0)


def test_block_hashes_keep_adapters_apart() -> None:
    """No adapter: the hashes of before (the router's); each adapter its own; an adapter named
    like a cache salt does not meet that salt's blocks."""
    tokens = list(range(8))
    base = hash_full_blocks(tokens, 4)
    assert base[0] == hash_block(None, tokens[:4])  # unchanged without an adapter
    a, b = hash_full_blocks(tokens, 4, lora_name="a"), hash_full_blocks(tokens, 4, lora_name="b")
    assert len({base[0], a[0], b[0]}) == 3 and len({base[1], a[1], b[1]}) == 3
    assert hash_full_blocks(tokens, 4, ("a",)) != a
    assert hash_full_blocks(tokens, 4, start=1, parent=a[0], lora_name="a") == a[1:]

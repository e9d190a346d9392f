"""What a checkpoint says about pooling: is it an embedding model, and how does it pool?

Read without weights and without torch (the front roles call it through `read_model_info`):
- a sentence-transformers directory (`modules.json`) states its pooling (`1_Pooling/config.json`:
  `pooling_mode_cls_token`, `pooling_mode_mean_tokens`, `pooling_mode_lasttoken`) and whether it
  normalizes (a `Normalize` module);
- a bare base-model architecture (`Qwen3Model`, `BertModel`: no `...ForCausalLM` head) is an
  embedding model with the default pooling (the first token for encoders, the last otherwise);
- a GGUF states `<arch>.pooling_type` (llama.cpp's numbering: 1 mean, 2 cls, 3 last).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pagoda.engine.pooling.params import PoolerConfig, PoolingType

ENCODER_MODEL_TYPES = frozenset({"bert"})
_ST_MODES: dict[str, PoolingType] = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_lasttoken": "last",
}
_GGUF_TYPES: dict[int, PoolingType] = {1: "mean", 2: "cls", 3: "last"}


def is_encoder(config: dict[str, Any]) -> bool:
    return config.get("model_type") in ENCODER_MODEL_TYPES


def hf_pooler(path: Path, config: dict[str, Any]) -> PoolerConfig | None:
    """The pooling an HF directory states (see the module docstring), or None: a generative model."""
    matryoshka = bool(config.get("is_matryoshka") or config.get("matryoshka_dimensions"))
    modules = _read_json(path / "modules.json")
    if isinstance(modules, list):
        types = {str(m.get("type", "")).rsplit(".", 1)[-1]: m for m in modules if isinstance(m, dict)}
        if "Pooling" in types:
            pooling = _read_json(path / str(types["Pooling"].get("path", "")) / "config.json")
            modes = [t for key, t in _ST_MODES.items() if isinstance(pooling, dict) and pooling.get(key)]
            if len(modes) == 1:
                return PoolerConfig(modes[0], normalize="Normalize" in types, matryoshka=matryoshka)
    archs = config.get("architectures") or []
    if is_encoder(config) or (archs and all(str(a).endswith("Model") for a in archs)):
        return PoolerConfig("cls" if is_encoder(config) else "last", matryoshka=matryoshka)
    return None


def gguf_pooler(pooling_type: int | None) -> PoolerConfig | None:
    """A GGUF's `<arch>.pooling_type` as a pooler (None: absent, none or a ranking head)."""
    kind = _GGUF_TYPES.get(int(pooling_type)) if pooling_type is not None else None
    return None if kind is None else PoolerConfig(kind)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None

"""PEFT LoRA adapter directories: `adapter_config.json` plus `adapter_model.safetensors`.

`read_adapter_config` checks what an adapter asks for against what the engine serves and raises
ValueError naming the thing it cannot serve (no torch: the services validate a load request with
it before it reaches a worker). `load_adapter` reads the tensors (torch, safetensors) and checks
their shapes against the model's projections.

Served: LoRA (`peft_type` LORA) on the decoder's attention and MLP projections (q/k/v/o,
gate/up/down), `lora_alpha / r` scaling or rsLoRA's `lora_alpha / sqrt(r)`. Refused: DoRA,
`modules_to_save` (whole-module copies such as a new LM head), embedding adapters, trained biases,
per-module rank or alpha patterns, ranks above `--max-lora-rank`. `fan_in_fan_out` concerns the
base weights of GPT-2-style Conv1D layers: PEFT stores lora_A and lora_B as nn.Linear weights
either way ([r, in] and [out, r]), so it changes nothing here (shapes are checked).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")
# adapter_config.json fields that change what the adapter computes, and must be off here
_REFUSED = {
    "use_dora": "DoRA adapters (use_dora)",
    "modules_to_save": "modules_to_save (whole-module copies, e.g. a new LM head or embeddings)",
    "rank_pattern": "per-module ranks (rank_pattern)",
    "alpha_pattern": "per-module alphas (alpha_pattern)",
    "layer_replication": "layer_replication",
    "target_parameters": "target_parameters (LoRA on raw parameters)",
    "trainable_token_indices": "trainable_token_indices",
    "lora_bias": "trained LoRA biases (lora_bias)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
}


@dataclass(frozen=True)
class AdapterConfig:
    """What `adapter_config.json` says, checked."""

    path: str
    rank: int
    alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]  # of TARGETS; every one when the config says "all-linear" or a regex
    fan_in_fan_out: bool

    @property
    def scaling(self) -> float:
        """What lora_B @ lora_A is multiplied by (folded into B when the adapter is loaded)."""
        return self.alpha / math.sqrt(self.rank) if self.use_rslora else self.alpha / self.rank


def read_adapter_config(path: str | Path, max_lora_rank: int | None = None) -> AdapterConfig:
    """The checked config of the adapter directory `path`; ValueError says what is wrong."""
    root = Path(path)
    file = root / CONFIG_FILE
    if not file.is_file():
        raise ValueError(f"{root} is not a PEFT adapter directory: it has no {CONFIG_FILE}")
    if not (root / WEIGHTS_FILE).is_file():
        raise ValueError(f"LoRA adapter {root} has no {WEIGHTS_FILE} (save it with safe_serialization)")
    raw: dict[str, Any] = json.loads(file.read_text())
    kind = raw.get("peft_type", "LORA")
    if str(kind).upper() != "LORA":
        raise ValueError(f"adapter {root} is a {kind} adapter; only LoRA adapters are served")
    for key, what in _REFUSED.items():
        if raw.get(key):
            raise ValueError(f"LoRA adapter {root} uses {what}, which is not supported")
    if raw.get("bias", "none") != "none":
        raise ValueError(
            f"LoRA adapter {root} trains biases (bias={raw['bias']!r}); only bias='none' is served"
        )
    rank = int(raw.get("r", 8))
    if max_lora_rank is not None and rank > max_lora_rank:
        raise ValueError(
            f"LoRA adapter {root} has rank {rank}, above --max-lora-rank {max_lora_rank}; "
            f"start the engine with --max-lora-rank {rank} or more"
        )
    return AdapterConfig(
        path=str(root),
        rank=rank,
        alpha=float(raw.get("lora_alpha", 8)),
        use_rslora=bool(raw.get("use_rslora", False)),
        target_modules=_targets(root, raw.get("target_modules")),
        fan_in_fan_out=bool(raw.get("fan_in_fan_out", False)),
    )


def _targets(root: Path, targets: Any) -> tuple[str, ...]:
    """The projections an adapter names: a list must name only TARGETS; a string ("all-linear" or
    a regex over module names) leaves it to the tensors, which are checked one by one."""
    if targets is None or isinstance(targets, str):
        return TARGETS
    names = sorted({str(t).rsplit(".", 1)[-1] for t in targets})
    unknown = [t for t in names if t not in TARGETS]
    if unknown:
        raise ValueError(
            f"LoRA adapter {root} targets {', '.join(unknown)}; "
            f"served target modules are {', '.join(TARGETS)}"
        )
    return tuple(t for t in TARGETS if t in names)


@dataclass
class AdapterWeights:
    """An adapter's tensors on the CPU: (layer, module) -> (A [r, in], B [out, r]) in float32,
    B multiplied by the adapter's scaling already."""

    config: AdapterConfig
    modules: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.modules.values())


def load_adapter(
    path: str | Path, shapes: Mapping[str, tuple[int, int]], num_layers: int, max_lora_rank: int
) -> AdapterWeights:
    """Read and check adapter `path` for a model whose projections have `shapes` (module ->
    (in_features, out_features)) in each of its `num_layers` layers."""
    from safetensors.torch import load_file

    config = read_adapter_config(path, max_lora_rank)
    tensors = load_file(str(Path(path) / WEIGHTS_FILE), device="cpu")
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _KEY.match(key)
        if m is None:
            what = "embedding adapters" if "lora_embedding" in key else "this tensor"
            raise ValueError(f"LoRA adapter {path}: {what} ({key}) cannot be served")
        layer, module, ab = int(m.group(1)), m.group(2), m.group(3)
        if module not in shapes:
            raise ValueError(
                f"LoRA adapter {path} targets {module} ({key}); served target modules are {', '.join(shapes)}"
            )
        if layer >= num_layers:
            raise ValueError(f"LoRA adapter {path} has layer {layer} but the model has {num_layers} layers")
        parts.setdefault((layer, module), {})[ab] = tensor
    modules = {}
    for (layer, module), ab in parts.items():
        a, b = ab.get("A"), ab.get("B")
        where = f"layers.{layer}.{module}"
        if a is None or b is None:
            raise ValueError(f"LoRA adapter {path}: {where} has lora_A or lora_B missing")
        fan_in, fan_out = shapes[module]
        r = a.shape[0]
        if a.shape != (r, fan_in) or b.shape != (fan_out, r) or r > max_lora_rank:
            raise ValueError(
                f"LoRA adapter {path}: {where} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
                f"the model needs [r, {fan_in}] and [{fan_out}, r] with r <= {max_lora_rank} "
                f"(an adapter of another base model?)"
            )
        modules[(layer, module)] = (a.float().contiguous(), (b.float() * config.scaling).contiguous())
    return AdapterWeights(config, modules)


def projection_shapes(
    hidden: int, num_heads: int, num_kv_heads: int, head_dim: int, intermediate: int
) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each target module of a Llama-family decoder layer."""
    q, kv = num_heads * head_dim, num_kv_heads * head_dim
    return {
        "q_proj": (hidden, q),
        "k_proj": (hidden, kv),
        "v_proj": (hidden, kv),
        "o_proj": (q, hidden),
        "gate_proj": (hidden, intermediate),
        "up_proj": (hidden, intermediate),
        "down_proj": (intermediate, hidden),
    }

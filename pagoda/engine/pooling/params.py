"""What a pooling model does with a prompt, as the model states it (`PoolerConfig`) and as a
request asks for it (`PoolingParams`). Torch-free: the gateway validates requests against it.

A model serves either generation or embeddings (`--task`), as in vLLM: `auto` takes embeddings
for a checkpoint made for them (a sentence-transformers directory, a bare `...Model` architecture
such as `Qwen3Model` or `BertModel`, a GGUF with a pooling type) and generation otherwise;
`--task embed` turns any decoder into an embedding model (last-token pooling unless
`--pooling-type` says otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

PoolingType = Literal["last", "mean", "cls"]
Task = Literal["auto", "generate", "embed"]
POOLING_TYPES: tuple[str, ...] = get_args(PoolingType)
TASKS: tuple[str, ...] = get_args(Task)


@dataclass(frozen=True)
class PoolerConfig:
    """How the model turns a prompt's hidden states into its embedding: `last` (the final
    token's, decoders such as Qwen3-Embedding), `mean` (over every token) or `cls` (the first
    token's, BERT-style encoders); normalized to unit length by default. `matryoshka`: the model
    was trained so that a prefix of its embedding is an embedding too, so a request may ask for
    fewer `dimensions`."""

    pooling_type: PoolingType
    normalize: bool = True
    matryoshka: bool = False

    def __post_init__(self) -> None:
        if self.pooling_type not in POOLING_TYPES:
            raise ValueError(
                f"pooling type must be one of {', '.join(POOLING_TYPES)}, got {self.pooling_type!r}"
            )


@dataclass(frozen=True)
class PoolingParams:
    """A pooling request's options: `dimensions` keeps the embedding's first N values (then
    normalizes, where the model normalizes); `normalize` None takes the model's default."""

    dimensions: int | None = None
    normalize: bool | None = None

    def __post_init__(self) -> None:
        if self.dimensions is not None and self.dimensions < 1:
            raise ValueError(f"dimensions must be at least 1, got {self.dimensions}")


def resolve_pooler(
    task: str, pooling_type: str | None, detected: PoolerConfig | None, encoder: bool
) -> PoolerConfig | None:
    """The pooler a model serves with (None: it generates) from `--task`, `--pooling-type` and
    what its checkpoint says (`detected`). Raises ValueError naming the flag to change."""
    if task not in TASKS:
        raise ValueError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")
    if pooling_type is not None and pooling_type not in POOLING_TYPES:
        raise ValueError(f"--pooling-type must be one of {', '.join(POOLING_TYPES)}, got {pooling_type!r}")
    if task == "generate":
        if encoder:
            raise ValueError("this model is an encoder: it serves embeddings, not text; use --task embed")
        if pooling_type is not None:
            raise ValueError("--pooling-type applies to embedding models; drop it or use --task embed")
        return None
    if task == "auto" and detected is None and not encoder:
        if pooling_type is not None:
            raise ValueError("--pooling-type applies to embedding models; add --task embed")
        return None
    base = detected or PoolerConfig("cls" if encoder else "last")
    if pooling_type is None:
        return base
    return PoolerConfig(pooling_type, base.normalize, base.matryoshka)  # type: ignore[arg-type]

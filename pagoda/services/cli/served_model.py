"""What the front tiers (gateway, tokenizer) read of a served model: its tokenizer and limits,
never its weights, and without importing torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pagoda.services.cli.config import ModelSource

if TYPE_CHECKING:
    from pagoda.engine import PoolerConfig, Tokenizer


@dataclass(frozen=True)
class ServedModel:
    """What the front tiers need of the model: its tokenizer and limits, not its weights."""

    name: str
    tokenizer: Tokenizer
    max_model_len: int
    default_sampling: dict[str, float]
    pooler: PoolerConfig | None = None  # an embedding model's pooling; None: it generates


def read_served_model(source: ModelSource) -> ServedModel:
    """The tokenizer, name, context length and sampling defaults of `source`; reads no weights and
    imports no torch. Raises ValueError when --max-model-len exceeds the model's context."""
    from pagoda.engine import read_model_info, resolve_pooler, validate_max_model_len

    info = read_model_info(source.model)
    return ServedModel(
        name=source.served_model_name or info.name,
        tokenizer=info.tokenizer,
        max_model_len=validate_max_model_len(source.max_model_len, info.context_length),
        default_sampling=info.default_sampling,
        pooler=resolve_pooler(source.task, source.pooling_type, info.pooler, info.encoder),
    )

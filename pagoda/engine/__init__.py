"""pagoda's engine: token ids in, token ids out, on one machine.

Names are imported lazily so that light modules (block hashing, sampling params) load without
pulling in torch and the model code.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LLM": "pagoda.engine.llm",
    "make_engine_config": "pagoda.engine.llm",
    "AsyncEngine": "pagoda.engine.core.async_engine",
    "EngineCore": "pagoda.engine.core.engine_core",
    "CacheConfig": "pagoda.engine.config",
    "EngineConfig": "pagoda.engine.config",
    "BatcherConfig": "pagoda.engine.config",
    "RequestOutput": "pagoda.engine.outputs",
    "TokenLogprob": "pagoda.engine.outputs",
    "SamplingParams": "pagoda.engine.sampling.params",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")

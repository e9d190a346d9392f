"""pagoda's engine: token ids in, token ids out, on one machine.

Names are imported lazily so that light modules (block hashing, sampling params) load without
pulling in torch and the model code.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LLM": "engine.llm",
    "make_engine_config": "engine.llm",
    "AsyncEngine": "engine.async_engine",
    "EngineCore": "engine.engine_core",
    "CacheConfig": "engine.config",
    "EngineConfig": "engine.config",
    "SchedulerConfig": "engine.config",
    "RequestOutput": "engine.outputs",
    "TokenLogprob": "engine.outputs",
    "SamplingParams": "engine.sampling_params",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")

"""pagoda's engine: token ids in, token ids out, on one machine.

This module is the engine's API: the services (pagoda/services) import only the names below, never
a submodule (tests/unit/test_engine_exports.py holds them to it). Names are imported lazily, on
first use, so that light ones (sampling params, outputs, tokenizer, detokenizer, block hashing, the
async engine and the simulated core) load without torch and the model code; the heavy ones
(`EngineCore`, `LLM`, configs, loading) bring torch when used. The `TYPE_CHECKING` block repeats
`_EXPORTS` for the type checker, which cannot follow a lazy import; the test keeps the two equal.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    # requests and their outputs
    "SamplingParams": "pagoda.engine.sampling.params",
    "StructuredOutputsParams": "pagoda.engine.structured.params",
    "check_structured_outputs": "pagoda.engine.structured.grammar",
    "PoolingParams": "pagoda.engine.pooling.params",
    "PoolerConfig": "pagoda.engine.pooling.params",
    "resolve_pooler": "pagoda.engine.pooling.params",
    "RequestOutput": "pagoda.engine.outputs",
    "TokenLogprob": "pagoda.engine.outputs",
    # text
    "Tokenizer": "pagoda.engine.tokenization.tokenizer",
    "IncrementalDetokenizer": "pagoda.engine.tokenization.detokenizer",
    "StopChecker": "pagoda.engine.tokenization.detokenizer",
    # the prefix cache's block hashes (the cluster router computes the same)
    "BlockHash": "pagoda.engine.kv.block_hash",
    "hash_full_blocks": "pagoda.engine.kv.block_hash",
    # LoRA adapters: what a request names, and checking an adapter directory (no torch)
    "LoRARequest": "pagoda.engine.lora.request",
    "AdapterConfig": "pagoda.engine.lora.peft_adapter",
    "read_adapter_config": "pagoda.engine.lora.peft_adapter",
    # serving: the async engine over a core, and what it reports
    "AsyncEngine": "pagoda.engine.core.async_engine",
    "EngineDeadError": "pagoda.engine.core.async_engine",
    "StepCore": "pagoda.engine.core.async_engine",
    "build_off_main_thread": "pagoda.engine.core.async_engine",
    "set_engine_threads": "pagoda.engine.core.cpu_threads",
    "CoreCounters": "pagoda.engine.core.stats",
    "EngineCapacity": "pagoda.engine.core.stats",
    "SimCore": "pagoda.engine.core.sim_core",
    "SimConfig": "pagoda.engine.core.sim_core",
    # the model: cores, offline API, configuration, loading (torch)
    "EngineCore": "pagoda.engine.core.engine_core",
    "LLM": "pagoda.engine.llm",
    "build_data_parallel_cores": "pagoda.engine.distributed.data_parallel",
    "run_node": "pagoda.engine.distributed.nodes",
    "make_engine_config": "pagoda.engine.llm",
    "CacheConfig": "pagoda.engine.config",
    "EngineConfig": "pagoda.engine.config",
    "BatcherConfig": "pagoda.engine.config",
    "LoRAConfig": "pagoda.engine.config",
    "validate_max_model_len": "pagoda.engine.config",
    "add_engine_args": "pagoda.engine.engine_args",
    "engine_config_from_args": "pagoda.engine.engine_args",
    "field_default": "pagoda.engine.engine_args",
    "parse_size": "pagoda.engine.engine_args",
    "read_model_info": "pagoda.engine.loader.model_info",
    "load_checkpoint": "pagoda.engine.loader",
    "demo_model_path": "pagoda.engine.loader",
    "generation_defaults": "pagoda.engine.loader.catalog",
    "format_catalog": "pagoda.engine.loader.catalog",
}

if TYPE_CHECKING:  # re-exports (F401: ruff does not read a computed __all__)
    from pagoda.engine.config import (  # noqa: F401
        BatcherConfig,
        CacheConfig,
        EngineConfig,
        LoRAConfig,
        validate_max_model_len,
    )
    from pagoda.engine.core.async_engine import AsyncEngine, EngineDeadError, StepCore, build_off_main_thread  # noqa: F401
    from pagoda.engine.core.cpu_threads import set_engine_threads  # noqa: F401
    from pagoda.engine.core.engine_core import EngineCore  # noqa: F401
    from pagoda.engine.core.sim_core import SimConfig, SimCore  # noqa: F401
    from pagoda.engine.core.stats import CoreCounters, EngineCapacity  # noqa: F401
    from pagoda.engine.distributed.data_parallel import build_data_parallel_cores  # noqa: F401
    from pagoda.engine.distributed.nodes import run_node  # noqa: F401
    from pagoda.engine.engine_args import (  # noqa: F401
        add_engine_args,
        engine_config_from_args,
        field_default,
        parse_size,
    )
    from pagoda.engine.kv.block_hash import BlockHash, hash_full_blocks  # noqa: F401
    from pagoda.engine.llm import LLM, make_engine_config  # noqa: F401
    from pagoda.engine.loader import demo_model_path, load_checkpoint  # noqa: F401
    from pagoda.engine.loader.catalog import format_catalog, generation_defaults  # noqa: F401
    from pagoda.engine.loader.model_info import read_model_info  # noqa: F401
    from pagoda.engine.lora.peft_adapter import AdapterConfig, read_adapter_config  # noqa: F401
    from pagoda.engine.lora.request import LoRARequest  # noqa: F401
    from pagoda.engine.outputs import RequestOutput, TokenLogprob  # noqa: F401
    from pagoda.engine.pooling.params import PoolerConfig, PoolingParams, resolve_pooler  # noqa: F401
    from pagoda.engine.sampling.params import SamplingParams  # noqa: F401
    from pagoda.engine.structured.grammar import check_structured_outputs  # noqa: F401
    from pagoda.engine.structured.params import StructuredOutputsParams  # noqa: F401
    from pagoda.engine.tokenization.detokenizer import IncrementalDetokenizer, StopChecker  # noqa: F401
    from pagoda.engine.tokenization.tokenizer import Tokenizer  # noqa: F401

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:  # not cached here: a test that patches the defining module is obeyed
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pagoda.engine' has no attribute {name!r}")

"""A worker's LoRA adapters: loaded on the first request that names one (its path travels with
the request), dropped once the deployment no longer serves it (gateway/adapters.py). The engine
keeps at most --max-cpu-loras in memory and --max-loras in one step; requests running with an
adapter that is dropped finish with it."""

from __future__ import annotations

import logging

from pagoda.engine import AsyncEngine
from pagoda.services.scheduler.registry import ADAPTERS
from pagoda.services.transport.messages import WorkerRequest
from pagoda.services.transport.store import Store

logger = logging.getLogger("pagoda.worker")


async def ensure_adapter(engine: AsyncEngine, msg: WorkerRequest) -> str | None:
    """Load the adapter `msg` names unless the engine holds it; the reason it cannot (for a 400),
    or None when the request may run."""
    name = msg.lora_name
    if name is None or name in engine.list_loras():
        return None
    if not msg.lora_path:
        return f"LoRA adapter {name!r} came without a path to load it from"
    try:
        await engine.load_lora(name, msg.lora_path)
    except ValueError as exc:
        return f"LoRA adapter {name!r} cannot be loaded: {exc}"
    logger.info("loaded LoRA adapter %s from %s", name, msg.lora_path)
    return None


async def drop_unregistered(engine: AsyncEngine, store: Store) -> None:
    """Unload the adapters the deployment stopped serving (POST /v1/unload_lora_adapter)."""
    loaded = engine.list_loras()
    if not loaded:
        return
    served = set(await store.hgetall(ADAPTERS))
    for name in loaded:
        if name not in served and await engine.unload_lora(name):
            logger.info("unloaded LoRA adapter %s: the deployment no longer serves it", name)

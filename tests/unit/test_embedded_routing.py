"""All four services in one process on the in-memory bus and store, with two workers: the prefix
router keeps multi-turn conversations on the worker that cached them; round-robin does not."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from pagoda.engine.config import CacheConfig, EngineConfig
from pagoda.engine.core.async_engine import AsyncEngine
from pagoda.engine.core.engine_core import EngineCore
from pagoda.engine.sampling.params import SamplingParams
from pagoda.services.gateway.bus_frontend import BusFrontend
from pagoda.services.scheduler.dispatcher import SchedulerService
from pagoda.services.scheduler.registry import WorkerRegistry
from pagoda.services.tokenizer.prompts import PromptProcessor
from pagoda.services.tokenizer.service import TokenizerService
from pagoda.services.transport.bus_memory import InMemoryBus
from pagoda.services.transport.messages import PromptInput
from pagoda.services.transport.store import InMemoryStore
from pagoda.services.worker.service import WorkerService

# four conversations of three turns per router: each router's hit rate is over 12 prompts
TOPICS = ["tides", "volcanoes", "owls", "glass"]


async def _hit_rate(ckpt: Any, router: str) -> tuple[float, dict[str, int]]:
    bus, store = InMemoryBus(), InMemoryStore()
    cfg = EngineConfig(dtype="float32", max_model_len=1024, cache=CacheConfig(kv_cache_memory=64 << 20))
    workers = [
        WorkerService(
            AsyncEngine(EngineCore(cfg, checkpoint=ckpt)), bus, store, worker_id=f"w{i}", heartbeat_s=0.1
        )
        for i in range(2)
    ]
    scheduler = SchedulerService(bus, store, router=router, heartbeat_s=0.1)
    tok = ckpt.tokenizer
    name = workers[0].engine.model_name
    services = [*workers, scheduler, TokenizerService(bus, PromptProcessor(tok, 1024), name)]
    gateway = BusFrontend(bus, tok, model_name=name, max_model_len=1024, registry=WorkerRegistry(store, 0.1))
    services.append(gateway)
    for s in services:
        await s.start()
    prompt_tokens = cached_tokens = 0
    try:
        for _ in range(100):  # the first heartbeats land within a beat or two of start (0.1 s each)
            if gateway.is_ready():
                break
            await asyncio.sleep(0.05)
        assert gateway.is_ready()
        params = SamplingParams(max_tokens=4, temperature=0.0)
        for c, topic in enumerate(TOPICS):
            messages: list[dict[str, str]] = [
                {"role": "system", "content": "You are a patient teacher. Keep answers short. " * 4}
            ]
            for turn in range(3):
                messages.append(
                    {"role": "user", "content": f"Tell me one more thing about {topic} ({turn})."}
                )
                sub = await gateway.submit(f"c{c}t{turn}", PromptInput(messages=messages), params)
                ids: list[int] = []
                async for out in sub.outputs:
                    ids += out.new_token_ids
                    cached = out.num_cached_tokens
                prompt_tokens += len(sub.prompt_token_ids)
                cached_tokens += cached
                messages.append({"role": "assistant", "content": tok.decode(ids)})
    finally:
        for s in reversed(services):
            await s.stop()
    return cached_tokens / prompt_tokens, dict(scheduler.decisions)


@pytest.mark.slow
async def test_prefix_router_beats_round_robin_on_multi_turn(demo_checkpoint: Any) -> None:
    rr, rr_split = await _hit_rate(demo_checkpoint, "round-robin")
    px, px_split = await _hit_rate(demo_checkpoint, "prefix")
    print(f"\nprefix hit rate: round-robin {rr:.1%} {rr_split}, prefix router {px:.1%} {px_split}")
    assert px > rr + 0.1
    assert len(rr_split) == 2  # round-robin used both workers

"""Failover, stall detection and drain with all services in one process (in-memory bus and store,
a tiny random model): the same code paths the process-level fault tests exercise, in seconds."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from engine.async_engine import AsyncEngine
from engine.engine_core import EngineCore
from engine.llm import make_engine_config
from engine.sampling_params import SamplingParams
from services.bus_memory import InMemoryBus
from services.dispatcher import SchedulerService
from services.errors import APIError
from services.frontend import PromptProcessor
from services.gateway import BusFrontend
from services.messages import PromptInput
from services.registry import WorkerRegistry
from services.store import InMemoryStore
from services.tokenizer_service import TokenizerService
from services.worker import WorkerService

HB = 0.1
PROMPTS = [f"prompt {i}: abc" for i in range(4)]
PARAMS = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tiny_models import make_tiny_model, save_tiny_tokenizer

    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model("llama", path)
    save_tiny_tokenizer(path)
    return path


class Stack:
    def __init__(self, model: Path, n_workers: int) -> None:
        self.bus, self.store = InMemoryBus(), InMemoryStore()
        cfg = make_engine_config(str(model), dtype="float32", kv_cache_memory=8 << 20)
        self.workers = [
            WorkerService(
                AsyncEngine(EngineCore(cfg)),
                self.bus,
                self.store,
                worker_id=f"w{i}",
                heartbeat_s=HB,
                stall_timeout_s=0.5,
            )
            for i in range(n_workers)
        ]
        tok = self.workers[0].engine.tokenizer
        self.scheduler = SchedulerService(self.bus, self.store, router="least-load", heartbeat_s=HB)
        self.tokenizer = TokenizerService(self.bus, PromptProcessor(tok, 512))
        self.gateway = BusFrontend(
            self.bus, tok, model_name="m", max_model_len=512, registry=WorkerRegistry(self.store, HB)
        )
        self.services: list[Any] = [*self.workers, self.scheduler, self.tokenizer, self.gateway]

    async def run(self, prompt: str) -> list[int] | APIError:
        try:
            sub = await self.gateway.submit(f"r-{uuid.uuid4().hex}", PromptInput(text=prompt), PARAMS)
            ids: list[int] = []
            async for out in sub.outputs:
                ids += out.new_token_ids
            return ids
        except APIError as err:
            return err

    async def wait_running(self, worker: WorkerService) -> None:
        for _ in range(500):
            if worker._inflight:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"{worker.worker_id} never ran a request")


@contextlib.asynccontextmanager
async def stack(model: Path, n_workers: int = 2) -> AsyncIterator[Stack]:
    s = Stack(model, n_workers)
    for svc in s.services:
        await svc.start()
    try:
        yield s
    finally:
        for svc in reversed(s.services):
            with contextlib.suppress(Exception):
                await svc.stop()


async def _kill(worker: WorkerService) -> None:
    """Die without a word: no more messages, heartbeats or deltas; no deregistration."""
    assert worker._sub is not None
    await worker._sub.cancel()
    for task in worker._tasks:
        task.cancel()
    worker.engine.set_sink(lambda *a: None)


async def test_killed_worker_requests_continue_identically(tiny: Path) -> None:
    async with stack(tiny) as s:
        baseline = [await s.run(p) for p in PROMPTS]
        assert all(isinstance(b, list) and len(b) == 48 for b in baseline)
        runs = [asyncio.create_task(s.run(p)) for p in PROMPTS]
        await s.wait_running(s.workers[0])
        await _kill(s.workers[0])
        assert await asyncio.gather(*runs) == baseline


async def test_no_worker_left_is_a_clear_error(tiny: Path) -> None:
    async with stack(tiny, n_workers=1) as s:
        run = asyncio.create_task(s.run(PROMPTS[0]))
        await s.wait_running(s.workers[0])
        await _kill(s.workers[0])
        err = await asyncio.wait_for(run, 10)
        assert isinstance(err, APIError) and err.status == 503 and "no worker" in err.message


async def test_stalled_worker_is_unready_and_its_requests_move(tiny: Path) -> None:
    async with stack(tiny) as s:
        baseline = [await s.run(p) for p in PROMPTS]
        stalled = s.workers[0]
        step = stalled.engine.core.step
        release = False

        def stuck_step() -> Any:
            while not release:
                time.sleep(0.01)
            return step()

        stalled.engine.core.step = stuck_step  # type: ignore[method-assign]
        runs = [asyncio.create_task(s.run(p)) for p in PROMPTS]
        await s.wait_running(stalled)
        assert await asyncio.wait_for(asyncio.gather(*runs), 20) == baseline
        assert stalled.state == "stalled"
        release = True
        for _ in range(100):
            if stalled.state == "ready":
                break
            await asyncio.sleep(0.05)
        assert stalled.state == "ready"


async def test_stalled_only_worker_makes_the_gateway_unready(tiny: Path) -> None:
    async with stack(tiny, n_workers=1) as s:
        assert s.gateway.is_ready()
        w = s.workers[0]
        w.state = "stalled"
        w._check_stall = lambda: "stalled"  # type: ignore[method-assign]
        for _ in range(100):
            if not s.gateway.is_ready():
                break
            await asyncio.sleep(0.02)
        assert not s.gateway.is_ready()


async def test_drain_finishes_running_and_hands_back_new_requests(tiny: Path) -> None:
    async with stack(tiny) as s:
        baseline = [await s.run(p) for p in PROMPTS]
        w0 = s.workers[0]
        runs = [asyncio.create_task(s.run(p)) for p in PROMPTS]
        await s.wait_running(w0)
        drain = asyncio.create_task(w0.drain(10.0))
        late = [asyncio.create_task(s.run(p)) for p in PROMPTS]
        await drain
        assert not w0._inflight
        assert await asyncio.gather(*runs) == baseline
        assert await asyncio.gather(*late) == baseline


async def test_a_request_routed_as_an_idle_worker_drains_is_not_stranded(tiny: Path) -> None:
    """The scheduler reads the registry at most every heartbeat/4, so for a moment after a worker
    announces `draining` it may still route there. An idle worker's drain must outlast that moment
    (it hands such requests back); else they land in the queue of a stopped worker, whose
    tombstone keeps the gateway waiting for its whole linger."""
    async with stack(tiny) as s:
        w0 = s.workers[0]
        stale = await s.scheduler._workers()
        assert {st.worker_id for st, _ in stale} == {"w0", "w1"}
        fresh = s.scheduler._workers
        announced = asyncio.Event()
        announced_at = 0.0

        async def lagging() -> Any:  # routing waits for the drain to start, then sees a stale view
            await announced.wait()
            return stale if time.monotonic() < announced_at + HB / 4 else await fresh()

        s.scheduler._workers = lagging  # type: ignore[method-assign]

        async def sigterm() -> None:  # what `pagoda worker` does on SIGTERM
            await w0.drain(10.0)
            await w0.stop()

        runs = [asyncio.create_task(s.run(p)) for p in PROMPTS]
        await asyncio.sleep(0.5)  # tokenized, waiting to be routed
        stopping = asyncio.create_task(sigterm())
        while w0.state != "draining":
            await asyncio.sleep(0)
        announced_at = time.monotonic()
        announced.set()
        outs = await asyncio.wait_for(asyncio.gather(*runs), 5)
        assert all(isinstance(o, list) and len(o) == 48 for o in outs), outs
        await stopping
        assert s.scheduler.decisions.get("w0", 0) > 0, "nothing was routed to the draining worker"


async def test_a_request_routed_to_a_worker_that_left_is_routed_again(tiny: Path) -> None:
    """A drained worker deletes its queue; a scheduler still routing on an older worker list gets
    `QueueNotFoundError` and routes the request to another worker."""
    async with stack(tiny) as s:
        w0 = s.workers[0]
        stale = await s.scheduler._workers()
        assert {st.worker_id for st, _ in stale} == {"w0", "w1"}
        await w0.drain(10.0)
        await w0.stop()
        assert w0.queue not in s.bus.broker.queues, "w0 kept its queue"

        async def stale_view() -> Any:
            return stale

        s.scheduler._workers = stale_view  # type: ignore[method-assign]
        outs = await asyncio.wait_for(asyncio.gather(*(s.run(p) for p in PROMPTS)), 10)
        assert all(isinstance(o, list) and len(o) == 48 for o in outs), outs
        assert s.scheduler.decisions.get("w0", 0) > 0, "nothing was routed to the worker that left"

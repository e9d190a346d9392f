"""Failover, stall detection and drain with all services in one process (in-memory bus and store,
a tiny random model): the same code paths the process-level fault tests exercise, in seconds."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from pagoda.engine.core.async_engine import AsyncEngine
from pagoda.engine.core.engine_core import EngineCore
from pagoda.engine.llm import make_engine_config
from pagoda.engine.sampling.params import SamplingParams
from pagoda.services.gateway.bus_frontend import BusFrontend
from pagoda.services.scheduler.dispatcher import SchedulerService
from pagoda.services.scheduler.registry import WorkerRegistry
from pagoda.services.tokenizer.prompts import PromptProcessor
from pagoda.services.tokenizer.service import TokenizerService
from pagoda.services.transport.bus_memory import InMemoryBus
from pagoda.services.transport.errors import APIError
from pagoda.services.transport.messages import PromptInput
from pagoda.services.transport.store import InMemoryStore
from pagoda.services.worker.service import WorkerService
from tests.polling import until

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
        name = self.workers[0].engine.model_name
        self.tokenizer = TokenizerService(self.bus, PromptProcessor(tok, 512), name)
        self.gateway = BusFrontend(
            self.bus, tok, model_name=name, max_model_len=512, registry=WorkerRegistry(self.store, HB)
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
        await until(lambda: bool(worker._inflight), 5, f"{worker.worker_id} to run a request")


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


def _stick(worker: WorkerService) -> threading.Event:
    """Make `worker`'s steps block until the returned event is set: a stalled step loop. A step
    never released fails (its engine stops on the error) after a minute instead of hanging."""
    step = worker.engine.core.step
    release = threading.Event()

    def stuck_step() -> Any:
        assert release.wait(60), "a stuck step was never released"
        return step()

    worker.engine.core.step = stuck_step  # type: ignore[method-assign]
    return release


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
        release = _stick(stalled)
        runs = [asyncio.create_task(s.run(p)) for p in PROMPTS]
        await s.wait_running(stalled)
        assert await asyncio.wait_for(asyncio.gather(*runs), 20) == baseline
        assert stalled.state == "stalled"
        release.set()
        await until(lambda: stalled.state == "ready", 5, "the stalled worker to be ready again")


async def test_stalled_only_worker_makes_the_gateway_unready(tiny: Path) -> None:
    async with stack(tiny, n_workers=1) as s:
        assert s.gateway.is_ready()
        w = s.workers[0]
        w.state = "stalled"
        w._check_stall = lambda: "stalled"  # type: ignore[method-assign]
        await until(lambda: not s.gateway.is_ready(), 2, "the gateway to be unready")


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
        assert {w.worker_id for w in stale} == {"w0", "w1"}
        fresh = s.scheduler._workers
        announced = asyncio.Event()
        announced_at = 0.0
        routing: list[None] = []  # one per call: a request tokenized, waiting to be routed

        async def lagging() -> Any:  # routing waits for the drain to start, then sees a stale view
            routing.append(None)
            await announced.wait()
            return stale if time.monotonic() < announced_at + HB / 4 else await fresh()

        s.scheduler._workers = lagging  # type: ignore[method-assign]

        async def sigterm() -> None:  # what `pagoda worker` does on SIGTERM
            await w0.drain(10.0)
            await w0.stop()

        runs = [asyncio.create_task(s.run(p)) for p in PROMPTS]
        await until(lambda: len(routing) >= len(PROMPTS), 10, "every request waiting to be routed")
        stopping = asyncio.create_task(sigterm())
        await until(lambda: w0.state == "draining", 10, "w0 to start draining", interval_s=0)
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
        assert {w.worker_id for w in stale} == {"w0", "w1"}
        await w0.drain(10.0)
        await w0.stop()
        assert w0.queue not in s.bus.broker.queues, "w0 kept its queue"

        async def stale_view() -> Any:
            return stale

        s.scheduler._workers = stale_view  # type: ignore[method-assign]
        outs = await asyncio.wait_for(asyncio.gather(*(s.run(p) for p in PROMPTS)), 10)
        assert all(isinstance(o, list) and len(o) == 48 for o in outs), outs
        assert s.scheduler.decisions.get("w0", 0) > 0, "nothing was routed to the worker that left"


async def test_a_draining_worker_that_stalls_loses_its_requests(tiny: Path) -> None:
    """A drain waits up to its timeout for running requests; when the step loop stops meanwhile,
    the worker reports stalled (not just draining), so gateways move its requests at once."""
    async with stack(tiny) as s:
        baseline = [await s.run(p) for p in PROMPTS]
        w0 = s.workers[0]
        release = _stick(w0)
        runs = [asyncio.create_task(s.run(p)) for p in PROMPTS]
        await s.wait_running(w0)
        drain = asyncio.create_task(w0.drain(60.0))
        assert await asyncio.wait_for(asyncio.gather(*runs), 20) == baseline
        assert w0.state == "stalled"
        release.set()
        await until(lambda: w0.state != "stalled", 5, "the draining worker's step loop to resume")
        assert w0.state == "draining"  # it takes no new requests, stalled or not
        await asyncio.wait_for(drain, 10)  # the moved requests' copies were aborted there


async def test_an_engine_that_stops_on_an_error_loses_its_requests(tiny: Path) -> None:
    """An exception anywhere in the step thread (here: taking a request in, not a step) stops the
    engine; the worker reports stalled, so its requests continue on another worker, identically,
    and those still routed to it go back to the scheduler. Before, the thread ended quietly and
    its requests looked as if they were running until a drain or the stall check found them."""
    async with stack(tiny) as s:
        baseline = [await s.run(p) for p in PROMPTS]
        w0 = s.workers[0]

        def broken(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError("boom")

        w0.engine.core.add_request = broken  # type: ignore[method-assign]
        outs = await asyncio.wait_for(asyncio.gather(*(s.run(p) for p in PROMPTS)), 20)
        assert outs == baseline
        assert w0.engine.dead_reason is not None and not w0.engine.is_ready()
        assert w0.state == "stalled"
        assert s.scheduler.decisions.get("w0", 0) > 0, "nothing was routed to the broken worker"
        # a few "stalled" heartbeats later it gives up: `pagoda worker` then exits 1
        await asyncio.wait_for(w0.failed.wait(), 20 * HB)
        assert not s.workers[1].failed.is_set()


async def test_an_engine_that_stops_with_no_worker_left_is_a_clear_error(tiny: Path) -> None:
    async with stack(tiny, n_workers=1) as s:
        w = s.workers[0]

        def broken(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError("boom")

        w.engine.core.add_request = broken  # type: ignore[method-assign]
        err = await asyncio.wait_for(s.run(PROMPTS[0]), 10)
        assert isinstance(err, APIError) and err.status == 503, err


async def test_a_request_the_engine_refuses_when_it_takes_it_in_is_answered(tiny: Path) -> None:
    async with stack(tiny, n_workers=1) as s:
        w = s.workers[0]

        def refuse(request_id: str, *args: Any, **kwargs: Any) -> None:
            raise ValueError(f"request id {request_id!r} is already running")

        w.engine.core.add_request = refuse  # type: ignore[method-assign]
        err = await asyncio.wait_for(s.run(PROMPTS[0]), 10)
        assert isinstance(err, APIError) and err.status == 400 and "already running" in err.message, err
        assert not w._inflight and w.engine.is_ready()


async def test_heartbeat_counts_running_requests_live_after_an_abort(tiny: Path) -> None:
    """The least-load router reads `num_running` from heartbeats: after an abort (no step follows
    on an idle worker) it must say 0, not the figure of the last step."""
    async with stack(tiny, n_workers=1) as s:
        w = s.workers[0]
        long = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
        sub = await s.gateway.submit("r-abort", PromptInput(text=PROMPTS[0]), long)
        outputs = aiter(sub.outputs)
        await anext(outputs)  # it runs
        await w.engine.abort("r-abort")
        await until(lambda: not w._inflight, 2, "the aborted request to leave the worker")
        await w._beat()
        (beat,) = [b for b in await w.registry.alive() if b.worker_id == "w0"]
        assert beat.num_running == 0 and beat.num_waiting == 0, beat


async def test_a_sink_error_stops_the_engine_and_its_requests_move(tiny: Path) -> None:
    """A step's outputs lost in the worker's sink would leave their requests waiting forever (and
    a drain waiting out its whole timeout); instead the engine stops and the requests move."""
    async with stack(tiny) as s:
        baseline = [await s.run(p) for p in PROMPTS]
        w0 = s.workers[0]
        on_step = w0._on_step
        calls = 0

        def flaky(*args: Any) -> None:
            nonlocal calls
            calls += 1
            if calls == 3:
                raise KeyError("boom")
            on_step(*args)

        w0.engine.set_sink(flaky, w0._on_reject)
        outs = await asyncio.wait_for(asyncio.gather(*(s.run(p) for p in PROMPTS)), 20)
        assert outs == baseline
        assert isinstance(w0.engine.dead_reason, KeyError) and w0.state == "stalled"
        await asyncio.wait_for(w0.failed.wait(), 20 * HB)


async def test_a_worker_that_can_schedule_nothing_is_stalled(
    tiny: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Steps that schedule nothing (here: the KV cache refuses every allocation) are not progress:
    the worker reports stalled and its requests move. Counted as steps, they kept it "ready"."""
    async with stack(tiny) as s:
        baseline = [await s.run(p) for p in PROMPTS]
        w0 = s.workers[0]
        w0.engine.core.kv.allocate_slots = lambda *args, **kwargs: None  # type: ignore[method-assign]
        outs = await asyncio.wait_for(asyncio.gather(*(s.run(p) for p in PROMPTS)), 20)
        assert outs == baseline
        assert "w0: the step loop has not advanced" in caplog.text
        assert s.scheduler.decisions.get("w0", 0) > 0, "nothing was routed to the stuck worker"


async def test_the_gateway_watch_outlives_an_error(tiny: Path) -> None:
    """The loop that moves a lost worker's requests must survive a failing check: it once ended
    on the first exception, and every later lost worker's requests hung."""
    async with stack(tiny) as s:
        baseline = [await s.run(p) for p in PROMPTS]
        check = s.gateway._check_workers
        failures = 0

        async def failing_once() -> None:
            nonlocal failures
            if failures == 0:
                failures += 1
                raise RuntimeError("boom")
            await check()

        s.gateway._check_workers = failing_once  # type: ignore[method-assign]
        await until(lambda: failures > 0, 5, "the gateway's watch to fail once")
        runs = [asyncio.create_task(s.run(p)) for p in PROMPTS]
        await s.wait_running(s.workers[0])
        await _kill(s.workers[0])
        assert await asyncio.wait_for(asyncio.gather(*runs), 20) == baseline

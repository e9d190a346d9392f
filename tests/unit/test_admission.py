"""Overload: the whole stack (gateway -> tokenizer -> scheduler -> worker, in-memory) over an engine
with a fixed number of running slots refuses at once with 503 + Retry-After beyond its slots plus
queue cap, lets priority requests through, and fails requests that do not start in time."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any, cast

import httpx
import pytest

from pagoda.services.gateway.bus_frontend import BusFrontend
from pagoda.services.gateway.server import build_app
from pagoda.services.scheduler.admission import (
    AdmissionLimits,
    FleetAdmission,
    behind_a_prefill,
    has_room,
    queue_deadline,
    queued,
)
from pagoda.services.scheduler.dispatcher import SchedulerService
from pagoda.services.scheduler.registry import WorkerRegistry
from pagoda.services.scheduler.router import WorkerState
from pagoda.services.tokenizer.prompts import PromptProcessor
from pagoda.services.tokenizer.service import TokenizerService
from pagoda.services.transport.bus_memory import InMemoryBus
from pagoda.services.transport.messages import (
    Queues,
    Rejected,
    SamplingSpec,
    ScheduleRequest,
    WorkerRequest,
    decode,
    encode,
)
from pagoda.services.transport.store import InMemoryStore
from pagoda.services.worker.service import WorkerService
from tests.fakes import FakeTokenizer, SlotEngine, SlotSeq
from tests.polling import until


class Stack:
    def __init__(self, slots: int, limits: AdmissionLimits, queue_timeout_s: float | None = None) -> None:
        bus, store, tok = InMemoryBus(), InMemoryStore(), FakeTokenizer()
        self.engine = SlotEngine(slots)
        hb = 0.05
        self.worker = WorkerService(cast(Any, self.engine), bus, store, worker_id="w0", heartbeat_s=hb,
                                    admission=limits)  # fmt: skip
        self.scheduler = SchedulerService(bus, store, heartbeat_s=hb, admission=limits)
        self.gateway = BusFrontend(
            bus, cast(Any, tok), model_name="fake-model", max_model_len=256,
            registry=WorkerRegistry(store, hb), queue_timeout_s=queue_timeout_s,
        )  # fmt: skip
        self.fleet = FleetAdmission(WorkerRegistry(store, hb), limits, "fake-model")
        self.services: list[Any] = [
            self.worker, self.scheduler, TokenizerService(
                bus, PromptProcessor(cast(Any, tok), 256), "fake-model"
            ),
            self.gateway, self.fleet,
        ]  # fmt: skip
        self.app = build_app(self.gateway, admission=self.fleet)

    async def __aenter__(self) -> httpx.AsyncClient:
        for s in self.services:
            await s.start()
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://t")
        return self.client

    async def __aexit__(self, *exc: object) -> None:
        await self.client.aclose()
        for s in reversed(self.services):
            await s.stop()


def _body(max_tokens: int, **kw: Any) -> dict[str, Any]:
    return {"prompt": "hello", "max_tokens": max_tokens, **kw}


async def test_beyond_slots_and_queue_the_fleet_refuses_at_once() -> None:
    stack = Stack(slots=2, limits=AdmissionLimits(max_waiting=1, priority_reserve=1))
    engine = stack.engine
    async with stack as c:
        # The engine makes no progress, so the 3 that fit (2 running + 1 queued) stay in flight:
        # an answer that comes back meanwhile was refused without waiting for room.
        engine.paused = True
        calls = [c.post("/v1/completions", json=_body(30, stream=i % 2 == 1)) for i in range(6)]
        tasks = [asyncio.create_task(call) for call in calls]
        await until(lambda: sum(t.done() for t in tasks) >= 3, 10, "three answers")
        await until(lambda: engine.num_running + engine.num_waiting == 3, 10, "three requests in the engine")
        refused = [t.result() for t in tasks if t.done()]
        assert len(refused) == 3  # the admitted three are still running
        for resp in refused:  # streaming ones too: a real HTTP status, before any event
            assert resp.status_code == 503 and resp.headers["retry-after"] == "1"
            assert "at capacity" in resp.json()["error"]["message"]
        priority = asyncio.create_task(c.post("/v1/completions", json=_body(2, priority=-1)))  # the reserve
        await until(lambda: engine.num_running + engine.num_waiting == 4, 10, "the priority request queued")
        engine.paused = False
        assert (await priority).status_code == 200, (await priority).text
        admitted = await asyncio.gather(*tasks)
        assert sorted(r.status_code for r in admitted) == [200, 200, 200, 503, 503, 503]
        again = await c.post("/v1/completions", json=_body(2))  # room again once they finished
        assert again.status_code == 200
        too_big = await c.post("/v1/completions", json=_body(2, n=4))  # never fits 2 slots + 1
        assert too_big.status_code == 400 and too_big.json()["error"]["param"] == "n"


async def test_a_request_that_cannot_start_in_time_fails_clearly() -> None:
    stack = Stack(slots=1, limits=AdmissionLimits(max_waiting=4), queue_timeout_s=0.3)
    engine = stack.engine
    async with stack as c:
        first = asyncio.create_task(c.post("/v1/completions", json=_body(20)))
        await until(lambda: any(s.done for s in engine.running), 5, "the first request's first token")
        engine.paused = True  # it holds the only slot until the others have timed out
        resp = await c.post("/v1/completions", json=_body(2))
        assert resp.status_code == 503, resp.text
        assert "queue timeout (0.3 s)" in resp.json()["error"]["message"]
        stream = await c.post("/v1/completions", json=_body(2, stream=True))
        events = [e[len("data: ") :] for e in stream.text.split("\n\n") if e]
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == 503
        assert stack.engine.waiting == []  # the worker dropped them from its queue
        engine.paused = False
        assert (await first).status_code == 200


@pytest.mark.parametrize(("max_waiting", "expected"), [(0, 503), (1, 200)])
async def test_without_a_queue_no_request_waits_behind_a_prefill_in_a_busy_batch(
    max_waiting: int, expected: int
) -> None:
    """`--max-waiting-requests 0`: while the worker's step prefills a request next to decoding
    ones, a request with a free slot is refused (it would wait for that step); with a queue, or
    between such steps, it is taken."""
    stack = Stack(slots=3, limits=AdmissionLimits(max_waiting=max_waiting, priority_reserve=0))
    engine = stack.engine
    async with stack as c:
        running = [asyncio.create_task(c.post("/v1/completions", json=_body(100))) for _ in range(2)]
        await until(lambda: engine.num_running == 2, 2.0, "two requests running")
        engine.prefilling = 1  # one of them is in its prefill step, the other decodes
        during = await c.post("/v1/completions", json=_body(2))
        assert during.status_code == expected, during.text
        if expected == 503:
            assert during.headers["retry-after"] == "1"
            assert "prefilling in a busy batch" in during.json()["error"]["message"]
        engine.prefilling = 0  # the step ended
        after = await c.post("/v1/completions", json=_body(2))
        assert after.status_code == 200
        assert [(await r).status_code for r in running] == [200, 200]


def test_room_counts_sequences_beyond_the_running_slots() -> None:
    limits = AdmissionLimits(max_waiting=2, priority_reserve=1)
    w = WorkerState("w", num_running=4, num_waiting=1, max_num_seqs=4)
    assert queued(w) == 1 and queued(w, extra=2) == 3
    assert has_room(w, limits, priority=0) and not has_room(w, limits, priority=0, seqs=2)
    assert has_room(w, limits, priority=-1, seqs=2) and not has_room(w, limits, priority=-1, seqs=3)
    assert has_room(w, AdmissionLimits(max_waiting=None), 0, extra=10**6)
    no_queue = AdmissionLimits(max_waiting=0, priority_reserve=1)
    busy = WorkerState("w", num_running=3, max_num_seqs=4)
    assert has_room(busy, no_queue, priority=0)
    prefilling = WorkerState("w", num_running=3, max_num_seqs=4, num_prefilling=1)
    assert behind_a_prefill(prefilling) and not has_room(prefilling, no_queue, priority=0)
    assert has_room(prefilling, no_queue, priority=-1)  # the reserve is a queue
    assert has_room(prefilling, AdmissionLimits(max_waiting=1), priority=0)
    burst = WorkerState("w", num_running=3, max_num_seqs=4, num_prefilling=3)  # nothing decodes
    assert not behind_a_prefill(burst) and has_room(burst, no_queue, priority=0)
    assert queue_deadline(100.0, 5.0, now_wall=102.0, now_mono=50.0) == 53.0
    assert queue_deadline(100.0, 5.0, now_wall=90.0, now_mono=50.0) == 55.0  # skewed clocks
    assert queue_deadline(100.0, None, 102.0, 50.0) is None
    with pytest.raises(ValueError, match="max-waiting-requests"):
        AdmissionLimits(max_waiting=-1)


async def _replies(bus: InMemoryBus, queue: str) -> AsyncIterator[Any]:
    got: asyncio.Queue[Any] = asyncio.Queue()

    async def take(message: Any) -> None:
        msg = decode(message.body)
        if isinstance(msg, Rejected):  # not the running requests' steps
            got.put_nowait(msg)

    await bus.consume(queue, take)
    while True:
        yield await asyncio.wait_for(got.get(), 2.0)


async def test_scheduler_routes_around_full_workers_and_workers_refuse() -> None:
    """The backstops behind the gateway (other gateways' requests, a stale view): the scheduler
    routes to a worker with room; a worker without room rejects what reaches it."""
    bus, store, queues = InMemoryBus(), InMemoryStore(), Queues("t")
    limits = AdmissionLimits(max_waiting=0, priority_reserve=1)
    engines = {"w0": SlotEngine(slots=1), "w1": SlotEngine(slots=1)}
    engines["w0"].running.append(SlotSeq("busy", 10**6))
    workers = [
        WorkerService(
            cast(Any, e), bus, store, worker_id=wid, heartbeat_s=0.05, admission=limits, queues=queues
        )
        for wid, e in engines.items()
    ]
    scheduler = SchedulerService(bus, store, heartbeat_s=0.05, admission=limits, queues=queues)
    reply = await bus.declare_reply_queue("")
    replies = _replies(bus, reply)
    for w in workers:
        await w.start()
    await scheduler.start()
    try:
        long = SamplingSpec(max_tokens=10**6)

        def request(rid: str, priority: int = 0) -> bytes:
            msg = ScheduleRequest(request_id=rid, reply_to=reply, prompt_token_ids=[1], sampling=long,
                                  priority=priority)  # fmt: skip
            return encode(msg)

        registry = WorkerRegistry(store, 0.05)

        async def w0_seen_full() -> bool:  # a heartbeat with w0's busy slot, and w1 registered
            states = {b.worker_id: b for b in await registry.alive()}
            return "w1" in states and "w0" in states and states["w0"].num_running == 1

        await until(w0_seen_full, 5, "the registry to show w0's busy slot")
        await bus.publish(queues.schedule, request("r1"))
        await until(lambda: engines["w1"].num_running == 1, 5, "r1 to run")
        assert scheduler.decisions == {"w1": 1}  # not the full w0
        await bus.publish(queues.schedule, request("r2"))  # both full now: a worker says no
        msg = await anext(replies)
        assert isinstance(msg, Rejected) and msg.request_id == "r2"
        assert msg.status == 503 and msg.retry_after_s == 1
        direct = WorkerRequest(request_id="r3", reply_to=reply, prompt_token_ids=[1], sampling=long)
        await bus.publish(queues.worker("w1"), encode(direct))  # as if routed on a stale view
        msg = await anext(replies)
        assert isinstance(msg, Rejected) and msg.request_id == "r3" and msg.status == 503
        await bus.publish(queues.schedule, request("r4", priority=-1))  # the reserve takes it
        await until(lambda: any(e.waiting for e in engines.values()), 5, "r4 to be queued")
        assert [s.request_id for e in engines.values() for s in e.waiting] == ["r4"]
    finally:
        await scheduler.stop()
        for w in workers:
            await w.stop()
        await bus.close()

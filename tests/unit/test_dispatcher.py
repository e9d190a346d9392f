"""The scheduler service on in-memory transports, with two registered (fake) workers."""

from __future__ import annotations

import asyncio

from pagoda.engine.sampling.params import SamplingParams
from pagoda.services.scheduler.dispatcher import SchedulerService
from pagoda.services.scheduler.registry import WorkerRegistry
from pagoda.services.transport.bus_memory import InMemoryBus
from pagoda.services.transport.messages import (
    Queues,
    SamplingSpec,
    ScheduleRequest,
    WorkerRequest,
    decode,
    encode,
)
from pagoda.services.transport.store import InMemoryStore
from tests.fakes import MODEL, heartbeat


class SlowStore(InMemoryStore):
    """Answers like Redis does: after a round trip, so concurrent routings interleave."""

    async def smembers_many(self, keys: list[str]) -> list[set[str]]:
        await asyncio.sleep(0.005)
        return await super().smembers_many(keys)


async def test_a_burst_of_requests_spreads_over_idle_workers() -> None:
    bus, store, queues = InMemoryBus(), SlowStore(), Queues("t")
    registry = WorkerRegistry(store, heartbeat_s=10.0)
    got: dict[str, list[str]] = {"a": [], "b": []}
    for wid in got:
        await registry.beat(heartbeat(wid, max_num_seqs=4))
        await bus.declare_work_queue(queues.worker(wid))

        async def take(message: object, wid: str = wid) -> None:
            msg = decode(message.body)  # type: ignore[attr-defined]
            assert isinstance(msg, WorkerRequest)
            got[wid].append(msg.request_id)

        await bus.consume(queues.worker(wid), take)
    scheduler = SchedulerService(bus, store, router="prefix", heartbeat_s=10.0, queues=queues)
    await scheduler.start()
    await bus.declare_reply_queue("replies")
    spec = SamplingSpec.of(SamplingParams())
    for i in range(8):  # distinct prompts: nothing cached, so load decides
        req = ScheduleRequest(
            request_id=f"r{i}", reply_to="replies", prompt_token_ids=[i + 1] * 40, sampling=spec
        )
        await bus.publish(queues.schedule, encode(req))
    for _ in range(200):
        if len(got["a"]) + len(got["b"]) == 8:
            break
        await asyncio.sleep(0.01)
    await scheduler.stop()
    await bus.close()
    assert sorted(len(v) for v in got.values()) == [4, 4], got


async def test_routing_keeps_to_the_model_and_prefers_workers_holding_the_adapter() -> None:
    """A request goes only to its model's workers (none: a 503 naming the model); one for a LoRA
    adapter goes to a worker that holds it loaded, even a busier one; the adapter list survives
    the registry's round trip through the store (one hash field)."""
    store = InMemoryStore()
    registry = WorkerRegistry(store, heartbeat_s=10.0)
    await registry.beat(heartbeat("idle", num_running=0))
    await registry.beat(heartbeat("holder", num_running=3, loras=("fr", "de")))
    await registry.beat(heartbeat("other-model", model="another"))
    scheduler = SchedulerService(InMemoryBus(), store, router="least-load", heartbeat_s=10.0)
    spec = SamplingSpec.of(SamplingParams())

    def req(**kw: object) -> ScheduleRequest:
        return ScheduleRequest(request_id="r", reply_to="q", prompt_token_ids=[1] * 40, sampling=spec, **kw)

    assert {w.worker_id: w.loras for w in await registry.alive()}["holder"] == ("fr", "de")
    plain = await scheduler._decide(req(model=MODEL))
    assert plain is not None and plain.worker_id == "idle"  # least loaded of its model
    adapted = await scheduler._decide(req(model=MODEL, lora_name="de"))
    assert adapted is not None and adapted.worker_id == "holder"
    unheld = await scheduler._decide(req(model=MODEL, lora_name="it"))
    assert unheld is not None and unheld.worker_id == "idle"  # nobody holds it: load decides
    assert await scheduler._decide(req(model="missing")) is None


class CountingStore(InMemoryStore):
    """Records the scheduler's reads: a `get` of its own, or `get_and_smembers` (one round trip)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []
        self._inside = False

    async def get(self, key: str) -> bytes | None:
        if not self._inside:
            self.reads.append("get")
        return await super().get(key)

    async def get_and_smembers(self, key: str, set_keys: list[str]) -> tuple[bytes | None, list[set[str]]]:
        self.reads.append("get_and_smembers")
        self._inside = True
        try:
            return await super().get_and_smembers(key, set_keys)
        finally:
            self._inside = False


async def test_a_request_sent_twice_is_routed_once_and_each_routing_reads_the_store_once() -> None:
    """The dedup read of a routed attempt travels with the prompt's cached-block lookup (one round
    trip, no `get` of its own); a second copy of the same attempt (a redelivery, a resent message)
    is dropped, and the next attempt of the request is routed."""
    bus, store, queues = InMemoryBus(), CountingStore(), Queues("t")
    registry = WorkerRegistry(store, heartbeat_s=10.0)
    await registry.beat(heartbeat("a"))
    await bus.declare_work_queue(queues.worker("a"))
    got: list[tuple[str, int]] = []

    async def take(message: object) -> None:
        msg = decode(message.body)  # type: ignore[attr-defined]
        assert isinstance(msg, WorkerRequest)
        got.append((msg.request_id, msg.attempt))

    await bus.consume(queues.worker("a"), take)
    await bus.declare_reply_queue("replies")
    scheduler = SchedulerService(bus, store, router="prefix", heartbeat_s=10.0, queues=queues)
    await scheduler.start()
    spec = SamplingSpec.of(SamplingParams())
    for sent, attempt in enumerate((0, 0, 1), start=1):
        req = ScheduleRequest(
            request_id="r", reply_to="replies", prompt_token_ids=[7] * 40, sampling=spec, attempt=attempt
        )
        await bus.publish(queues.schedule, encode(req))
        for _ in range(200):  # each one routed (or dropped) before the next is sent
            if len(store.reads) == sent and await InMemoryStore.get(store, f"routed:r:{attempt}") is not None:
                break
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    await scheduler.stop()
    await bus.close()
    assert got == [("r", 0), ("r", 1)]
    assert store.reads == ["get_and_smembers"] * 3

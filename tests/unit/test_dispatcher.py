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
from tests.fakes import heartbeat


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

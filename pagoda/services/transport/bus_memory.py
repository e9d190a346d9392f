"""The in-memory bus: the same contract as RabbitMQ's (see `services.bus.Bus`), for services that
share one process and event loop."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections import deque

from pagoda.services.transport.bus import (
    Bus,
    Delivery,
    Handler,
    QueueLockedError,
    QueueNotFoundError,
    Subscription,
    _handle,
)

logger = logging.getLogger(__name__)


class InMemoryBroker:
    """Queues shared by the `InMemoryBus` connections of one process (one event loop)."""

    def __init__(self) -> None:
        self.queues: dict[str, _MemoryQueue] = {}


class _MemoryQueue:
    def __init__(self, name: str, owner: InMemoryBus | None) -> None:
        self.name = name
        self.owner = owner  # the exclusive owner of a reply queue; None for a work queue
        self.ready: deque[Delivery] = deque()
        self.consumers: list[_MemoryConsumer] = []
        self.next_consumer = 0

    def dispatch(self) -> None:
        """Deal ready messages round-robin to consumers with prefetch room, as RabbitMQ does."""
        while self.ready and self.consumers:
            n = len(self.consumers)
            for i in range(n):
                consumer = self.consumers[(self.next_consumer + i) % n]
                if len(consumer.inbox) < consumer.prefetch:
                    self.next_consumer = (self.next_consumer + i + 1) % n
                    consumer.inbox.append(self.ready.popleft())
                    consumer.wakeup.set()
                    break
            else:
                return


class _MemoryConsumer(Subscription):
    def __init__(
        self, bus: InMemoryBus, queue: _MemoryQueue, handler: Handler, prefetch: int, concurrency: int = 1
    ) -> None:
        self.bus, self.queue, self.handler, self.prefetch = bus, queue, handler, prefetch
        self.inbox: deque[Delivery] = deque()  # delivered, not yet acked; inbox[0] is being handled
        self.wakeup = asyncio.Event()
        self.concurrency = concurrency
        self._handling: dict[int, asyncio.Task[None]] = {}  # id(message) -> its handler (concurrent mode)
        self.task = asyncio.get_running_loop().create_task(self._run(), name=f"consume:{queue.name}")

    async def _run(self) -> None:
        if self.concurrency > 1:
            await self._run_concurrent()
        while True:
            if not self.inbox:
                self.wakeup.clear()
                await self.wakeup.wait()
                continue
            await _handle(self.queue.name, self.handler, self.inbox[0])
            self.inbox.popleft()  # ack
            self.queue.dispatch()

    async def _run_concurrent(self) -> None:
        slots = asyncio.Semaphore(self.concurrency)
        while True:
            message = next((m for m in self.inbox if id(m) not in self._handling), None)
            if message is None:
                self.wakeup.clear()
                await self.wakeup.wait()
                continue
            await slots.acquire()
            self._handling[id(message)] = asyncio.create_task(self._one(message, slots))

    async def _one(self, message: Delivery, slots: asyncio.Semaphore) -> None:
        try:
            await _handle(self.queue.name, self.handler, message)
        except asyncio.CancelledError:  # cancelled: the message stays unacked, for redelivery
            raise
        else:
            for i, m in enumerate(self.inbox):  # ack this one, wherever it is
                if m is message:
                    del self.inbox[i]
                    break
            self.queue.dispatch()
        finally:
            del self._handling[id(message)]
            slots.release()

    async def cancel(self) -> None:
        if self not in self.queue.consumers:
            return
        assert asyncio.current_task() is not self.task, "cancel a subscription outside its own handler"
        self.queue.consumers.remove(self)
        self.bus._subscriptions.discard(self)
        self.task.cancel()
        handling = list(self._handling.values())
        for task in handling:
            task.cancel()
        await asyncio.gather(self.task, *handling, return_exceptions=True)
        self.queue.ready.extendleft(dataclasses.replace(m, redelivered=True) for m in reversed(self.inbox))
        self.inbox.clear()
        if self.queue.owner is not None and not self.queue.consumers:  # auto-delete
            self.bus._broker.queues.pop(self.queue.name, None)
        self.queue.dispatch()


class InMemoryBus(Bus):
    """One connection to an `InMemoryBroker`; services in one process share a bus or its broker."""

    def __init__(self, broker: InMemoryBroker | None = None) -> None:
        self._broker = broker or InMemoryBroker()
        self._subscriptions: set[_MemoryConsumer] = set()

    @property
    def broker(self) -> InMemoryBroker:
        return self._broker

    async def connect(self) -> None:
        pass

    async def close(self) -> None:
        for sub in list(self._subscriptions):
            await sub.cancel()
        for name, queue in list(self._broker.queues.items()):
            if queue.owner is self:
                del self._broker.queues[name]

    def _queue(self, name: str) -> _MemoryQueue:
        queue = self._broker.queues.get(name)
        if queue is None:
            raise QueueNotFoundError(f"no queue named {name!r}: declare it before using it")
        return queue

    async def declare_work_queue(self, name: str) -> None:
        queue = self._broker.queues.setdefault(name, _MemoryQueue(name, owner=None))
        if queue.owner is not None:
            raise QueueLockedError(f"{name!r} is an exclusive reply queue, not a work queue")

    async def declare_reply_queue(self, name: str) -> str:
        name = name or f"amq.gen-{uuid.uuid4().hex}"
        queue = self._broker.queues.setdefault(name, _MemoryQueue(name, owner=self))
        if queue.owner is not self:
            raise QueueLockedError(f"{name!r} is already declared by another connection")
        return name

    async def publish(self, queue: str, body: bytes, headers: dict[str, str] | None = None) -> None:
        target = self._queue(queue)
        target.ready.append(Delivery(bytes(body), dict(headers or {})))
        target.dispatch()
        await asyncio.sleep(0)  # yield as a network round trip would, so a tight publish loop is fair

    async def consume(
        self, queue: str, handler: Handler, prefetch: int = 64, concurrency: int = 1
    ) -> Subscription:
        assert prefetch >= 1, f"prefetch must be >= 1, got {prefetch}"
        assert concurrency >= 1, f"concurrency must be >= 1, got {concurrency}"
        target = self._queue(queue)
        if target.owner not in (None, self):
            raise QueueLockedError(f"{queue!r} is another connection's exclusive reply queue")
        consumer = _MemoryConsumer(self, target, handler, prefetch, concurrency)
        target.consumers.append(consumer)
        self._subscriptions.add(consumer)
        target.dispatch()
        return consumer

    async def queue_depth(self, name: str) -> int:
        return len(self._queue(name).ready)

    async def delete_work_queue(self, name: str) -> bool:
        queue = self._broker.queues.get(name)
        if queue is None:
            return True
        if queue.owner is not None:
            raise QueueLockedError(f"{name!r} is an exclusive reply queue, not a work queue")
        if queue.ready or any(c.inbox for c in queue.consumers):
            return False
        for consumer in list(queue.consumers):  # RabbitMQ cancels them too
            await consumer.cancel()
        del self._broker.queues[name]
        return True

"""The message bus: named queues of opaque bytes, over RabbitMQ (aio-pika) or in memory.

The bus moves bytes and knows nothing of LLMs; services encode their own messages. `make_bus(url)`
picks the implementation: `memory://` (or None) for one process, `amqp://user:pass@host:5672/` for
RabbitMQ.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Self

logger = logging.getLogger(__name__)


class BusError(Exception):
    """A bus operation the broker refused."""


class QueueNotFoundError(BusError, LookupError):
    """The queue was never declared (or was deleted with its exclusive owner)."""


class QueueLockedError(BusError):
    """The queue is another connection's exclusive reply queue."""


@dataclasses.dataclass(frozen=True, slots=True)
class Message:
    body: bytes
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    redelivered: bool = False


Handler = Callable[[Message], Awaitable[None]]


class Subscription(ABC):
    @abstractmethod
    async def cancel(self) -> None:
        """Stop deliveries; messages delivered but not yet handled go back to the queue. Idempotent.

        Do not await it from inside the subscription's own handler.
        """


class Bus(ABC):
    """A connection to a broker of named queues; each instance owns its consumers and reply queues.

    Invariants, the same for every implementation:
    - Work queues (`declare_work_queue`) are durable and shared: competing consumers, on any
      connection, each get distinct messages, dealt round-robin among those with prefetch room.
    - A reply queue (`declare_reply_queue`) is exclusive to the bus that declared it (only it may
      consume; anyone may publish to it) and is deleted when that bus closes.
    - `publish` returns once the broker has the message (publisher confirms; persistent delivery)
      and raises `QueueNotFoundError` when no queue has that name.
    - One subscription hands its messages to its handler one at a time, in delivery order; run more
      subscriptions for concurrency. A message is acked after the handler returns. A handler that
      raises gets one log line and its message is acked anyway (dropped): a malformed message never
      stops a consumer. A message in flight when its subscription is cancelled or its connection
      drops is redelivered with `redelivered=True`.
    - `close` cancels every subscription this bus made; it is idempotent.
    """

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @abstractmethod
    async def connect(self) -> None: ...

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def declare_work_queue(self, name: str) -> None: ...

    @abstractmethod
    async def declare_reply_queue(self, name: str) -> str:
        """Declare this bus's exclusive, auto-delete queue; returns its name (generated if "")."""

    @abstractmethod
    async def publish(self, queue: str, body: bytes, headers: dict[str, str] | None = None) -> None: ...

    @abstractmethod
    async def consume(self, queue: str, handler: Handler, prefetch: int = 64) -> Subscription: ...

    @abstractmethod
    async def queue_depth(self, name: str) -> int:
        """Messages ready in the queue, not counting those delivered to consumers and not yet acked."""


async def _handle(queue: str, handler: Handler, message: Message) -> None:
    try:
        await handler(message)
    except Exception as exc:
        logger.error(
            "queue %s: handler failed, message of %d bytes dropped: %r", queue, len(message.body), exc
        )


# --- in memory -----------------------------------------------------------------------------------


class InMemoryBroker:
    """Queues shared by the `InMemoryBus` connections of one process (one event loop)."""

    def __init__(self) -> None:
        self.queues: dict[str, _MemoryQueue] = {}


class _MemoryQueue:
    def __init__(self, name: str, owner: InMemoryBus | None) -> None:
        self.name = name
        self.owner = owner  # the exclusive owner of a reply queue; None for a work queue
        self.ready: deque[Message] = deque()
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
    def __init__(self, bus: InMemoryBus, queue: _MemoryQueue, handler: Handler, prefetch: int) -> None:
        self.bus, self.queue, self.handler, self.prefetch = bus, queue, handler, prefetch
        self.inbox: deque[Message] = deque()  # delivered, not yet acked; inbox[0] is being handled
        self.wakeup = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self._run(), name=f"consume:{queue.name}")

    async def _run(self) -> None:
        while True:
            if not self.inbox:
                self.wakeup.clear()
                await self.wakeup.wait()
                continue
            await _handle(self.queue.name, self.handler, self.inbox[0])
            self.inbox.popleft()  # ack
            self.queue.dispatch()

    async def cancel(self) -> None:
        if self not in self.queue.consumers:
            return
        assert asyncio.current_task() is not self.task, "cancel a subscription outside its own handler"
        self.queue.consumers.remove(self)
        self.bus._subscriptions.discard(self)
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
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
        target.ready.append(Message(bytes(body), dict(headers or {})))
        target.dispatch()
        await asyncio.sleep(0)  # yield as a network round trip would, so a tight publish loop is fair

    async def consume(self, queue: str, handler: Handler, prefetch: int = 64) -> Subscription:
        assert prefetch >= 1, f"prefetch must be >= 1, got {prefetch}"
        target = self._queue(queue)
        if target.owner not in (None, self):
            raise QueueLockedError(f"{queue!r} is another connection's exclusive reply queue")
        consumer = _MemoryConsumer(self, target, handler, prefetch)
        target.consumers.append(consumer)
        self._subscriptions.add(consumer)
        target.dispatch()
        return consumer

    async def queue_depth(self, name: str) -> int:
        return len(self._queue(name).ready)


# --- RabbitMQ ------------------------------------------------------------------------------------


def _redact(url: str) -> str:
    from yarl import URL

    return str(URL(url).with_password("***")) if URL(url).password else url


async def _close_quietly(channel: Any) -> None:
    """Close a channel even when the broker already closed it, so the robust connection does not
    reopen it behind our back."""
    try:
        await channel.close()
    except Exception as exc:
        logger.debug("closing channel %r: %r", channel, exc)


class _AmqpSubscription(Subscription):
    def __init__(self, bus: AmqpBus, channel: Any, queue: Any, handler: Handler) -> None:
        self.bus, self.channel, self.queue, self.handler = bus, channel, queue, handler
        self.inbox: asyncio.Queue[Any] = asyncio.Queue()
        self.tag: str | None = None
        self.task = asyncio.get_running_loop().create_task(self._run(), name=f"consume:{queue.name}")

    async def _run(self) -> None:
        # aio-pika calls its callback in a new task per delivery; the inbox restores one-at-a-time order.
        while True:
            incoming = await self.inbox.get()
            headers = {k: v.decode() if isinstance(v, bytes) else str(v) for k, v in incoming.headers.items()}
            message = Message(incoming.body, headers, bool(incoming.redelivered))
            await _handle(self.queue.name, self.handler, message)
            try:
                await incoming.ack()
            except Exception as exc:  # the channel dropped: the broker redelivers it
                logger.warning(
                    "queue %s: ack failed (%r); the message will be redelivered", self.queue.name, exc
                )

    async def cancel(self) -> None:
        if self not in self.bus._subscriptions:
            return
        assert asyncio.current_task() is not self.task, "cancel a subscription outside its own handler"
        self.bus._subscriptions.discard(self)
        if self.tag is not None:
            try:
                await self.queue.cancel(self.tag)
            except Exception as exc:  # the channel is gone; so are its deliveries
                logger.debug("queue %s: basic.cancel failed: %r", self.queue.name, exc)
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await _close_quietly(self.channel)  # unacked deliveries go back to the queue


class AmqpBus(Bus):
    """RabbitMQ through aio-pika's robust connection, which reconnects (every `reconnect_interval`
    seconds, settable in the URL query) and restores channels, QoS, queues and consumers.

    Publishing uses one channel with publisher confirms and `mandatory`, so an unroutable message
    comes back as `QueueNotFoundError` within the same round trip. Each subscription gets its own
    channel (its own prefetch). Declarations and `queue_depth` use short-lived channels, so a refused
    declaration never closes the publishing channel.
    """

    def __init__(self, url: str) -> None:
        self._url = url
        self._connection: Any = None
        self._publisher: Any = None
        self._declared: dict[str, dict[str, bool]] = {}  # queue -> declare arguments, for consumers
        self._subscriptions: set[_AmqpSubscription] = set()

    async def connect(self) -> None:
        import aio_pika

        if self._connection is not None:
            return
        try:
            self._connection = await aio_pika.connect_robust(self._url)
        except (OSError, aio_pika.exceptions.AMQPConnectionError) as exc:
            raise ConnectionError(
                f"cannot reach RabbitMQ at {_redact(self._url)}: {exc!r}; check the URL or start the "
                "server (`rabbitmq-server -detached`)"
            ) from exc
        self._publisher = await self._connection.channel(publisher_confirms=True, on_return_raises=True)

    async def close(self) -> None:
        for sub in list(self._subscriptions):
            await sub.cancel()
        connection, self._connection, self._publisher = self._connection, None, None
        if connection is not None:
            await connection.close()

    def _conn(self) -> Any:
        assert self._connection is not None, "AmqpBus used before connect()"
        return self._connection

    async def _declare(self, name: str, **arguments: bool) -> str:
        from aiormq.exceptions import ChannelLockedResource, ChannelNotFoundEntity, ChannelPreconditionFailed

        channel = await self._conn().channel()
        try:
            queue = await channel.declare_queue(name, **arguments)
        except ChannelLockedResource as exc:
            raise QueueLockedError(f"{name!r} is another connection's exclusive queue") from exc
        except ChannelNotFoundEntity as exc:
            raise QueueNotFoundError(f"no queue named {name!r}: declare it before using it") from exc
        except ChannelPreconditionFailed as exc:
            raise BusError(f"queue {name!r} exists with other properties than {arguments}: {exc}") from exc
        finally:
            await _close_quietly(channel)
        return str(queue.name)

    async def declare_work_queue(self, name: str) -> None:
        self._declared[name] = {"durable": True}
        await self._declare(name, durable=True)

    async def declare_reply_queue(self, name: str) -> str:
        name = await self._declare(name, exclusive=True, auto_delete=True)
        self._declared[name] = {"exclusive": True, "auto_delete": True}
        return name

    async def publish(self, queue: str, body: bytes, headers: dict[str, str] | None = None) -> None:
        import aio_pika

        assert self._publisher is not None, "AmqpBus used before connect()"
        message = aio_pika.Message(bytes(body), headers=dict(headers or {}), delivery_mode=2)  # persistent
        try:
            await self._publisher.default_exchange.publish(message, routing_key=queue, mandatory=True)
        except aio_pika.exceptions.PublishError as exc:
            raise QueueNotFoundError(f"no queue named {queue!r}: declare it before publishing") from exc
        except aio_pika.exceptions.DeliveryError as exc:
            raise BusError(f"RabbitMQ refused a message for {queue!r}: {exc!r}") from exc

    async def consume(self, queue: str, handler: Handler, prefetch: int = 64) -> Subscription:
        from aiormq.exceptions import ChannelLockedResource, ChannelNotFoundEntity

        assert prefetch >= 1, f"prefetch must be >= 1, got {prefetch}"
        channel = await self._conn().channel()
        await channel.set_qos(prefetch_count=prefetch)
        # Redeclaring with this bus's own arguments (not passively) lets the robust connection
        # recreate an exclusive reply queue after a reconnect.
        arguments = self._declared.get(queue, {"passive": True})
        try:
            amqp_queue = await channel.declare_queue(queue, **arguments)
        except BaseException as exc:
            await _close_quietly(channel)
            if isinstance(exc, ChannelNotFoundEntity):
                raise QueueNotFoundError(f"no queue named {queue!r}: declare it before consuming") from exc
            if isinstance(exc, ChannelLockedResource):
                raise QueueLockedError(f"{queue!r} is another connection's exclusive reply queue") from exc
            raise
        sub = _AmqpSubscription(self, channel, amqp_queue, handler)
        self._subscriptions.add(sub)
        sub.tag = await amqp_queue.consume(sub.inbox.put)
        return sub

    async def queue_depth(self, name: str) -> int:
        from aiormq.exceptions import ChannelLockedResource, ChannelNotFoundEntity

        channel = await self._conn().channel()
        try:
            queue = await channel.declare_queue(name, passive=True)
        except ChannelNotFoundEntity as exc:
            raise QueueNotFoundError(f"no queue named {name!r}") from exc
        except ChannelLockedResource as exc:
            raise QueueLockedError(f"{name!r} is another connection's exclusive reply queue") from exc
        finally:
            await _close_quietly(channel)
        return int(queue.declaration_result.message_count or 0)


_BUSES: dict[str, Callable[[str], Bus]] = {
    "memory": lambda url: InMemoryBus(),
    "amqp": AmqpBus,
    "amqps": AmqpBus,
}


def make_bus(url: str | None) -> Bus:
    """`memory://` or None -> InMemoryBus (a fresh broker); `amqp://` / `amqps://` -> AmqpBus."""
    url = url or "memory://"
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme not in _BUSES:
        raise ValueError(f"unknown bus URL {url!r}: use memory:// or amqp://user:password@host:5672/")
    return _BUSES[scheme](url)

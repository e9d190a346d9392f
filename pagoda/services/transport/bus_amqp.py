"""The RabbitMQ bus (aio-pika): durable work queues, exclusive reply queues, transient messages,
publisher confirms."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from pagoda.services.transport.bus import (
    Bus,
    BusError,
    Delivery,
    Handler,
    QueueLockedError,
    QueueNotFoundError,
    Subscription,
    _handle,
)

logger = logging.getLogger(__name__)

ACK_BATCH = 64  # most messages handled (in order) before one ack(multiple=True) covers them


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
    def __init__(self, bus: AmqpBus, channel: Any, queue: Any, handler: Handler, concurrency: int) -> None:
        self.bus, self.channel, self.queue, self.handler = bus, channel, queue, handler
        self.inbox: asyncio.Queue[Any] = asyncio.Queue()
        self.tag: str | None = None
        self._slots = asyncio.Semaphore(concurrency)
        self._concurrent = concurrency > 1
        self._handling: set[asyncio.Task[None]] = set()
        self._unacked: Any = None  # the last message handled but not yet acked (one-at-a-time mode)
        self._batched = 0  # messages handled since the last ack
        self.task = asyncio.get_running_loop().create_task(self._run(), name=f"consume:{queue.name}")

    async def _run(self) -> None:
        # aio-pika calls its callback in a new task per delivery; the inbox restores delivery order.
        while True:
            incoming = await self.inbox.get()
            if not self._concurrent:
                await self._handle(incoming)
                # Handled in delivery order, so one ack(multiple) covers a burst: a frame (a write
                # syscall) per burst rather than per message. Acked when the inbox runs dry, every
                # ACK_BATCH messages, and on cancel.
                self._unacked, self._batched = incoming, self._batched + 1
                if self.inbox.empty() or self._batched >= ACK_BATCH:
                    await self._ack_handled()
                continue
            await self._slots.acquire()  # up to `concurrency` handlers at once, each acks its own
            task = asyncio.create_task(self._one(incoming))
            self._handling.add(task)
            task.add_done_callback(self._handled)

    def _handled(self, task: asyncio.Task[None]) -> None:
        self._handling.discard(task)
        self._slots.release()

    async def _handle(self, incoming: Any) -> None:
        headers = {k: v.decode() if isinstance(v, bytes) else str(v) for k, v in incoming.headers.items()}
        message = Delivery(incoming.body, headers, bool(incoming.redelivered))
        await _handle(self.queue.name, self.handler, message)

    async def _one(self, incoming: Any) -> None:
        await self._handle(incoming)
        await self._ack(incoming, multiple=False)

    async def _ack_handled(self) -> None:
        incoming, self._unacked = self._unacked, None
        if incoming is not None:
            await self._ack(incoming, multiple=self._batched > 1)
        self._batched = 0

    async def _ack(self, incoming: Any, *, multiple: bool) -> None:
        try:
            await incoming.ack(multiple=multiple)
        except Exception as exc:  # the channel dropped: the broker redelivers it
            logger.warning("queue %s: ack failed (%r); the broker redelivers it", self.queue.name, exc)

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
        for task in list(self._handling):
            task.cancel()
        await asyncio.gather(self.task, *self._handling, return_exceptions=True)
        await self._ack_handled()  # handled ones must not come back
        await _close_quietly(self.channel)  # unacked deliveries go back to the queue


class AmqpBus(Bus):
    """RabbitMQ through aio-pika's robust connection, which reconnects (every `reconnect_interval`
    seconds, settable in the URL query) and restores channels, QoS, queues and consumers.

    Publishing uses one channel with publisher confirms and `mandatory`, so an unroutable message
    comes back as `QueueNotFoundError` within the same round trip. Each subscription gets its own
    channel (its own prefetch). Declarations and `queue_depth` use short-lived channels, so a refused
    declaration never closes the publishing channel.

    Messages are transient (delivery mode 1): the broker keeps them in memory only. A persistent
    message would outlive a broker restart, but nobody could use it: the restart closes every
    gateway's connection, and a gateway ends the requests it had open then with a 503 (its reply
    queue went with the connection), so a request message kept over the restart would only run a
    request nobody waits for. Persistence cost the broker about half its CPU per request (the
    message store's writes) and slowed each confirm (docs/perf-history.md).
    """

    def __init__(self, url: str, publish_retry_s: float = 10.0) -> None:
        self._url = url
        self.publish_retry_s = publish_retry_s
        self._connection: Any = None
        self._publisher: Any = None
        self._declared: dict[str, dict[str, bool]] = {}  # queue -> declare arguments, for consumers
        self._subscriptions: set[_AmqpSubscription] = set()
        self._lost_callbacks: list[Callable[[str], None]] = []
        self._closing = False
        self._up = False  # connected now (callbacks fire once per outage, not per failed retry)

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
        self._up = True
        self._connection.close_callbacks.add(self._on_close)
        self._connection.reconnect_callbacks.add(self._on_reconnect)

    def on_connection_lost(self, callback: Callable[[str], None]) -> None:
        self._lost_callbacks.append(callback)

    def _on_close(self, _sender: Any, exc: BaseException | None = None) -> None:
        if self._closing or not self._up:
            return
        self._up = False
        reason = f"{type(exc).__name__}: {exc}" if exc is not None else "closed by the broker"
        logger.warning("RabbitMQ connection lost (%s); reconnecting", reason)
        for callback in self._lost_callbacks:
            try:
                callback(reason)
            except Exception:
                logger.exception("connection-lost callback failed")

    def _on_reconnect(self, _sender: Any) -> None:
        self._up = True
        logger.info("RabbitMQ connection restored")

    async def close(self) -> None:
        self._closing = True
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
        from pamqp.commands import Basic

        assert self._publisher is not None, "AmqpBus used before connect()"
        properties = Basic.Properties(delivery_mode=1, headers=dict(headers) if headers else {})
        body = bytes(body)
        # While the connection is down (the broker restarts), retry with backoff until it is back or
        # `publish_retry_s` has passed. A retried message may arrive twice; consumers dedup.
        deadline = asyncio.get_running_loop().time() + self.publish_retry_s
        delay = 0.05
        while True:
            try:
                await self._publish_once(queue, body, properties)
                return
            except (
                aio_pika.exceptions.ChannelInvalidStateError,
                aio_pika.exceptions.AMQPConnectionError,
            ) as exc:
                if self._closing or asyncio.get_running_loop().time() + delay > deadline:
                    raise BusError(
                        f"RabbitMQ unreachable for {self.publish_retry_s:.0f}s; a message for {queue!r} was "
                        f"not sent ({exc!r})"
                    ) from exc
                await asyncio.sleep(delay)
                delay = min(2 * delay, 1.0)
            except aio_pika.exceptions.PublishError as exc:
                raise QueueNotFoundError(f"no queue named {queue!r}: declare it before publishing") from exc
            except aio_pika.exceptions.DeliveryError as exc:
                raise BusError(f"RabbitMQ refused a message for {queue!r}: {exc!r}") from exc

    async def _publish_once(self, queue: str, body: bytes, properties: Any) -> None:
        """One confirmed, mandatory publish straight on the robust channel's current aiormq channel:
        aio-pika's Message and Exchange.publish add ~50 us of client CPU a message and nothing we use.
        Not waiting for the frame's write (wait=False) spares a task wake-up; the broker's confirm
        (or the channel's close) still settles it."""
        if self._publisher.is_closed:
            from aiormq.exceptions import ChannelInvalidStateError

            raise ChannelInvalidStateError("the publishing channel is closed")
        channel = await self._publisher.get_underlay_channel()
        await channel.basic_publish(
            body, exchange="", routing_key=queue, properties=properties, mandatory=True, wait=False
        )

    async def consume(
        self, queue: str, handler: Handler, prefetch: int = 64, concurrency: int = 1
    ) -> Subscription:
        from aiormq.exceptions import ChannelLockedResource, ChannelNotFoundEntity

        assert prefetch >= 1, f"prefetch must be >= 1, got {prefetch}"
        assert concurrency >= 1, f"concurrency must be >= 1, got {concurrency}"
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
        sub = _AmqpSubscription(self, channel, amqp_queue, handler, concurrency)
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

    async def delete_work_queue(self, name: str) -> bool:
        from aiormq.exceptions import ChannelPreconditionFailed

        channel = await self._conn().channel()
        try:
            await channel.queue_delete(name, if_empty=True)
        except ChannelPreconditionFailed:  # messages are ready in it
            return False
        finally:
            await _close_quietly(channel)
        self._declared.pop(name, None)
        return True

"""The message bus: named queues of opaque bytes, over RabbitMQ (aio-pika) or in memory.

The bus moves bytes and knows nothing of LLMs; services encode their own messages. `make_bus(url)`
picks the implementation: `memory://` (or None) for one process, `amqp://user:pass@host:5672/` for
RabbitMQ.
"""

from __future__ import annotations

import dataclasses
import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Self

from pagoda.services.ops import failpoints

logger = logging.getLogger(__name__)


class BusError(Exception):
    """A bus operation the broker refused."""


class QueueNotFoundError(BusError, LookupError):
    """The queue was never declared (or was deleted with its exclusive owner)."""


class QueueLockedError(BusError):
    """The queue is another connection's exclusive reply queue."""


@dataclasses.dataclass(frozen=True, slots=True)
class Delivery:
    body: bytes
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    redelivered: bool = False


Handler = Callable[[Delivery], Awaitable[None]]


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
    - `publish` returns once the broker has the message (publisher confirms) and raises
      `QueueNotFoundError` when no queue has that name. Messages live as long as the broker runs:
      a broker restart drops those queued (every gateway's open requests end with a 503 then).
    - One subscription hands its messages to its handler one at a time, in delivery order, unless
      `consume(..., concurrency=n)` lets up to n handlers run at once (started in delivery order,
      finishing in any; for handlers that wait on round trips and need no order). Either way a
      message is acked after its handler returns. A handler that
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
    async def consume(
        self, queue: str, handler: Handler, prefetch: int = 64, concurrency: int = 1
    ) -> Subscription: ...

    def on_connection_lost(self, callback: Callable[[str], None]) -> None:  # noqa: B027 (optional hook)
        """Call `callback(reason)` on the event loop each time the connection to the broker drops
        (the bus reconnects by itself; messages sent to this bus's reply queues meanwhile are lost).
        An in-memory bus never loses its connection."""

    @abstractmethod
    async def queue_depth(self, name: str) -> int:
        """Messages ready in the queue, not counting those delivered to consumers and not yet acked."""

    @abstractmethod
    async def delete_work_queue(self, name: str) -> bool:
        """Delete a work queue that holds no message (a drained worker's, after it cancelled its
        subscription, which puts unacked messages back); returns False, keeping it, when some are
        in it. A missing queue counts as deleted. Publishing to a deleted queue raises
        `QueueNotFoundError`."""


async def _handle(queue: str, handler: Handler, message: Delivery) -> None:
    if message.redelivered:  # after a consumer died, a connection dropped or the broker restarted
        logger.info("queue %s: handling a redelivered message of %d bytes", queue, len(message.body))
    try:
        await failpoints.hold_delivery(queue)
        await handler(message)
    except Exception as exc:
        logger.error(
            "queue %s: handler failed, message of %d bytes dropped: %r", queue, len(message.body), exc
        )


def make_bus(url: str | None) -> Bus:
    """`memory://` or None -> InMemoryBus (a fresh broker); `amqp://` / `amqps://` -> AmqpBus.
    Raises ValueError for an unknown scheme or a malformed PAGODA_FAILPOINTS."""
    failpoints.active()  # a malformed PAGODA_FAILPOINTS fails here, at start, not on each message
    url = url or "memory://"
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme == "memory":
        from pagoda.services.transport.bus_memory import InMemoryBus

        return InMemoryBus()
    if scheme in ("amqp", "amqps"):
        from pagoda.services.transport.bus_amqp import AmqpBus

        return AmqpBus(url)
    raise ValueError(f"unknown bus URL {url!r}: use memory:// or amqp://user:password@host:5672/")

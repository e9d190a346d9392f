"""The bus contract (tests/unit/test_inmemory_transport.py) on the real RabbitMQ, plus AMQP specifics.

Queues are named `pagoda-test.<run id>.*` and deleted at the end of each test.
"""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator

import aio_pika
import pytest
from aiormq.exceptions import ChannelPreconditionFailed

from pagoda.services.transport.bus import Bus, Delivery, make_bus
from pagoda.services.transport.bus_amqp import AmqpBus
from pagoda.services.transport.bus_memory import InMemoryBus
from tests.faults.infra import TcpProxy
from tests.processes import free_port
from tests.unit.test_inmemory_transport import (  # noqa: F401  (collected here again, on RabbitMQ)
    NewBus,
    QName,
    test_bus_cancel_redelivers_unhandled_messages,
    test_bus_close_is_idempotent,
    test_bus_competing_consumers_share_without_loss_or_duplicates,
    test_bus_concurrent_cancel_redelivers_in_flight,
    test_bus_concurrent_handlers_overlap_up_to_the_limit,
    test_bus_delete_work_queue_only_when_empty,
    test_bus_handler_error_is_logged_and_dropped,
    test_bus_one_handler_call_at_a_time_in_order,
    test_bus_publish_to_missing_queue_raises,
    test_bus_queue_depth_counts_confirmed_messages,
    test_bus_reply_queue_is_exclusive,
    test_bus_reply_queue_name_generated,
    test_bus_round_trip,
    wait_until,
)

pytestmark = pytest.mark.integration

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


def require_rabbitmq() -> None:
    try:
        socket.create_connection(("127.0.0.1", 5672), timeout=1).close()
    except OSError as exc:
        pytest.fail(
            f"RabbitMQ is not reachable on 127.0.0.1:5672 ({exc}); start it: rabbitmq-server -detached"
        )


@pytest.fixture
async def qname() -> AsyncIterator[QName]:
    """Unique queue names for this test; the durable ones are deleted afterwards."""
    run, names = uuid.uuid4().hex[:8], set[str]()

    def name(suffix: str) -> str:
        names.add(f"pagoda-test.{run}.{suffix}")
        return f"pagoda-test.{run}.{suffix}"

    yield name
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        for queue in names:
            channel = await connection.channel()
            await channel.queue_delete(queue)  # a no-op for queues that are gone


@pytest.fixture(params=["amqp"])
async def new_bus(request: pytest.FixtureRequest, qname: QName) -> AsyncIterator[NewBus]:
    """Connects new buses to the same broker, as separate processes would; one param per broker."""
    require_rabbitmq()
    opened = list[Bus]()

    async def connect() -> Bus:
        bus = make_bus(AMQP_URL)
        assert isinstance(bus, AmqpBus)
        await bus.connect()
        opened.append(bus)
        return bus

    yield connect
    for bus in opened:
        await bus.close()


@pytest.fixture
async def bus(new_bus: NewBus) -> Bus:
    return await new_bus()


async def test_amqp_work_queue_is_durable_and_keeps_messages_until_a_consumer_comes(
    new_bus: NewBus, qname: QName
) -> None:
    """The queue is durable (its declaration outlives a broker restart) and its messages transient
    (a restart drops them: AmqpBus's docstring says why); a message published while no consumer
    runs, by a connection that is gone since, is delivered to the next consumer."""
    queue = qname("durable")
    publisher = await new_bus()
    await publisher.declare_work_queue(queue)
    await publisher.publish(queue, b"keep", {"k": "v"})
    await publisher.close()
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        with pytest.raises(ChannelPreconditionFailed, match="inequivalent arg 'durable'"):
            await channel.declare_queue(queue, durable=False)  # the broker has it as durable
        channel = await connection.channel()  # the refusal closed the other one
        declared = await channel.declare_queue(queue, passive=True)
        assert declared.declaration_result.message_count == 1
        incoming = await declared.get(timeout=5)
        assert incoming is not None and incoming.delivery_mode == aio_pika.DeliveryMode.NOT_PERSISTENT
        await incoming.nack(requeue=True)
    consumer, got = await new_bus(), list[Delivery]()

    async def handle(m: Delivery) -> None:
        got.append(m)

    await consumer.consume(queue, handle)
    await wait_until(lambda: len(got) == 1)
    assert got == [Delivery(b"keep", {"k": "v"}, redelivered=True)]  # it was handed out (and nacked) once


async def test_amqp_message_in_flight_when_the_connection_drops_is_redelivered(
    new_bus: NewBus, qname: QName
) -> None:
    """The connection of a consumer holding a message (handled, not acked) breaks, as when its
    process dies or the network fails: the broker gives the message to another consumer, flagged
    `redelivered`."""
    queue = qname("dropped")
    proxy = TcpProxy(free_port(), ("127.0.0.1", 5672))
    proxy.start()
    dropped = AmqpBus(f"amqp://guest:guest@127.0.0.1:{proxy.port}/?reconnect_interval=0.2")
    held, release = asyncio.Event(), asyncio.Event()
    try:
        await dropped.connect()
        await dropped.declare_work_queue(queue)

        async def hold(m: Delivery) -> None:
            held.set()
            await release.wait()

        await dropped.consume(queue, hold)
        other, got = await new_bus(), list[Delivery]()
        await other.publish(queue, b"in flight")
        await asyncio.wait_for(held.wait(), 10)

        async def handle(m: Delivery) -> None:
            got.append(m)

        await other.consume(queue, handle)
        assert got == [] and await other.queue_depth(queue) == 0  # unacked, so no one else has it
        proxy.cut()  # the holder's TCP connection is gone
        await wait_until(lambda: len(got) == 1, timeout_s=30)
        assert got == [Delivery(b"in flight", {}, redelivered=True)]
    finally:
        release.set()
        proxy.start()  # let the holder reconnect, so that it closes cleanly
        await asyncio.wait_for(dropped.close(), 30)
        proxy.close()


async def test_amqp_foreign_headers_are_read_as_strings(bus: Bus, qname: QName) -> None:
    queue, got = qname("headers"), list[Delivery]()
    await bus.declare_work_queue(queue)

    async def handle(m: Delivery) -> None:
        got.append(m)

    await bus.consume(queue, handle)
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        message = aio_pika.Message(b"x", headers={"n": 3, "s": "text"})
        await channel.default_exchange.publish(message, routing_key=queue)
    await wait_until(lambda: len(got) == 1)
    assert got[0].headers == {"n": "3", "s": "text"}


async def test_amqp_unreachable_broker_names_the_fix() -> None:
    bus = make_bus("amqp://guest:secret@127.0.0.1:1/")
    with pytest.raises(ConnectionError, match="rabbitmq-server") as info:
        await bus.connect()
    assert "secret" not in str(info.value)


async def _deliver_1000(bus: Bus, queue: str) -> float:
    got = [0]

    async def handle(m: Delivery) -> None:
        got[0] += 1

    async with bus:
        await bus.declare_work_queue(queue)
        await bus.consume(queue, handle)
        start = asyncio.get_running_loop().time()
        await asyncio.gather(*(bus.publish(queue, b"x" * 100) for _ in range(1000)))
        await wait_until(lambda: got[0] == 1000)
        return asyncio.get_running_loop().time() - start


async def test_inmemory_and_amqp_throughput(qname: QName) -> None:
    """1000 confirmed publishes and deliveries on each bus; a sanity bound, not a benchmark."""
    require_rabbitmq()
    for bus in (InMemoryBus(), AmqpBus(AMQP_URL)):
        elapsed = await _deliver_1000(bus, qname(f"speed.{type(bus).__name__}"))
        print(f"{type(bus).__name__}: 1000 messages in {elapsed * 1000:.0f} ms")
        assert elapsed < 5

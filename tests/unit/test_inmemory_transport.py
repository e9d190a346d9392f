"""The Bus contract, run here on the in-memory implementation (the Store's: test_inmemory_store.py).

The `test_bus_*` bodies are the contract: tests/integration/test_bus.py imports them and runs them
again on RabbitMQ through its own `new_bus` fixture.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from pagoda.services.transport.bus import Bus, Delivery, QueueLockedError, QueueNotFoundError, make_bus
from pagoda.services.transport.bus_memory import InMemoryBroker, InMemoryBus
from pagoda.services.transport.store import InMemoryStore, RedisStore, make_store
from tests.polling import until

NewBus = Callable[[], Awaitable[Bus]]
QName = Callable[[str], str]


async def wait_until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    await until(condition, timeout_s, "the bus", interval_s=0.002)


@pytest.fixture
def qname() -> QName:
    run = uuid.uuid4().hex[:8]
    return lambda name: f"pagoda-test.{run}.{name}"


@pytest.fixture
async def new_bus() -> AsyncIterator[NewBus]:
    """Connects new buses to one broker, as separate processes would; closes them all at the end."""
    broker, opened = InMemoryBroker(), list[Bus]()

    async def connect() -> Bus:
        bus = InMemoryBus(broker)
        await bus.connect()
        opened.append(bus)
        return bus

    yield connect
    for bus in opened:
        await bus.close()


@pytest.fixture
async def bus(new_bus: NewBus) -> Bus:
    return await new_bus()


# --- bus contract --------------------------------------------------------------------------------


async def test_bus_round_trip(bus: Bus, qname: QName) -> None:
    queue, got = qname("work"), list[Delivery]()
    await bus.declare_work_queue(queue)

    async def handle(m: Delivery) -> None:
        got.append(m)

    await bus.consume(queue, handle)
    await bus.publish(queue, b"\x00hello", {"type": "greeting", "v": "1"})
    await wait_until(lambda: len(got) == 1)
    assert got[0] == Delivery(b"\x00hello", {"type": "greeting", "v": "1"}, redelivered=False)


async def test_bus_publish_to_missing_queue_raises(bus: Bus, qname: QName) -> None:
    with pytest.raises(QueueNotFoundError):
        await bus.publish(qname("nobody"), b"x")
    with pytest.raises(QueueNotFoundError):
        await bus.consume(qname("nobody"), _ignore)
    with pytest.raises(QueueNotFoundError):
        await bus.queue_depth(qname("nobody"))


async def _ignore(m: Delivery) -> None:
    pass


async def test_bus_delete_work_queue_only_when_empty(bus: Bus, qname: QName) -> None:
    queue = qname("leaving")
    await bus.declare_work_queue(queue)
    await bus.publish(queue, b"late")
    assert await bus.delete_work_queue(queue) is False  # a message is in it: kept
    assert await bus.queue_depth(queue) == 1
    got: list[bytes] = []

    async def take(m: Delivery) -> None:
        got.append(m.body)

    sub = await bus.consume(queue, take)
    await wait_until(lambda: got == [b"late"])
    await sub.cancel()
    await wait_until_empty(bus, queue)
    assert await bus.delete_work_queue(queue) is True
    with pytest.raises(QueueNotFoundError):
        await bus.publish(queue, b"too late")
    assert await bus.delete_work_queue(queue) is True  # already gone


async def wait_until_empty(bus: Bus, queue: str, timeout_s: float = 5.0) -> None:
    """Until the queue's last message is acked (RabbitMQ acks asynchronously)."""
    for _ in range(int(timeout_s / 0.02)):
        if await bus.queue_depth(queue) == 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{queue} still holds messages")


async def test_bus_competing_consumers_share_without_loss_or_duplicates(
    new_bus: NewBus, qname: QName
) -> None:
    queue, n = qname("shared"), 1000
    producer, a, b = await new_bus(), await new_bus(), await new_bus()
    await producer.declare_work_queue(queue)
    got: dict[str, list[int]] = {"a": [], "b": []}
    for name, consumer in (("a", a), ("b", b)):

        async def handle(m: Delivery, name: str = name) -> None:
            got[name].append(int(m.body))
            await asyncio.sleep(0)

        await consumer.consume(queue, handle, prefetch=8)
    await asyncio.gather(*(producer.publish(queue, str(i).encode()) for i in range(n)))
    await wait_until(lambda: len(got["a"]) + len(got["b"]) >= n)
    await asyncio.sleep(0.05)  # anything extra (a duplicate) would arrive now
    assert sorted(got["a"] + got["b"]) == list(range(n))
    assert len(got["a"]) > n // 4 and len(got["b"]) > n // 4, {k: len(v) for k, v in got.items()}


async def test_bus_handler_error_is_logged_and_dropped(
    bus: Bus, qname: QName, caplog: pytest.LogCaptureFixture
) -> None:
    queue, got = qname("work"), list[bytes]()
    await bus.declare_work_queue(queue)

    async def handle(m: Delivery) -> None:
        if m.body == b"bad":
            raise ValueError("malformed")
        got.append(m.body)

    await bus.consume(queue, handle)
    with caplog.at_level(logging.ERROR, logger="pagoda.services.transport.bus"):
        for body in (b"1", b"bad", b"2"):
            await bus.publish(queue, body)
        await wait_until(lambda: got == [b"1", b"2"])
    failures = [r for r in caplog.records if "handler failed" in r.getMessage()]
    assert len(failures) == 1 and "malformed" in failures[0].getMessage(), caplog.text
    assert await bus.queue_depth(queue) == 0


async def test_bus_one_handler_call_at_a_time_in_order(bus: Bus, qname: QName) -> None:
    queue, got, active, most = qname("ordered"), list[int](), [0], [0]
    await bus.declare_work_queue(queue)

    async def handle(m: Delivery) -> None:
        active[0] += 1
        most[0] = max(most[0], active[0])
        await asyncio.sleep(0.001)
        got.append(int(m.body))
        active[0] -= 1

    await bus.consume(queue, handle, prefetch=16)
    for i in range(50):
        await bus.publish(queue, str(i).encode())
    await wait_until(lambda: len(got) == 50)
    assert got == list(range(50)) and most[0] == 1


async def test_bus_queue_depth_counts_confirmed_messages(bus: Bus, qname: QName) -> None:
    queue = qname("depth")
    await bus.declare_work_queue(queue)
    await bus.declare_work_queue(queue)  # idempotent
    for i in range(3):
        await bus.publish(queue, b"%d" % i)
    assert await bus.queue_depth(queue) == 3  # publish returned, so the broker holds them
    got = list[bytes]()

    async def handle(m: Delivery) -> None:
        got.append(m.body)

    await bus.consume(queue, handle)
    await wait_until(lambda: len(got) == 3)
    assert await bus.queue_depth(queue) == 0


async def test_bus_reply_queue_is_exclusive(new_bus: NewBus, qname: QName) -> None:
    gateway, worker = await new_bus(), await new_bus()
    reply = await gateway.declare_reply_queue(qname("reply.gw1"))
    assert reply == qname("reply.gw1")
    with pytest.raises(QueueLockedError):
        await worker.consume(reply, _ignore)
    with pytest.raises(QueueLockedError):
        await worker.declare_reply_queue(reply)
    assert await gateway.declare_reply_queue(reply) == reply  # its owner may redeclare

    got = list[bytes]()

    async def handle(m: Delivery) -> None:
        got.append(m.body)

    await gateway.consume(reply, handle)
    await worker.publish(reply, b"tokens")  # anyone may publish to it
    await wait_until(lambda: got == [b"tokens"])
    await gateway.close()
    with pytest.raises(QueueNotFoundError):  # deleted with its owner
        await worker.publish(reply, b"late")


async def test_bus_reply_queue_name_generated(bus: Bus) -> None:
    name = await bus.declare_reply_queue("")
    assert name
    await bus.publish(name, b"x")
    assert await bus.queue_depth(name) == 1


async def test_bus_cancel_redelivers_unhandled_messages(new_bus: NewBus, qname: QName) -> None:
    queue, first, second = qname("cancel"), await new_bus(), await new_bus()
    await first.declare_work_queue(queue)
    started, got = asyncio.Event(), list[Delivery]()

    async def stuck(m: Delivery) -> None:
        started.set()
        await asyncio.Event().wait()

    sub = await first.consume(queue, stuck, prefetch=4)
    for body in (b"a", b"b", b"c"):
        await first.publish(queue, body)
    await asyncio.wait_for(started.wait(), 5)
    await sub.cancel()
    await sub.cancel()  # idempotent

    async def handle(m: Delivery) -> None:
        got.append(m)

    await second.consume(queue, handle)
    await wait_until(lambda: len(got) == 3)
    assert sorted(m.body for m in got) == [b"a", b"b", b"c"]
    assert next(m for m in got if m.body == b"a").redelivered


async def test_bus_concurrent_handlers_overlap_up_to_the_limit(new_bus: NewBus, qname: QName) -> None:
    """`concurrency=n`: up to n handlers at once, never more; each message acked once its handler
    returns, so none comes back after the subscription ends."""
    queue, bus = qname("concurrent"), await new_bus()
    await bus.declare_work_queue(queue)
    running, peak, done = [0], [0], list[bytes]()
    release = asyncio.Event()

    async def slow(m: Delivery) -> None:
        running[0] += 1
        peak[0] = max(peak[0], running[0])
        await release.wait()
        running[0] -= 1
        done.append(m.body)

    sub = await bus.consume(queue, slow, prefetch=16, concurrency=4)
    for i in range(10):
        await bus.publish(queue, str(i).encode())
    await wait_until(lambda: running[0] == 4)
    await asyncio.sleep(0.05)
    assert running[0] == 4  # the fifth waits for a free slot
    release.set()
    await wait_until(lambda: len(done) == 10)
    assert peak[0] == 4 and sorted(done) == sorted(str(i).encode() for i in range(10))
    await sub.cancel()
    assert await bus.queue_depth(queue) == 0  # all acked: nothing went back


async def test_bus_concurrent_cancel_redelivers_in_flight(new_bus: NewBus, qname: QName) -> None:
    queue, first, second = qname("concurrent-cancel"), await new_bus(), await new_bus()
    await first.declare_work_queue(queue)
    started = list[bytes]()

    async def stuck(m: Delivery) -> None:
        started.append(m.body)
        if m.body != b"quick":
            await asyncio.Event().wait()

    sub = await first.consume(queue, stuck, prefetch=8, concurrency=3)
    for body in (b"quick", b"a", b"b", b"c"):
        await first.publish(queue, body)
    await wait_until(lambda: len(started) == 4)  # "quick" freed its slot for "c"
    await sub.cancel()
    got = list[Delivery]()

    async def handle(m: Delivery) -> None:
        got.append(m)

    await second.consume(queue, handle)
    await wait_until(lambda: len(got) == 3)
    await asyncio.sleep(0.05)
    assert sorted(m.body for m in got) == [b"a", b"b", b"c"]  # "quick" was acked
    assert all(m.redelivered for m in got)


async def test_bus_close_is_idempotent(new_bus: NewBus, qname: QName) -> None:
    bus = await new_bus()
    queue = qname("close")
    await bus.declare_work_queue(queue)
    sub = await bus.consume(queue, _ignore)
    await bus.close()
    await bus.close()
    await sub.cancel()  # already cancelled by close


# --- in-memory only ------------------------------------------------------------------------------


def test_factories_pick_the_implementation() -> None:
    assert isinstance(make_bus(None), InMemoryBus) and isinstance(make_bus("memory://"), InMemoryBus)
    assert isinstance(make_store(None), InMemoryStore)
    assert isinstance(make_store("redis://127.0.0.1:6379/0", prefix="x:"), RedisStore)
    assert make_store("memory://", prefix="x:").prefix == "x:"
    with pytest.raises(ValueError, match="amqp://"):
        make_bus("kafka://broker")
    with pytest.raises(ValueError, match="redis://"):
        make_store("postgres://db")


async def test_inmemory_bus_serves_services_in_one_loop(bus: Bus, qname: QName) -> None:
    """tokenizer -> worker -> gateway reply, wired by one bus, as `pagoda serve` does."""
    tokenize, worker, reply = qname("tokenize"), qname("worker.w1"), await bus.declare_reply_queue("")
    for queue in (tokenize, worker):
        await bus.declare_work_queue(queue)
    done = asyncio.Event()

    async def tokenizer(m: Delivery) -> None:
        await bus.publish(worker, m.body.upper(), {"reply_to": reply})

    async def engine(m: Delivery) -> None:
        await bus.publish(m.headers["reply_to"], m.body[::-1])

    async def gateway(m: Delivery) -> None:
        assert m.body == b"OLLEH"
        done.set()

    for queue, handler in ((tokenize, tokenizer), (worker, engine), (reply, gateway)):
        await bus.consume(queue, handler)
    await bus.publish(tokenize, b"hello")
    await asyncio.wait_for(done.wait(), 1)

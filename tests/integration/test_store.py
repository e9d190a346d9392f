"""The store contract (tests/unit/test_inmemory_store.py) on the real Redis, plus Redis specifics.

Keys live under `pagoda-test:<run id>:` and are deleted at the end of each test.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis

from pagoda.services.transport.store import RedisStore, Store, make_store
from tests.unit.test_inmemory_store import (  # noqa: F401  (collected here again, on Redis)
    test_store_counters,
    test_store_hashes,
    test_store_scan_prefix,
    test_store_set_get_delete,
    test_store_sets,
    test_store_ttl_expiry,
)

pytestmark = pytest.mark.integration

REDIS_URL = "redis://127.0.0.1:6379/0"
START_REDIS = 'redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no'


def require_redis() -> None:
    try:
        socket.create_connection(("127.0.0.1", 6379), timeout=1).close()
    except OSError as exc:
        pytest.fail(f"Redis is not reachable on 127.0.0.1:6379 ({exc}); start it: {START_REDIS}")


async def open_store(prefix: str) -> Store:
    store = make_store(REDIS_URL, prefix=prefix)
    assert isinstance(store, RedisStore)
    await store.connect()
    return store


@pytest.fixture(params=["redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    """A store under a unique prefix, emptied afterwards; one param per server."""
    require_redis()
    store = await open_store(f"pagoda-test:{uuid.uuid4().hex[:8]}:")
    yield store
    await store.delete(*await store.scan_prefix(""))
    await store.close()


async def test_redis_prefixes_isolate_stores(store: Store) -> None:
    other = await open_store(store.prefix + "other:")
    try:
        await store.set("k", b"outer")
        await other.set("k", b"inner")
        assert await store.get("k") == b"outer" and await other.get("k") == b"inner"
        assert await other.scan_prefix("") == ["k"]
        assert await store.scan_prefix("") == ["k", "other:k"]
    finally:
        await other.close()


async def test_redis_keys_carry_the_prefix_and_ttl(store: Store) -> None:
    await store.set("session:u1", b"w1", ttl_s=30)
    await store.incr("rate:u1", ttl_s=30)
    client = redis.Redis.from_url(REDIS_URL)
    try:
        assert await client.get(store.prefix + "session:u1") == b"w1"
        assert 0 < await client.pttl(store.prefix + "session:u1") <= 30_000
        assert 0 < await client.pttl(store.prefix + "rate:u1") <= 30_000
    finally:
        await client.aclose()


async def test_redis_smembers_many_keeps_order_over_many_keys(store: Store) -> None:
    keys = [f"block:{i:04x}" for i in range(500)]
    for i, key in enumerate(keys[:250]):
        await store.sadd(key, f"w{i % 3}")
    sets = await store.smembers_many(keys)
    assert sets[:250] == [{f"w{i % 3}"} for i in range(250)] and sets[250:] == [set()] * 250


async def test_redis_unreachable_server_names_the_fix() -> None:
    store = make_store("redis://127.0.0.1:1/0")
    with pytest.raises(ConnectionError, match="redis-server"):
        await store.connect()


async def test_rate_limits_are_shared_by_gateways_through_redis(store: Store) -> None:
    """Two gateways (two connections) count one key's requests together, in one window."""
    from pagoda.services.gateway.ratelimit import RateLimiter, RateLimits
    from pagoda.services.transport.errors import APIError

    other = await open_store(store.prefix)
    try:
        now = 1_000_000 * 60.0 + 1.0  # early in a window: both admits land in it
        limits = RateLimits(requests_per_minute=2, tokens_per_minute=50)
        a = RateLimiter(store, limits, clock=lambda: now)
        b = RateLimiter(other, limits, clock=lambda: now)
        await a.admit("key1", 10)
        await b.admit("key1", 10)
        with pytest.raises(APIError) as info:
            await a.admit("key1", 10)
        assert info.value.status == 429 and info.value.headers["Retry-After"] == "59"
        await b.admit("key2", 50)
        with pytest.raises(APIError):
            await a.admit("key2", 1)
        assert any(k.startswith("rl:key1:") for k in await store.scan_prefix("rl:"))
    finally:
        await other.close()


async def test_redis_get_and_smembers_reads_a_value_and_sets_together(store: Store) -> None:
    await store.set("routed:r:0", "w1")
    await store.sadd("block:01", "w1", "w2")
    read = await store.get_and_smembers("routed:r:0", ["block:01", "block:02"])
    assert read == (b"w1", [{"w1", "w2"}, set()])
    assert await store.get_and_smembers("routed:r:1", []) == (None, [])

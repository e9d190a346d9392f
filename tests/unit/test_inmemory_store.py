"""The Store contract, run here on the in-memory implementation.

The `test_store_*` bodies are the contract: tests/integration/test_store.py imports them and runs
them again on Redis through its own `store` fixture.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from pagoda.services.transport.store import InMemoryStore, Store, WrongTypeError


@pytest.fixture
async def store() -> AsyncIterator[Store]:
    async with InMemoryStore(prefix=f"pagoda-test:{uuid.uuid4().hex[:8]}:") as s:
        yield s


# --- store contract ------------------------------------------------------------------------------


async def test_store_set_get_delete(store: Store) -> None:
    assert await store.get("missing") is None
    await store.set("a", b"\x00\xff")
    await store.set("b", "text")
    assert await store.get("a") == b"\x00\xff" and await store.get("b") == b"text"
    assert await store.delete("a", "b", "missing") == 2
    assert await store.delete() == 0
    assert await store.get("a") is None


async def test_store_ttl_expiry(store: Store) -> None:
    await store.set("session", b"w1", ttl_s=0.1)
    await store.set("kept", b"x", ttl_s=0.1)
    await store.set("kept", b"y")  # set without a TTL clears it
    await store.hset("worker:1", {"load": "3"})
    assert await store.expire("worker:1", 0.1) is True
    assert await store.expire("missing", 1) is False
    assert await store.get("session") == b"w1"
    await asyncio.sleep(0.15)
    assert await store.get("session") is None
    assert await store.hgetall("worker:1") == {}
    assert await store.get("kept") == b"y"
    with pytest.raises(ValueError, match="ttl_s"):
        await store.set("bad", b"x", ttl_s=0)


async def test_store_hashes(store: Store) -> None:
    assert await store.hgetall("worker:1") == {}
    await store.hset("worker:1", {"running": "2", "waiting": "0"})
    await store.hset("worker:1", {"waiting": "5", "kv_usage": "0.25"})
    await store.hset("worker:1", {})
    assert await store.hgetall("worker:1") == {"running": "2", "waiting": "5", "kv_usage": "0.25"}
    assert await store.hdel("worker:1", "running", "nope") == 1
    assert await store.hdel("worker:1") == 0
    assert await store.hgetall("worker:1") == {"waiting": "5", "kv_usage": "0.25"}
    assert await store.hdel("worker:1", "waiting", "kv_usage") == 2
    assert await store.hgetall("worker:1") == {} and await store.scan_prefix("worker") == []
    assert await store.hdel("never", "x") == 0


async def test_store_sets(store: Store) -> None:
    assert await store.sadd("block:aa", "w1", "w2") == 2
    assert await store.sadd("block:aa", "w2", "w3") == 1
    assert await store.sadd("block:bb", "w1") == 1
    assert await store.sadd("block:cc") == 0
    assert await store.smembers("block:aa") == {"w1", "w2", "w3"}
    assert await store.srem("block:aa", "w1", "w9") == 1
    assert await store.srem("block:bb", "w1") == 1  # now empty, so deleted
    assert await store.srem("missing", "w1") == 0
    assert await store.smembers_many(["block:aa", "block:bb", "missing"]) == [{"w2", "w3"}, set(), set()]
    assert await store.smembers_many([]) == []
    assert await store.scan_prefix("block:") == ["block:aa"]


async def test_store_counters(store: Store) -> None:
    assert await store.incr("hits") == 1
    assert await store.incr("hits", 4) == 5
    assert await store.incr("rate:u1", ttl_s=0.2) == 1
    await asyncio.sleep(0.1)
    assert await store.incr("rate:u1", ttl_s=0.2) == 2  # the TTL is not extended
    await asyncio.sleep(0.15)
    assert await store.incr("rate:u1", ttl_s=0.2) == 1  # the window expired: a new key
    assert await store.get("hits") == b"5"


async def test_store_scan_prefix(store: Store) -> None:
    await store.set("session:u1", b"w1")
    await store.set("session:u2", b"w2", ttl_s=0.1)
    await store.hset("worker:w1", {"load": "1"})
    await store.sadd("block:1", "w1")
    await store.set("a*b", b"glob")
    await store.set("axb", b"plain")
    assert await store.scan_prefix("session:") == ["session:u1", "session:u2"]
    assert await store.scan_prefix("a*") == ["a*b"]  # glob characters are literal
    await asyncio.sleep(0.15)
    assert await store.scan_prefix("") == ["a*b", "axb", "block:1", "session:u1", "worker:w1"]
    assert await store.scan_prefix("nothing:") == []


# --- in-memory only ------------------------------------------------------------------------------


async def test_inmemory_ttl_follows_the_injected_clock() -> None:
    now = [100.0]
    store = InMemoryStore(clock=lambda: now[0])
    await store.set("k", b"v", ttl_s=10)
    now[0] = 109.99
    assert await store.get("k") == b"v"
    now[0] = 110.0
    assert await store.get("k") is None and await store.scan_prefix("") == []


async def test_inmemory_expired_keys_never_read_are_swept() -> None:
    """Keys written once with a TTL and never read (stored responses) leave memory anyway."""
    now = [0.0]
    store = InMemoryStore(clock=lambda: now[0])
    for i in range(3000):
        await store.set(f"old:{i}", b"x", ttl_s=1)
    now[0] = 5.0
    for i in range(3000):
        await store.set(f"new:{i}", b"y", ttl_s=60)
    assert len(store._data) < 3000 + 1024
    assert await store.get("new:0") == b"y" and await store.get("new:2999") == b"y"


async def test_inmemory_store_wrong_type(store: Store) -> None:
    await store.sadd("s", "m")
    await store.set("text", b"abc")
    with pytest.raises(WrongTypeError):
        await store.get("s")
    with pytest.raises(WrongTypeError):
        await store.hset("s", {"f": "v"})
    with pytest.raises(WrongTypeError):
        await store.incr("text")

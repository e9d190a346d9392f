"""The metadata store: keys with TTLs, hashes, sets and counters, in Redis or in memory.

Redis holds only metadata (worker registry and load, the prefix-block index, sessions, rate-limit
counters), with one stated exception: stored Responses API responses and their conversations
(gateway/responses_output.py, docs/architecture.md). Nothing here is needed to finish a request
already running on a worker. `make_store(url)`
picks the implementation: `memory://` (or None) for one process, `redis://host:6379/0` for Redis.
"""

from __future__ import annotations

import builtins
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self

Value = bytes | dict[str, str] | set[str]


class WrongTypeError(TypeError):
    """A key holding one kind of value used as another (Redis's WRONGTYPE)."""


def _ms(ttl_s: float) -> int:
    if ttl_s <= 0:
        raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
    return max(1, round(ttl_s * 1000))


class Store(ABC):
    """Namespaced metadata; each instance owns its connection and every key under its `prefix`.

    Invariants, the same for every implementation:
    - Every key is stored as `prefix + key`; callers (and `scan_prefix`) only see their own names.
    - Keys, hash fields and set members are str; plain values are bytes (a str is stored as UTF-8).
    - A key past its TTL reads as absent. `set` replaces a key's TTL; `hset`, `sadd` and `incr`
      keep it; a hash or set whose last member is removed is deleted.
    - One key holds one kind of value (bytes, hash, set, counter); using it as another raises
      (`WrongTypeError` in memory, `redis.ResponseError` in Redis).
    """

    def __init__(self, prefix: str = "pagoda:") -> None:
        self.prefix = prefix

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
    async def set(self, key: str, value: bytes | str, ttl_s: float | None = None) -> None: ...

    @abstractmethod
    async def get(self, key: str) -> bytes | None: ...

    @abstractmethod
    async def delete(self, *keys: str) -> int:
        """Returns how many of the keys existed."""

    @abstractmethod
    async def expire(self, key: str, ttl_s: float) -> bool:
        """Returns False when the key does not exist."""

    @abstractmethod
    async def hset(self, key: str, mapping: dict[str, str]) -> None: ...

    @abstractmethod
    async def hgetall(self, key: str) -> dict[str, str]: ...

    @abstractmethod
    async def hdel(self, key: str, *fields: str) -> int:
        """Returns how many fields were removed."""

    @abstractmethod
    async def sadd(self, key: str, *members: str) -> int:
        """Returns how many members were new."""

    @abstractmethod
    async def srem(self, key: str, *members: str) -> int:
        """Returns how many members were removed."""

    @abstractmethod
    async def smembers(self, key: str) -> builtins.set[str]: ...

    @abstractmethod
    async def smembers_many(self, keys: list[str]) -> list[builtins.set[str]]:
        """`smembers` of each key, in order, in one round trip."""

    async def get_and_smembers(
        self, key: str, set_keys: list[str]
    ) -> tuple[bytes | None, list[builtins.set[str]]]:
        """`get(key)` and `smembers_many(set_keys)` in one round trip."""
        return await self.get(key), await self.smembers_many(set_keys)

    @abstractmethod
    async def incr(self, key: str, amount: int = 1, ttl_s: float | None = None) -> int:
        """Adds `amount` and returns the new value; `ttl_s` applies only when the key is new."""

    @abstractmethod
    async def scan_prefix(self, prefix: str) -> list[str]:
        """The live keys that start with `prefix`, sorted, without this store's own prefix."""


# --- in memory -----------------------------------------------------------------------------------

_SWEEP_MIN = 1024  # keys with a TTL before the first sweep


class InMemoryStore(Store):
    """A dict with TTLs checked on read against a monotonic clock; share one instance per process."""

    def __init__(self, prefix: str = "pagoda:", clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(prefix)
        self._clock = clock
        self._data: dict[str, Value] = {}
        self._expiry: dict[str, float] = {}  # key -> deadline on `clock`
        self._sweep_at = _SWEEP_MIN  # sweep expired keys once this many keys have a TTL

    async def connect(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def _live(self, key: str) -> Value | None:
        deadline = self._expiry.get(key)
        if deadline is not None and self._clock() >= deadline:
            del self._data[key], self._expiry[key]
        return self._data.get(key)

    def _expire_at(self, full: str, ttl_s: float) -> None:
        self._expiry[full] = self._clock() + _ms(ttl_s) / 1000
        if len(self._expiry) >= self._sweep_at:
            self._sweep()

    def _sweep(self) -> None:
        """Drop every expired key. Reads drop the expired keys they meet, but a key written and
        never read again (a stored response) would stay in memory past its TTL; a sweep runs each
        time the keys with a TTL double, so a write costs O(1) on average."""
        now = self._clock()
        for key in [k for k, deadline in self._expiry.items() if now >= deadline]:
            del self._data[key], self._expiry[key]
        self._sweep_at = max(_SWEEP_MIN, 2 * len(self._expiry))

    def _typed(self, key: str, kind: type) -> Any:
        value = self._live(self.prefix + key)
        if value is not None and not isinstance(value, kind):
            raise WrongTypeError(f"key {key!r} holds a {type(value).__name__}, not a {kind.__name__}")
        return value

    def _drop_if_empty(self, key: str) -> None:
        if not self._data[key]:
            self._data.pop(key)
            self._expiry.pop(key, None)

    async def set(self, key: str, value: bytes | str, ttl_s: float | None = None) -> None:
        full = self.prefix + key
        self._data[full] = value.encode() if isinstance(value, str) else bytes(value)
        self._expiry.pop(full, None)
        if ttl_s is not None:
            self._expire_at(full, ttl_s)

    async def get(self, key: str) -> bytes | None:
        value: bytes | None = self._typed(key, bytes)
        return value

    async def delete(self, *keys: str) -> int:
        found = [k for k in keys if self._live(self.prefix + k) is not None]
        for k in found:
            self._data.pop(self.prefix + k)
            self._expiry.pop(self.prefix + k, None)
        return len(found)

    async def expire(self, key: str, ttl_s: float) -> bool:
        if self._live(self.prefix + key) is None:
            return False
        self._expire_at(self.prefix + key, ttl_s)
        return True

    async def hset(self, key: str, mapping: dict[str, str]) -> None:
        if mapping:
            current = self._typed(key, dict)
            if current is None:
                current = self._data[self.prefix + key] = {}
            current.update(mapping)

    async def hgetall(self, key: str) -> dict[str, str]:
        return dict(self._typed(key, dict) or {})

    async def hdel(self, key: str, *fields: str) -> int:
        current = self._typed(key, dict)
        if current is None:
            return 0
        removed = sum(current.pop(f, None) is not None for f in fields)
        if not current:
            del self._data[self.prefix + key]
        return removed

    async def sadd(self, key: str, *members: str) -> int:
        if not members:
            return 0
        current = self._typed(key, set)
        if current is None:
            current = self._data[self.prefix + key] = set()
        before = len(current)
        current.update(members)
        return len(current) - before

    async def srem(self, key: str, *members: str) -> int:
        current = self._typed(key, set)
        if current is None:
            return 0
        before = len(current)
        current.difference_update(members)
        self._drop_if_empty(self.prefix + key)
        return before - len(current)

    async def smembers(self, key: str) -> builtins.set[str]:
        return set(self._typed(key, set) or ())

    async def smembers_many(self, keys: list[str]) -> list[builtins.set[str]]:
        return [await self.smembers(k) for k in keys]

    async def incr(self, key: str, amount: int = 1, ttl_s: float | None = None) -> int:
        current = self._typed(key, bytes)
        if current is None:
            await self.set(key, b"0", ttl_s)
            current = b"0"
        try:
            value = int(current) + amount
        except ValueError:
            raise WrongTypeError(f"key {key!r} holds {current!r}, not an integer") from None
        self._data[self.prefix + key] = str(value).encode()
        return value

    async def scan_prefix(self, prefix: str) -> list[str]:
        start = self.prefix + prefix
        keys = [k for k in list(self._data) if k.startswith(start) and self._live(k) is not None]
        return sorted(k[len(self.prefix) :] for k in keys)


# --- Redis ---------------------------------------------------------------------------------------


def _decode(values: Any) -> set[str]:
    return {v.decode() if isinstance(v, bytes) else v for v in values}


class RedisStore(Store):
    """redis.asyncio with its connection pool; values come back as bytes, names decoded as UTF-8."""

    def __init__(self, url: str, prefix: str = "pagoda:") -> None:
        super().__init__(prefix)
        self._url = url
        self._redis: Any = None

    async def connect(self) -> None:
        import redis.asyncio as redis

        if self._redis is not None:
            return
        client = redis.Redis.from_url(self._url, decode_responses=False)
        try:
            await client.ping()
        except (OSError, redis.ConnectionError) as exc:
            await client.aclose()
            raise ConnectionError(
                f"cannot reach Redis at {self._url}: {exc}; check the URL or start the server "
                '(`redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save ""`)'
            ) from exc
        self._redis = client

    async def close(self) -> None:
        client, self._redis = self._redis, None
        if client is not None:
            await client.aclose()

    def _r(self) -> Any:
        assert self._redis is not None, "RedisStore used before connect()"
        return self._redis

    async def set(self, key: str, value: bytes | str, ttl_s: float | None = None) -> None:
        await self._r().set(self.prefix + key, value, px=None if ttl_s is None else _ms(ttl_s))

    async def get(self, key: str) -> bytes | None:
        value: bytes | None = await self._r().get(self.prefix + key)
        return value

    async def delete(self, *keys: str) -> int:
        return int(await self._r().delete(*(self.prefix + k for k in keys))) if keys else 0

    async def expire(self, key: str, ttl_s: float) -> bool:
        return bool(await self._r().pexpire(self.prefix + key, _ms(ttl_s)))

    async def hset(self, key: str, mapping: dict[str, str]) -> None:
        if mapping:
            await self._r().hset(self.prefix + key, mapping=mapping)

    async def hgetall(self, key: str) -> dict[str, str]:
        raw = await self._r().hgetall(self.prefix + key)
        return {k.decode(): v.decode() for k, v in raw.items()}

    async def hdel(self, key: str, *fields: str) -> int:
        return int(await self._r().hdel(self.prefix + key, *fields)) if fields else 0

    async def sadd(self, key: str, *members: str) -> int:
        return int(await self._r().sadd(self.prefix + key, *members)) if members else 0

    async def srem(self, key: str, *members: str) -> int:
        return int(await self._r().srem(self.prefix + key, *members)) if members else 0

    async def smembers(self, key: str) -> builtins.set[str]:
        return _decode(await self._r().smembers(self.prefix + key))

    async def smembers_many(self, keys: list[str]) -> list[builtins.set[str]]:
        if not keys:
            return []
        async with self._r().pipeline(transaction=False) as pipe:
            for k in keys:
                pipe.smembers(self.prefix + k)
            return [_decode(members) for members in await pipe.execute()]

    async def get_and_smembers(
        self, key: str, set_keys: list[str]
    ) -> tuple[bytes | None, list[builtins.set[str]]]:
        async with self._r().pipeline(transaction=False) as pipe:
            pipe.get(self.prefix + key)
            for k in set_keys:
                pipe.smembers(self.prefix + k)
            value, *members = await pipe.execute()
        return value, [_decode(m) for m in members]

    async def incr(self, key: str, amount: int = 1, ttl_s: float | None = None) -> int:
        full = self.prefix + key
        if ttl_s is None:
            return int(await self._r().incrby(full, amount))
        async with self._r().pipeline(transaction=True) as pipe:  # MULTI: create with TTL, then add
            pipe.set(full, 0, px=_ms(ttl_s), nx=True)
            pipe.incrby(full, amount)
            _, value = await pipe.execute()
        return int(value)

    async def scan_prefix(self, prefix: str) -> list[str]:
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", self.prefix + prefix) + "*"
        keys = [k async for k in self._r().scan_iter(match=pattern, count=1000)]
        return sorted({k.decode()[len(self.prefix) :] for k in keys})


_STORES: dict[str, Callable[[str, str], Store]] = {
    "memory": lambda url, prefix: InMemoryStore(prefix),
    "redis": RedisStore,
    "rediss": RedisStore,
    "unix": RedisStore,
}


def make_store(url: str | None, prefix: str = "pagoda:") -> Store:
    """`memory://` or None -> InMemoryStore; `redis://`, `rediss://`, `unix://` -> RedisStore."""
    url = url or "memory://"
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme not in _STORES:
        raise ValueError(f"unknown store URL {url!r}: use memory:// or redis://host:6379/0")
    return _STORES[scheme](url, prefix)

"""What the services keep in the store: the worker registry, the prefix-block index, sessions.

Keys (under the store's prefix): `workers` (set of ids), `worker:<id>` (a `WorkerHeartbeat`, one
hash field per figure, with a TTL of a few heartbeats), `blk:<hash hex>` (set of worker ids caching
that block), `session:<id>` (worker id, with a TTL), `loras` (the LoRA adapters the deployment
serves: name -> JSON `{"path", "parent"}`, see gateway/adapters.py). Nothing here is needed to
finish a running request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from abc import ABC, abstractmethod

from pagoda.engine import BlockHash
from pagoda.services.scheduler.router import WorkerState
from pagoda.services.transport.messages import MessageError, WorkerHeartbeat
from pagoda.services.transport.store import Store

logger = logging.getLogger(__name__)

WORKERS = "workers"
ADAPTERS = "loras"


def _worker_key(worker_id: str) -> str:
    return f"worker:{worker_id}"


def _block_key(block_hash: BlockHash) -> str:
    return f"blk:{block_hash.hex()}"


class WorkerRegistry:
    def __init__(self, store: Store, heartbeat_s: float) -> None:
        self.store = store
        self.heartbeat_s = heartbeat_s

    async def beat(self, heartbeat: WorkerHeartbeat) -> bool:
        """Record a heartbeat (stamped with `last_seen` now); returns False when the store had no
        record of this worker (its first beat, or the store lost its data), so the worker knows to
        publish its full state again."""
        key = _worker_key(heartbeat.worker_id)
        existed = await self.store.expire(key, 3 * self.heartbeat_s)
        await self.store.hset(key, _stamped(heartbeat).to_fields())
        if not existed:
            await self.store.expire(key, 3 * self.heartbeat_s)
        await self.store.sadd(WORKERS, heartbeat.worker_id)
        return existed

    async def leave(self, heartbeat: WorkerHeartbeat, linger_s: float) -> None:
        """A drained worker's tombstone (its last heartbeat, `state` "stopped", kept `linger_s`):
        gateways wait for its `WorkerLeaving` notice instead of treating it as lost."""
        assert heartbeat.state == "stopped", heartbeat.state
        key = _worker_key(heartbeat.worker_id)
        await self.store.hset(key, _stamped(heartbeat).to_fields())
        await self.store.expire(key, linger_s)

    async def remove(self, worker_id: str) -> None:
        await self.store.delete(_worker_key(worker_id))
        await self.store.srem(WORKERS, worker_id)

    async def alive(self) -> list[WorkerHeartbeat]:
        """Workers heard from within the last heartbeat interval (plus slack for jitter), whatever
        their `state`, and the tombstones of drained ones ("stopped"). A record that does not
        decode is logged and skipped."""
        now = time.time()
        result = []
        for wid in sorted(await self.store.smembers(WORKERS)):
            fields = await self.store.hgetall(_worker_key(wid))
            if not fields:
                await self.store.srem(WORKERS, wid)  # its hash expired: it is gone
                continue
            try:
                beat = WorkerHeartbeat.from_fields(wid, fields)
            except MessageError as exc:
                logger.warning("worker registry: skipped worker %s: %s", wid, exc)
                continue
            stale = now - beat.last_seen > 1.5 * self.heartbeat_s + 0.5
            if stale and beat.state != "stopped":
                continue
            result.append(beat)
        return result


class Refreshed(ABC):
    """A service's copy of store state, refreshed when it starts and then every
    `refresh_interval_s` by a task it owns (cancelled by `stop`)."""

    _task: asyncio.Task[None] | None = None

    @property
    @abstractmethod
    def refresh_interval_s(self) -> float: ...

    @abstractmethod
    async def refresh(self) -> None:
        """Read the store again; must not raise for a store that is down (keep the last copy)."""

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._watch(), name=f"refresh-{type(self).__name__}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_interval_s)
            await self.refresh()


def _stamped(heartbeat: WorkerHeartbeat) -> WorkerHeartbeat:
    return heartbeat.model_copy(update={"last_seen": time.time()})


def load_of(heartbeat: WorkerHeartbeat) -> WorkerState:
    """What the router weighs of a worker."""
    return WorkerState(
        heartbeat.worker_id,
        num_running=heartbeat.num_running,
        num_waiting=heartbeat.num_waiting,
        kv_usage=heartbeat.kv_usage,
        max_num_seqs=heartbeat.max_num_seqs,
    )


def routable(workers: list[WorkerHeartbeat]) -> list[WorkerHeartbeat]:
    """The workers that take new requests: neither draining nor stalled (nor stopped)."""
    return [w for w in workers if w.state == "ready"]


class PrefixIndex:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def update(self, worker_id: str, stored: list[BlockHash], evicted: list[BlockHash]) -> None:
        for h in stored:
            await self.store.sadd(_block_key(h), worker_id)
        for h in evicted:
            await self.store.srem(_block_key(h), worker_id)

    async def owners(self, hashes: list[BlockHash]) -> list[set[str]]:
        if not hashes:
            return []
        return await self.store.smembers_many([_block_key(h) for h in hashes])

    async def owners_and_get(self, hashes: list[BlockHash], key: str) -> tuple[bytes | None, list[set[str]]]:
        """`owners(hashes)` and the store's value at `key`, in one round trip."""
        return await self.store.get_and_smembers(key, [_block_key(h) for h in hashes])


class Sessions:
    def __init__(self, store: Store, ttl_s: float = 600.0) -> None:
        self.store = store
        self.ttl_s = ttl_s

    async def get(self, session_id: str) -> str | None:
        value = await self.store.get(f"session:{session_id}")
        return value.decode() if value is not None else None

    async def put(self, session_id: str, worker_id: str) -> None:
        await self.store.set(f"session:{session_id}", worker_id, ttl_s=self.ttl_s)

"""What the services keep in the store: the worker registry, the prefix-block index, sessions.

Keys (under the store's prefix): `workers` (set of ids), `worker:<id>` (hash of load figures with
a TTL of a few heartbeats), `blk:<hash hex>` (set of worker ids caching that block),
`session:<id>` (worker id, with a TTL). Nothing here is needed to finish a running request.
"""

from __future__ import annotations

import time

from pagoda.engine.kv.block_hash import BlockHash
from pagoda.services.scheduler.router import WorkerState
from pagoda.services.transport.store import Store

WORKERS = "workers"


def _worker_key(worker_id: str) -> str:
    return f"worker:{worker_id}"


def _block_key(block_hash: BlockHash) -> str:
    return f"blk:{block_hash.hex()}"


class WorkerRegistry:
    def __init__(self, store: Store, heartbeat_s: float) -> None:
        self.store = store
        self.heartbeat_s = heartbeat_s

    async def beat(self, worker_id: str, figures: dict[str, str]) -> bool:
        """Record a heartbeat; returns False when the store had no record of this worker (its first
        beat, or the store lost its data), so the worker knows to publish its full state again."""
        key = _worker_key(worker_id)
        existed = await self.store.expire(key, 3 * self.heartbeat_s)
        await self.store.hset(key, {**figures, "last_seen": f"{time.time():.3f}"})
        if not existed:
            await self.store.expire(key, 3 * self.heartbeat_s)
        await self.store.sadd(WORKERS, worker_id)
        return existed

    async def leave(self, worker_id: str, linger_s: float) -> None:
        """A drained worker's tombstone (`state=stopped`, kept `linger_s`): gateways wait for its
        `WorkerLeaving` notice instead of treating it as lost."""
        await self.store.hset(_worker_key(worker_id), {"state": "stopped", "last_seen": f"{time.time():.3f}"})
        await self.store.expire(_worker_key(worker_id), linger_s)

    async def remove(self, worker_id: str) -> None:
        await self.store.delete(_worker_key(worker_id))
        await self.store.srem(WORKERS, worker_id)

    async def alive(self) -> list[tuple[WorkerState, dict[str, str]]]:
        """Workers heard from within the last heartbeat interval (plus slack for jitter), whatever
        their `state` figure: "ready", "draining" (finishing its requests, takes no new ones) or
        "stalled" (its step loop stopped advancing), or "stopped" (a drained worker's tombstone)."""
        now = time.time()
        result = []
        for wid in sorted(await self.store.smembers(WORKERS)):
            figures = await self.store.hgetall(_worker_key(wid))
            if not figures:
                await self.store.srem(WORKERS, wid)  # its hash expired: it is gone
                continue
            stale = now - float(figures.get("last_seen", 0)) > 1.5 * self.heartbeat_s + 0.5
            if stale and figures.get("state") != "stopped":
                continue
            state = WorkerState(
                wid,
                num_running=int(figures.get("num_running", 0)),
                num_waiting=int(figures.get("num_waiting", 0)),
                kv_usage=float(figures.get("kv_usage", 0.0)),
                max_num_seqs=int(figures.get("max_num_seqs", 256)),
            )
            result.append((state, figures))
        return result


def routable(workers: list[tuple[WorkerState, dict[str, str]]]) -> list[tuple[WorkerState, dict[str, str]]]:
    """The workers that take new requests: neither draining nor stalled."""
    return [(s, f) for s, f in workers if f.get("state", "ready") == "ready"]


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


class Sessions:
    def __init__(self, store: Store, ttl_s: float = 600.0) -> None:
        self.store = store
        self.ttl_s = ttl_s

    async def get(self, session_id: str) -> str | None:
        value = await self.store.get(f"session:{session_id}")
        return value.decode() if value is not None else None

    async def put(self, session_id: str, worker_id: str) -> None:
        await self.store.set(f"session:{session_id}", worker_id, ttl_s=self.ttl_s)

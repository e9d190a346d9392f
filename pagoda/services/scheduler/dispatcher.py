"""The scheduler service (cluster dispatcher): picks a worker for each tokenized request.

It reads live workers from the registry (heartbeats), keeps those serving the request's model
(one scheduler routes for every model of the deployment), looks up how much of the prompt each worker
has cached (the block hashes workers publish, computed with the engine's own hash function), asks
the router, and forwards the request to that worker's queue. Between heartbeats it counts the
requests it has sent each worker, so a burst does not all land on one worker.

Several schedulers may consume the same queue. Each message is acked only after it was routed
(a scheduler killed mid-route leaves it to another), and a request id + attempt routed once is
not routed again (a redelivery, or a tokenizer that sent it twice). With the store unreachable it
routes on the last worker list it read, by load alone (see `gateway/failover.py` for what happens
when a worker is lost). A drained worker deletes its queue; a request routed there on a stale
worker list (publishing raises `QueueNotFoundError`) is routed again among the others.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Coroutine
from dataclasses import replace
from typing import Any

from pagoda.engine import hash_full_blocks
from pagoda.services.ops import tracing
from pagoda.services.ops.metrics import Metrics
from pagoda.services.scheduler.admission import RETRY_AFTER_S, AdmissionLimits, has_room, queue_timed_out
from pagoda.services.scheduler.registry import PrefixIndex, Sessions, WorkerRegistry, load_of, routable
from pagoda.services.scheduler.router import Decision, leading_overlap, make_router
from pagoda.services.transport.bus import Bus, Delivery, QueueNotFoundError, Subscription
from pagoda.services.transport.messages import (
    Assigned,
    MessageError,
    Queues,
    Rejected,
    ScheduleRequest,
    WorkerHeartbeat,
    WorkerRequest,
    decode,
    encode,
)
from pagoda.services.transport.store import Store

logger = logging.getLogger("pagoda.scheduler")


class Routed(enum.Enum):
    """What `_decide` returns for an attempt it finds routed already (a redelivery, a resent copy)."""

    ROUTED = "routed"


ROUTED = Routed.ROUTED  # `_decide`: this attempt of the request was routed before


class SchedulerService:
    def __init__(
        self,
        bus: Bus,
        store: Store,
        *,
        router: str = "prefix",
        heartbeat_s: float = 1.0,
        concurrency: int = 64,
        queues: Queues | None = None,
        metrics: Metrics | None = None,
        admission: AdmissionLimits | None = None,
    ) -> None:
        self.bus = bus
        self.admission = admission or AdmissionLimits()
        self.metrics = metrics.scheduler() if metrics is not None else None
        self.queues = queues or Queues()
        self.store = store
        self.router = make_router(router)
        self.registry = WorkerRegistry(store, heartbeat_s)
        self.prefix_index = PrefixIndex(store)
        self.sessions = Sessions(store)
        self.heartbeat_s = heartbeat_s
        self.concurrency = concurrency
        self._subs: list[Subscription] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._cache: tuple[float, list[WorkerHeartbeat]] = (0.0, [])
        self._sent: dict[str, int] = {}  # requests sent per worker since its last heartbeat
        self._beat_seen: dict[str, float] = {}
        self.decisions: dict[str, int] = {}  # worker id -> requests routed there

    async def start(self) -> None:
        await self.bus.declare_work_queue(self.queues.schedule)
        # Ack after routing, many at once: one subscription per concurrent route.
        for _ in range(max(1, min(self.concurrency, 16))):
            self._subs.append(await self.bus.consume(self.queues.schedule, self._on_message, prefetch=4))
        if self.metrics is not None:
            self._spawn(self._watch_queue())
        logger.info("scheduler ready on %s (router %s)", self.queues.schedule, self.router.name)

    async def stop(self) -> None:
        for sub in self._subs:
            await sub.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _on_message(self, message: Delivery) -> None:
        try:
            msg = decode(message.body)
        except MessageError as exc:
            logger.warning("scheduler: dropped a malformed message: %s", exc)
            return
        if not isinstance(msg, ScheduleRequest) or isinstance(msg, WorkerRequest):
            logger.warning("scheduler: dropped an unexpected %s message", msg.type)
            return
        await self._route(msg, message.headers)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watch_queue(self) -> None:
        """Refresh the queue-depth gauge every heartbeat interval."""
        assert self.metrics is not None
        while True:
            try:
                self.metrics.queue_depth.set(await self.bus.queue_depth(self.queues.schedule))
            except Exception as exc:  # a metric must not stop the scheduler
                logger.debug("scheduler: queue depth unavailable: %s", exc)
            await asyncio.sleep(self.heartbeat_s)

    async def _workers(self) -> list[WorkerHeartbeat]:
        now = time.monotonic()
        if now - self._cache[0] > self.heartbeat_s / 4:
            try:
                workers = routable(await self.registry.alive())
            except Exception as exc:  # the store is down: route on what we last knew, by load
                if self._cache[1]:
                    logger.warning("scheduler: worker registry unreadable (%s); using the last list", exc)
                    return self._cache[1]
                raise
            self._cache = (now, workers)
            for beat in self._cache[1]:
                if self._beat_seen.get(beat.worker_id) != beat.last_seen:
                    self._beat_seen[beat.worker_id] = beat.last_seen
                    self._sent[beat.worker_id] = 0  # the heartbeat now counts them
        return self._cache[1]

    async def _route(self, msg: ScheduleRequest, headers: dict[str, str]) -> None:
        attrs = {"gen_ai.request.id": msg.request_id}
        with tracing.hop("scheduler", "scheduler.route", headers, **attrs) as span:
            await self._route_traced(msg, span)

    async def _route_traced(self, msg: ScheduleRequest, span: tracing.TraceHandle) -> None:
        """Choose a worker and forward `msg` to it (the gateway told first); a request that
        expired on the bus or was already routed is not; one nobody can take is rejected."""
        if await self._expired(msg):
            return
        gone: set[str] = set()  # workers whose queue turned out to be deleted
        while True:
            try:  # the first lookup (none gone yet) also reads whether this attempt was routed
                decision = await self._decide(msg, gone, check_routed=not gone)
            except Exception as exc:
                logger.exception("scheduler: routing %s failed", msg.request_id)
                span.fail(exc)
                await self._reject(msg, 503, f"the scheduler could not route the request: {exc}", "error")
                return
            if decision is ROUTED:
                text = "request %s (attempt %d) was already routed: duplicate dropped"
                logger.info(text, msg.request_id, msg.attempt)
                return
            if decision is None:
                span.fail("no worker")
                serving = f" serves model {msg.model!r}" if msg.model else " is available"
                text = f"no worker{serving}; try again shortly"
                await self._reject(msg, 503, text, "no_worker", RETRY_AFTER_S)
                return
            try:
                if not await self._forward(msg, decision, span):
                    return
            except QueueNotFoundError:  # that worker drained and left since we read the registry
                logger.warning(
                    "scheduler: worker %s is gone (no queue); rerouting %s",
                    decision.worker_id,
                    msg.request_id,
                )
                gone.add(decision.worker_id)
                continue
            break
        await self._remember(msg, decision.worker_id)
        logger.info(
            "request %s -> worker %s (%s, %d cached blocks, %d prompt tokens)",
            msg.request_id, decision.worker_id, decision.reason, decision.overlap_blocks,
            len(msg.prompt_token_ids),
        )  # fmt: skip

    async def _expired(self, msg: ScheduleRequest) -> bool:
        """True (and the gateway told) when `msg` waited on the bus past its queue timeout."""
        timeout = msg.queue_timeout_s
        if timeout is not None and msg.arrival_time > 0 and time.time() - msg.arrival_time > timeout:
            err = queue_timed_out(timeout)  # it waited on the bus: do not start it now
            await self._reject(msg, err.status, err.message, "queue_timeout", RETRY_AFTER_S)
            return True
        return False

    async def _routed_already(self, msg: ScheduleRequest) -> bool:
        try:
            return await self.store.get(_routed_key(msg)) is not None
        except Exception:  # the store is down: no dedup; the gateway drops duplicate tokens
            return False

    async def _forward(self, msg: ScheduleRequest, decision: Decision, span: tracing.TraceHandle) -> bool:
        """Tell the gateway where `msg` runs, then send it to that worker. False (the gateway told
        with a 503) when the broker stays away; raises QueueNotFoundError when the worker left."""
        wid = decision.worker_id
        span.set("pagoda.worker_id", wid)
        span.set("pagoda.route_reason", decision.reason)
        span.set("pagoda.prefix_overlap_blocks", decision.overlap_blocks)
        if self.metrics is not None:
            self.metrics.routed.labels(wid, decision.reason).inc()
        self._sent[wid] = self._sent.get(wid, 0) + 1
        self.decisions[wid] = self.decisions.get(wid, 0) + 1
        fwd = WorkerRequest(**msg.model_dump(exclude={"type"}))
        assigned = Assigned(
            request_id=msg.request_id, worker_id=wid, attempt=msg.attempt, resume_from=msg.resume_from,
            prompt_token_ids=msg.prompt_token_ids if msg.attempt == 0 else None,
        )  # fmt: skip
        try:  # before the worker has it: the gateway then watches that worker for this request
            await self.bus.publish(msg.reply_to, encode(assigned))
        except Exception as exc:
            logger.warning("scheduler: could not tell the gateway where %s runs: %s", msg.request_id, exc)
        try:
            await self.bus.publish(self.queues.worker(wid), encode(fwd), span.headers())
        except QueueNotFoundError:
            raise
        except Exception as exc:  # the broker stayed away: tell the gateway rather than drop it
            logger.warning("scheduler: could not forward %s to worker %s: %s", msg.request_id, wid, exc)
            await self._reject(msg, 503, "the request could not reach a worker; retry shortly", "bus")
            return False
        return True

    async def _remember(self, msg: ScheduleRequest, wid: str) -> None:
        """Record the routing (dedup of redeliveries, session affinity); metadata only."""
        try:
            await self.store.set(_routed_key(msg), wid, ttl_s=600)
            if msg.session_id:
                await self.sessions.put(msg.session_id, wid)
        except Exception as exc:  # metadata only: the request runs
            logger.warning("scheduler: store unavailable after routing %s: %s", msg.request_id, exc)

    async def _decide(
        self, msg: ScheduleRequest, gone: set[str] | None = None, check_routed: bool = False
    ) -> Decision | Routed | None:
        """The router's choice among the live workers of the request's model (None: there are none;
        ROUTED: `check_routed` found this attempt routed already, a redelivery or a resent copy,
        read in the same round trip as the prompt's cached blocks)."""
        alive = [
            w
            for w in await self._workers()
            if w.worker_id not in (gone or ()) and (not msg.model or w.model == msg.model)
        ]
        if not alive:
            return ROUTED if check_routed and await self._routed_already(msg) else None
        block_size = alive[0].block_size
        extra = (msg.cache_salt,) if msg.cache_salt else ()
        hashes = hash_full_blocks(msg.prompt_token_ids, block_size, extra, lora_name=msg.lora_name)
        try:
            if check_routed:
                earlier, owners = await self.prefix_index.owners_and_get(hashes, _routed_key(msg))
                if earlier is not None:
                    return ROUTED
            else:
                owners = await self.prefix_index.owners(hashes)
            overlap = leading_overlap(owners)
            session_worker = await self.sessions.get(msg.session_id) if msg.session_id else None
        except Exception:  # the store is down: route by load alone (and no dedup)
            overlap, session_worker = {}, None
        # No await from here to the caller's count of the decision: requests routed at the same
        # time see each other. Requests sent since a worker's last heartbeat count as waiting there.
        workers = [
            replace(s, num_waiting=s.num_waiting + self._sent.get(s.worker_id, 0))
            for s in map(load_of, alive)
        ]
        # Workers with room by this view. It lags (a request finished since a heartbeat still
        # counts), so when none seems to have room the least loaded decides for itself, exactly.
        roomy = [w for w in workers if has_room(w, self.admission, msg.priority, seqs=msg.sampling.n)]
        pool = roomy or workers
        if msg.lora_name is not None:  # prefer the workers that hold its adapter loaded
            holding = {w.worker_id for w in alive if msg.lora_name in w.loras}
            pool = [w for w in pool if w.worker_id in holding] or pool
        return self.router.choose(pool, overlap, session_worker)

    async def _reject(
        self, msg: ScheduleRequest, status: int, text: str, reason: str, retry_after_s: int | None = None
    ) -> None:
        if self.metrics is not None:
            self.metrics.rejected.labels(reason).inc()
        reject = Rejected(request_id=msg.request_id, status=status, message=text, retry_after_s=retry_after_s)
        try:
            await self.bus.publish(msg.reply_to, encode(reject))
        except Exception as exc:
            logger.warning("scheduler: could not reject %s: %s", msg.request_id, exc)


def _routed_key(msg: ScheduleRequest) -> str:
    """The store key that marks one attempt of a request as routed."""
    return f"routed:{msg.request_id}:{msg.attempt}"

"""The worker service: one engine (model + paged KV cache) fed from its own queue.

It takes `WorkerRequest`/`AbortRequest` messages from `pagoda.worker.<id>`, steps the engine in
its own thread, and after every step publishes one `StepOutputs` per gateway carrying the new
tokens of all that gateway's requests. It heartbeats its load to the store and publishes the
block hashes it caches and evicts, which is what the scheduler's prefix router reads.

Its heartbeat carries a `state`: "ready"; "stalled" when requests wait but the step loop has not
advanced for `stall_timeout_s`, or its engine stopped after an error (the scheduler stops routing
to it and gateways move its requests elsewhere), draining or not; "draining" after `drain()`
(SIGTERM): it finishes what it runs, hands requests that still arrive back to the scheduler, then
deregisters. When the store lost its record of this worker (a Redis restart), the next heartbeat
republishes its whole prefix-cache index. A worker whose engine stopped sets `failed` a few
heartbeats later (its requests have moved by then): the process exits 1, to be restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass

from pagoda.engine import AsyncEngine, RequestOutput
from pagoda.services.ops import tracing
from pagoda.services.ops.metrics import Metrics
from pagoda.services.scheduler.admission import (
    RETRY_AFTER_S,
    AdmissionLimits,
    fleet_saturated,
    has_room,
    queue_deadline,
    queue_timed_out,
    queued,
)
from pagoda.services.scheduler.registry import PrefixIndex, WorkerRegistry
from pagoda.services.scheduler.router import WorkerState
from pagoda.services.transport.bus import Bus, Delivery, QueueNotFoundError, Subscription
from pagoda.services.transport.messages import (
    AbortRequest,
    MessageError,
    Queues,
    Rejected,
    ScheduleRequest,
    StepOutputs,
    TokenDelta,
    WorkerLeaving,
    WorkerRequest,
    WorkerStatus,
    decode,
    encode,
)
from pagoda.services.transport.store import Store
from pagoda.services.worker.adapters import drop_unregistered, ensure_adapter
from pagoda.services.worker.liveness import StallWatch, heartbeat_of

logger = logging.getLogger("pagoda.worker")

DEAD_BEATS_BEFORE_EXIT = 3  # "stalled" beats a worker whose engine stopped sends before it fails


@dataclass
class _Inflight:
    reply_to: str  # the gateway's reply queue
    remaining: int  # choices not finished yet
    started: float
    trace: tracing.TraceHandle = tracing.NOOP
    queue_s: float | None = None  # arrival on the engine to first schedule
    first_token: float | None = None  # monotonic
    deadline: float | None = None  # monotonic: fail it if no output by then (--queue-timeout)
    timeout_s: float | None = None


class WorkerService:
    def __init__(
        self,
        engine: AsyncEngine,
        bus: Bus,
        store: Store,
        *,
        worker_id: str | None = None,
        heartbeat_s: float = 1.0,
        stall_timeout_s: float = 30.0,
        queues: Queues | None = None,
        metrics: Metrics | None = None,
        admission: AdmissionLimits | None = None,
    ) -> None:
        self.engine = engine
        self.admission = admission or AdmissionLimits()
        self.metrics = metrics  # the engine's figures are read on scrape
        self.bus = bus
        self.store = store
        self.worker_id = worker_id or uuid.uuid4().hex[:12]
        self.queues = queues or Queues()
        self.queue = self.queues.worker(self.worker_id)
        self.heartbeat_s = heartbeat_s
        self.registry = WorkerRegistry(store, heartbeat_s)
        self.prefix_index = PrefixIndex(store)
        self._inflight: dict[str, _Inflight] = {}
        self._gateways: set[str] = set()  # reply queues this worker has answered
        self._draining = False  # after drain(): takes no new requests
        self._drained = False
        self._stall = StallWatch(self.worker_id, stall_timeout_s)
        self.state: WorkerStatus = "ready"  # "draining", "stalled"
        # (reply queue, body, request ids in it: aborted when their gateway is gone)
        self._publish_q: asyncio.Queue[tuple[str, bytes, list[str]]] = asyncio.Queue()
        self._index_q: asyncio.Queue[tuple[list[bytes], list[bytes]]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._sub: Subscription | None = None
        # set a few heartbeats after the engine stopped on an error, once gateways have read
        # "stalled" and moved its requests: the process then exits 1, to be restarted
        self.failed = asyncio.Event()
        self._dead_beats = 0

    async def start(self) -> None:
        self.engine.set_sink(self._on_step, self._on_reject)
        self.engine.start()
        await self.bus.declare_work_queue(self.queue)
        self._tasks = [
            asyncio.create_task(self._publisher(), name="worker-publisher"),
            asyncio.create_task(self._indexer(), name="worker-indexer"),
            asyncio.create_task(self._heartbeat(), name="worker-heartbeat"),
            asyncio.create_task(self._expire_queued(), name="worker-queue-timeout"),
        ]
        await self._beat()  # registered before the first message can arrive
        if self.metrics is not None:
            self.metrics.engines().add(self.worker_id, self.engine)
        self._sub = await self.bus.consume(self.queue, self._on_message, prefetch=256)
        logger.info("worker %s ready on %s (%s)", self.worker_id, self.queue, self.engine.model_name)

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.cancel()
        if self._drained:  # a replacement has its own id: this queue would stay on the broker
            await self._delete_queue()
        if self.metrics is not None:
            self.metrics.engines().remove(self.worker_id)
        with contextlib.suppress(Exception):
            if self._drained:  # gateways wait for our WorkerLeaving notice, not for a lost heartbeat
                tombstone = heartbeat_of(self.engine, self.worker_id, "stopped")
                await self.registry.leave(tombstone, linger_s=max(10.0, 30 * self.heartbeat_s))
            else:
                await self.registry.remove(self.worker_id)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.engine.shutdown()

    async def drain(self, timeout_s: float) -> None:
        """Take no new requests (they go back to the scheduler), finish the running ones for up to
        `timeout_s`, then deregister. Requests still running then are moved by their gateways."""
        self._draining = True
        self.state = "draining"
        with contextlib.suppress(Exception):
            await self._beat()
        announced = time.monotonic()
        deadline = announced + timeout_s
        logger.info("worker %s draining: %d requests running", self.worker_id, len(self._inflight))
        while self._inflight and time.monotonic() < deadline and self.engine.dead_reason is None:
            await asyncio.sleep(0.05)
        # Schedulers re-read the registry every heartbeat/4, so one may route here shortly after
        # the announcement. Stay on the queue a heartbeat (handing those back) so that none lands
        # in it after we stop consuming: an idle worker's drain would otherwise end at once.
        await asyncio.sleep(max(0.0, min(announced + self.heartbeat_s, deadline) - time.monotonic()))
        if self._inflight:
            figures = self.engine.counters()
            logger.warning(
                "worker %s: %d requests still running after %.1fs (engine: %d running, %d waiting, "
                "%d steps, step thread %s); their gateways move them",
                self.worker_id, len(self._inflight), timeout_s, figures.num_running, self.engine.num_waiting,
                self.engine.steps, "alive" if self.engine.is_ready() else "gone",
            )  # fmt: skip
        with contextlib.suppress(TimeoutError):  # let the last deltas go out
            await asyncio.wait_for(self._publish_q.join(), max(1.0, deadline - time.monotonic()))
        leaving = encode(WorkerLeaving(worker_id=self.worker_id))
        for reply_to in self._gateways:  # after the last deltas, in each reply queue
            with contextlib.suppress(Exception):
                await self.bus.publish(reply_to, leaving)
        self._drained = True

    async def _delete_queue(self) -> None:
        """After a drain: no scheduler routes here any more; a request that still came (or is still
        unacked here) stays in the queue for a worker of this id, and the queue with it."""
        try:
            deleted = await self.bus.delete_work_queue(self.queue)
        except Exception as exc:
            logger.warning("worker %s: could not delete its queue %s: %s", self.worker_id, self.queue, exc)
            return
        if deleted:
            logger.info("worker %s: deleted its queue %s", self.worker_id, self.queue)
        else:
            logger.warning(
                "worker %s: kept its queue %s: requests arrived after the drain", self.worker_id, self.queue
            )

    # -- input --------------------------------------------------------------------------------
    async def _on_message(self, message: Delivery) -> None:
        try:
            msg = decode(message.body)
        except MessageError as exc:
            logger.warning("worker %s: dropped a malformed message: %s", self.worker_id, exc)
            return
        if isinstance(msg, WorkerRequest):
            taking = not self._draining and self.engine.dead_reason is None
            if not taking and msg.request_id not in self._inflight:
                await self._bounce(msg)
            elif (refused := await ensure_adapter(self.engine, msg)) is not None:
                self._send_rejected(msg.reply_to, msg.request_id, 400, refused)
            else:
                self._add(msg, message.headers)
        elif isinstance(msg, AbortRequest):
            for rid in msg.request_ids:
                await self.engine.abort(rid)
        else:
            logger.warning("worker %s: dropped an unexpected %s message", self.worker_id, msg.type)

    async def _bounce(self, msg: WorkerRequest) -> None:
        """A request routed here before the scheduler saw this worker draining (or its engine
        stopped): route it again."""
        again = ScheduleRequest(**msg.model_dump(exclude={"type", "attempt"}), attempt=msg.attempt + 1)
        await self.bus.publish(self.queues.schedule, encode(again))
        why = "draining" if self._draining else "engine stopped"
        logger.info("worker %s %s: %s handed back to the scheduler", self.worker_id, why, msg.request_id)

    def _add(self, msg: WorkerRequest, headers: dict[str, str]) -> None:
        if msg.request_id in self._inflight:
            logger.info("worker %s: duplicate delivery of %s ignored", self.worker_id, msg.request_id)
            return
        state = self._state()
        if not has_room(state, self.admission, msg.priority, seqs=msg.sampling.n):
            why = "has a full queue" if queued(state, msg.sampling.n) else "is prefilling in a busy batch"
            err = fleet_saturated(f"worker {self.worker_id} {why}")
            self._send_rejected(msg.reply_to, msg.request_id, err.status, err.message, RETRY_AFTER_S)
            logger.info("worker %s: refused %s, it %s", self.worker_id, msg.request_id, why)
            return
        try:
            params = msg.sampling.to_params()
            self.engine.submit(
                msg.request_id, msg.prompt_token_ids, params, priority=msg.priority,
                cache_salt=msg.cache_salt, resume_from=msg.resume_from, lora_name=msg.lora_name,
            )  # fmt: skip
        except ValueError as exc:
            self._send_rejected(msg.reply_to, msg.request_id, 400, str(exc))
            return
        trace = tracing.worker_request(headers, self.engine.model_name, params, len(msg.prompt_token_ids))
        now = time.monotonic()
        deadline = queue_deadline(msg.arrival_time, msg.queue_timeout_s, time.time(), now)
        self._inflight[msg.request_id] = _Inflight(
            msg.reply_to, params.n, now, trace, deadline=deadline, timeout_s=msg.queue_timeout_s
        )
        self._gateways.add(msg.reply_to)

    def _state(self) -> WorkerState:
        counters = self.engine.counters()
        return WorkerState(
            self.worker_id,
            num_running=counters.num_running,
            num_waiting=self.engine.num_waiting,
            max_num_seqs=self.engine.capacity.max_num_seqs,
            num_prefilling=counters.num_prefilling,
        )

    async def _expire_queued(self) -> None:
        """Fail the requests that have not started by their deadline (see admission.py)."""
        while True:
            await asyncio.sleep(0.25)
            try:
                await self._expire_queued_once()
            except Exception:  # the loop must outlive any bug, or no queued request times out
                logger.exception("worker %s: expiring queued requests failed", self.worker_id)

    async def _expire_queued_once(self) -> None:
        now = time.monotonic()
        for rid, req in list(self._inflight.items()):
            if req.deadline is not None and now >= req.deadline:
                del self._inflight[rid]
                await self.engine.abort(rid)
                err = queue_timed_out(req.timeout_s or 0.0)
                self._send_rejected(req.reply_to, rid, err.status, err.message, RETRY_AFTER_S)
                logger.info("worker %s: %s timed out in the queue", self.worker_id, rid)

    # -- output -------------------------------------------------------------------------------
    def _on_step(self, outputs: list[RequestOutput], stored: list[bytes], evicted: list[bytes]) -> None:
        """On the event loop after each engine step: one message per gateway."""
        by_gateway: dict[str, list[TokenDelta]] = defaultdict(list)
        for out in outputs:
            req = self._inflight.get(out.request_id)
            if req is None:
                continue
            req.deadline = None  # it started
            by_gateway[req.reply_to].append(TokenDelta.of(out))
            req.trace.output(out)
            if req.first_token is None and out.new_token_ids:
                req.first_token, req.queue_s = time.monotonic(), out.queue_time_s
            if out.finished:
                req.remaining -= 1
                if req.remaining == 0:
                    self._finish(out, req)
        for reply_to, deltas in by_gateway.items():
            body = encode(StepOutputs(worker_id=self.worker_id, deltas=deltas))
            self._publish_q.put_nowait((reply_to, body, [d.request_id for d in deltas if not d.finished]))
        if stored or evicted:
            self._index_q.put_nowait((stored, evicted))

    def _on_reject(self, request_id: str, exc: ValueError) -> None:
        """The step thread refused a request it took in (e.g. its id already runs there)."""
        req = self._inflight.pop(request_id, None)
        if req is None:
            return
        req.trace.end(str(exc))
        self._send_rejected(req.reply_to, request_id, 400, str(exc))
        logger.info("worker %s: the engine refused %s: %s", self.worker_id, request_id, exc)

    def _send_rejected(
        self, reply_to: str, request_id: str, status: int, message: str, retry_after_s: int | None = None
    ) -> None:
        """Tell the request's gateway that it will not run (it answers the client with `status`)."""
        reject = Rejected(request_id=request_id, status=status, message=message, retry_after_s=retry_after_s)
        self._publish_q.put_nowait((reply_to, encode(reject), []))

    def _finish(self, out: RequestOutput, req: _Inflight) -> None:
        del self._inflight[out.request_id]
        req.trace.end()
        if self.metrics is not None:
            self.metrics.worker().observe(
                self.engine.model_name, self.worker_id, req.started, req.queue_s, req.first_token
            )
        logger.info(
            "request %s finished (%s) prompt_tokens=%d cached=%d output_tokens=%d in %.3fs",
            out.request_id, out.finish_reason, out.num_prompt_tokens, out.num_cached_tokens,
            out.num_output_tokens, time.monotonic() - req.started,
        )  # fmt: skip

    async def _publisher(self) -> None:
        while True:
            reply_to, body, request_ids = await self._publish_q.get()
            try:
                await self.bus.publish(reply_to, body)
            except Exception as exc:  # a gateway that went away must not stop the others
                logger.warning("worker %s: could not publish to %s: %s", self.worker_id, reply_to, exc)
                if isinstance(exc, QueueNotFoundError):  # the gateway is gone: nobody reads these
                    for rid in request_ids:
                        await self.engine.abort(rid)
            finally:
                self._publish_q.task_done()

    async def _indexer(self) -> None:
        while True:
            stored, evicted = await self._index_q.get()
            try:
                await self.prefix_index.update(self.worker_id, stored, evicted)
            except Exception as exc:  # the index is advisory: routing degrades, requests run
                logger.warning("worker %s: prefix index update failed: %s", self.worker_id, exc)

    # -- liveness -----------------------------------------------------------------------------
    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            try:
                await self._beat()
            except Exception as exc:
                logger.warning("worker %s: heartbeat failed: %s", self.worker_id, exc)

    async def _beat(self) -> None:
        self.state = self._check_stall()
        await drop_unregistered(self.engine, self.store)
        known = await self.registry.beat(heartbeat_of(self.engine, self.worker_id, self.state))
        if self.engine.dead_reason is not None:
            self._dead_beats += 1
            if self._dead_beats == DEAD_BEATS_BEFORE_EXIT:
                self.failed.set()
        if not known:  # first beat, or the store lost its data: publish the whole index again
            hashes = self.engine.cached_block_hashes()
            await self.prefix_index.update(self.worker_id, hashes, [])
            logger.info(
                "worker %s registered; published its prefix index (%d cached blocks)",
                self.worker_id, len(hashes),
            )  # fmt: skip

    def _check_stall(self) -> WorkerStatus:
        return self._stall.check(self.engine, self.state, self._draining, len(self._inflight))

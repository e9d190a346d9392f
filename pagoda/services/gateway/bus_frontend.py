"""The gateway's side of the bus: a `Frontend` that sends requests to the tokenizer tier and
reads token deltas from its own reply queue.

Each gateway has one exclusive reply queue. Workers send it one `StepOutputs` per step with the
new tokens of all its requests; the tokenizer or the scheduler may send `Rejected`. The scheduler's
first `Assigned` says the request was taken, with its prompt ids and the worker that runs it (a
later one, or a request's first delta, moves it to another worker); aborts go there. It watches
those workers' heartbeats: a request whose worker is lost is continued on another one
(`failover.py`), or ends with a clear error. Losing the broker
connection ends every open request with a clear error (their tokens could not reach us).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from pagoda.engine import PoolerConfig, RequestOutput, SamplingParams, Tokenizer
from pagoda.services.gateway.adapters import Adapter
from pagoda.services.gateway.failover import RequestTrack, WorkerWatch
from pagoda.services.gateway.frontend import Sink, Submitted
from pagoda.services.gateway.mailbox import Mailbox
from pagoda.services.ops import tracing
from pagoda.services.scheduler.admission import first_output, first_output_wait
from pagoda.services.scheduler.registry import WorkerRegistry, routable
from pagoda.services.transport.bus import Bus, Delivery, Subscription
from pagoda.services.transport.errors import APIError
from pagoda.services.transport.messages import (
    AbortRequest,
    Assigned,
    MessageError,
    PromptInput,
    Queues,
    Rejected,
    SamplingSpec,
    StepOutputs,
    TokenDelta,
    TokenizeRequest,
    WorkerLeaving,
    decode,
    encode,
)

logger = logging.getLogger("pagoda.gateway")


@dataclass
class _Pending:
    accepted: asyncio.Future[list[int]]
    track: RequestTrack
    outputs: Mailbox[RequestOutput | BaseException] = field(default_factory=Mailbox)
    aborted: bool = False
    streaming: bool = False  # someone iterates the outputs (and cleans up after them)
    trace: tracing.TraceHandle = tracing.NOOP
    sink: Sink | None = None  # the stream's (Submitted.set_sink)
    parked: bool = False  # the stream waits on `outputs` past its first output: the sink may take one

    def set_sink(self, sink: Sink | None) -> None:
        self.sink = sink

    def deliver(self, delta: TokenDelta) -> None:
        """Hand `delta` to the stream's sink when it waits with nothing queued (no task wake-up,
        and no `RequestOutput`, per token), else queue it as an output. Finished outputs, and
        those with log-probs, are always queued: the stream ends on them, or writes them."""
        sink = self.sink
        if (
            sink is not None and self.parked and not (delta.finished or self.aborted)
            and delta.logprobs is None and self.outputs.empty()
        ):  # fmt: skip
            try:
                taken = sink(delta.new_token_ids, delta.num_output_tokens, delta.num_cached_tokens)
            except Exception as exc:  # the stream raises it (an error event), the others go on
                self.sink = None
                self.outputs.put_nowait(exc)
                return
            if taken:
                if self.trace is not tracing.NOOP:
                    self.trace.output(delta.to_output())
                return
        self.outputs.put_nowait(delta.to_output())


class BusFrontend:
    def __init__(
        self,
        bus: Bus,
        tokenizer: Tokenizer,
        *,
        model_name: str,
        max_model_len: int,
        default_sampling: dict[str, float] | None = None,
        pooler: PoolerConfig | None = None,
        gateway_id: str | None = None,
        accept_timeout_s: float = 30.0,
        queues: Queues | None = None,
        registry: WorkerRegistry | None = None,
        queue_timeout_s: float | None = None,
    ) -> None:
        self.bus = bus
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.default_sampling = dict(default_sampling or {})
        self.pooler = pooler  # an embedding model's pooling (--task embed); None: it generates
        self.gateway_id = gateway_id or uuid.uuid4().hex[:12]
        self.queues = queues or Queues()
        self.reply_queue = self.queues.reply(self.gateway_id)
        self.tokenize_queue = self.queues.tokenize(model_name)
        self.accept_timeout_s = accept_timeout_s
        self.queue_timeout_s = queue_timeout_s  # workers fail a request not started by then
        self._pending: dict[str, _Pending] = {}
        self._sub: Subscription | None = None
        self._ready = False
        self.registry = registry
        self._workers_alive = registry is None
        self._watch: asyncio.Task[None] | None = None
        self._lost = WorkerWatch(grace_s=2 * (registry.heartbeat_s if registry is not None else 1.0))

    async def start(self) -> None:
        await self.bus.declare_work_queue(self.tokenize_queue)
        await self.bus.declare_reply_queue(self.reply_queue)
        self._sub = await self.bus.consume(self.reply_queue, self._on_reply, prefetch=512)
        self.bus.on_connection_lost(self._on_bus_lost)
        self._ready = True
        if self.registry is not None:
            await self._check_workers()
            self._watch = asyncio.create_task(self._watch_workers(), name="gateway-watch-workers")
        logger.info("gateway %s reading replies on %s", self.gateway_id, self.reply_queue)

    async def stop(self) -> None:
        self._ready = False
        if self._watch is not None:
            self._watch.cancel()
        if self._sub is not None:
            await self._sub.cancel()
        for p in self._pending.values():
            if not p.accepted.done():
                p.accepted.set_exception(APIError(503, "The gateway is shutting down."))
            p.outputs.put_nowait(APIError(503, "The gateway is shutting down."))

    def is_ready(self) -> bool:
        """Started, and at least one worker of this model heartbeating (when a registry is given)."""
        return self._ready and self._workers_alive

    async def _check_workers(self) -> None:
        assert self.registry is not None
        try:
            workers = await self.registry.alive()
        except Exception as exc:  # the store is down: requests keep running; keep the last verdict
            logger.warning("gateway: cannot read the worker registry: %s", exc)
            return
        self._workers_alive = any(w.model == self.model_name for w in routable(workers))
        states: dict[str, str] = {w.worker_id: w.state for w in workers}
        watched = {
            p.track.worker_id for p in self._pending.values() if p.track.worker_id and not p.track.awaiting
        }
        lost = self._lost.update(states, {w for w in watched if w is not None})
        for rid, pending in list(self._pending.items()):
            wid = pending.track.worker_id
            if wid in lost and not pending.track.awaiting and not pending.aborted:
                why = "stalled" if states.get(wid) == "stalled" else "stopped sending heartbeats"
                await self._fail_over(rid, pending, f"worker {wid} {why}")

    async def _fail_over(self, request_id: str, pending: _Pending, why: str) -> None:
        cont = pending.track.continuation()
        if isinstance(cont, str):
            logger.warning("request %s: %s and %s; failing it", request_id, why, cont)
            pending.outputs.put_nowait(APIError(503, f"The request was lost: {why}, and {cont}."))
            return
        logger.info(
            "request %s: %s after %d tokens; continuing it elsewhere (attempt %d)",
            request_id, why, cont.resume_from, cont.attempt,
        )  # fmt: skip
        try:
            await self.bus.publish(self.queues.schedule, encode(cont))
        except Exception as exc:
            pending.outputs.put_nowait(
                APIError(503, f"The request was lost: {why}, and it could not be resent ({exc}).")
            )

    def _on_bus_lost(self, reason: str) -> None:
        """The broker connection dropped: replies sent meanwhile are gone, so end every request."""
        if not self._pending:
            return
        logger.warning(
            "gateway: lost the broker connection (%s): ending %d requests", reason, len(self._pending)
        )
        err = APIError(
            503, f"The gateway lost its connection to the message broker ({reason}); retry the request."
        )
        for pending in self._pending.values():
            if not pending.accepted.done():
                pending.accepted.set_exception(err)
            else:
                pending.outputs.put_nowait(err)

    async def _watch_workers(self) -> None:
        assert self.registry is not None
        while True:
            await asyncio.sleep(self.registry.heartbeat_s / 2)
            try:
                await self._check_workers()
            except Exception:  # this loop moves lost workers' requests: it must outlive any bug
                logger.exception("gateway: checking the workers failed")

    async def submit(
        self,
        request_id: str,
        prompt: PromptInput,
        params: SamplingParams,
        *,
        priority: int = 0,
        cache_salt: str | None = None,
        session_id: str | None = None,
        lora: Adapter | None = None,
    ) -> Submitted:
        if request_id in self._pending:
            raise APIError(400, f"request id {request_id!r} is already running")
        msg = TokenizeRequest(
            request_id=request_id, reply_to=self.reply_queue, model=self.model_name, prompt=prompt,
            lora_name=None if lora is None else lora.name, lora_path=None if lora is None else lora.path,
            sampling=SamplingSpec.of(params),
            priority=priority, cache_salt=cache_salt, session_id=session_id, arrival_time=time.time(),
            queue_timeout_s=self.queue_timeout_s,
        )  # fmt: skip
        pending = _Pending(asyncio.get_running_loop().create_future(), RequestTrack(msg, params.n))
        chat = prompt.messages is not None
        pending.trace = tracing.gateway_request(request_id, self.model_name, chat, params)
        self._pending[request_id] = pending
        try:
            try:
                await self.bus.publish(self.tokenize_queue, encode(msg), pending.trace.headers())
            except Exception as exc:  # the broker is unreachable (or restarting)
                logger.warning("gateway: could not send %s to the tokenizer: %s", request_id, exc)
                raise APIError(503, "The message broker is unavailable; retry shortly.") from None
            ids = await asyncio.wait_for(pending.accepted, self.accept_timeout_s)
        except TimeoutError:
            self._pending.pop(request_id, None)
            pending.trace.end("no tokenizer or scheduler answered")
            text = "No tokenizer or scheduler answered in time; the service is unavailable."
            raise APIError(503, text) from None
        except BaseException as exc:
            self._pending.pop(request_id, None)
            pending.trace.end(exc)
            raise
        pending.trace.set("gen_ai.usage.input_tokens", len(ids))
        return Submitted(
            ids,
            self._stream(request_id, pending, params.n),
            backlog=lambda: not pending.outputs.empty(),
            set_sink=pending.set_sink,
        )

    async def _stream(self, request_id: str, pending: _Pending, n: int) -> AsyncIterator[RequestOutput]:
        remaining = n
        pending.streaming = True
        error: BaseException | None = None
        first_wait = first_output_wait(self.queue_timeout_s)
        try:
            while remaining:
                if pending.track.worker_id is None and first_wait is not None:  # nothing heard of it yet
                    item = await first_output(pending.outputs, first_wait)
                else:
                    pending.parked = True
                    try:
                        item = await pending.outputs.get()
                    finally:
                        pending.parked = False
                if isinstance(item, BaseException):
                    error = item
                    raise item
                pending.trace.output(item)
                if item.finished:
                    remaining -= 1
                yield item
        finally:
            if remaining:
                await self.abort(request_id)
            self._pending.pop(request_id, None)
            pending.trace.end(error if error is not None else ("aborted" if remaining else None))

    async def abort(self, request_id: str) -> None:
        pending = self._pending.get(request_id)
        if pending is None or pending.aborted:
            return
        pending.aborted = True
        if pending.track.worker_id is not None:  # else: sent when the worker is known
            await self._send_abort(pending.track.worker_id, request_id)

    async def _send_abort(self, worker_id: str, request_id: str) -> None:
        try:
            await self.bus.publish(
                self.queues.worker(worker_id), encode(AbortRequest(request_ids=[request_id]))
            )
        except Exception as exc:
            logger.warning("gateway: could not abort %s on %s: %s", request_id, worker_id, exc)

    async def _on_reply(self, message: Delivery) -> None:
        try:
            msg = decode(message.body)
        except MessageError as exc:
            logger.warning("gateway: dropped a malformed reply: %s", exc)
            return
        if isinstance(msg, StepOutputs):
            for delta in msg.deltas:
                pending = self._pending.get(delta.request_id)
                if pending is None:
                    if not delta.finished:  # e.g. a duplicate run, or a request we gave up on
                        await self._send_abort(msg.worker_id, delta.request_id)
                    continue
                known = pending.track.worker_id is not None
                shown = pending.track.accept(msg.worker_id, delta)
                if not known and pending.aborted:
                    await self._send_abort(msg.worker_id, delta.request_id)
                if pending.aborted and not pending.streaming:  # abandoned before it was read
                    self._pending.pop(delta.request_id, None)
                    continue
                if shown is not None:
                    pending.deliver(shown)
        elif isinstance(msg, Assigned):
            pending = self._pending.get(msg.request_id)
            if pending is None:
                return
            if msg.prompt_token_ids is not None and not pending.accepted.done():  # taken: the first one
                pending.track.prompt_token_ids = list(msg.prompt_token_ids)
                pending.accepted.set_result(msg.prompt_token_ids)
            superseded = pending.track.assign(msg)
            if superseded is not None:
                await self._send_abort(superseded, msg.request_id)
            if pending.aborted:
                await self._send_abort(msg.worker_id, msg.request_id)
        elif isinstance(msg, WorkerLeaving):  # every delta it sent us was read before this
            for rid, pending in list(self._pending.items()):
                track = pending.track
                if track.worker_id == msg.worker_id and not track.awaiting and not pending.aborted:
                    await self._fail_over(rid, pending, f"worker {msg.worker_id} shut down")
        elif isinstance(msg, Rejected):
            pending = self._pending.get(msg.request_id)
            if pending is None:
                return
            retry = {"Retry-After": str(msg.retry_after_s)} if msg.retry_after_s else None
            err = APIError(msg.status, msg.message, param=msg.param, headers=retry)
            if pending.aborted and not pending.streaming:
                self._pending.pop(msg.request_id, None)
            if not pending.accepted.done():
                pending.accepted.set_exception(err)
            else:
                pending.outputs.put_nowait(err)
        else:
            logger.warning("gateway: dropped an unexpected %s reply", msg.type)

"""AsyncEngine: the engine core stepped in its own thread, fed and drained from asyncio.

The caller's event loop never runs a model step. `add_request` returns an async iterator of
RequestOutput deltas; leaving it early aborts the request (its blocks are freed next step).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sys
import threading
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol, TypeVar

from pagoda.engine.config import EngineConfig
from pagoda.engine.core.engine_core import CoreCounters, EngineCore, StepStats
from pagoda.engine.kv.kv_cache_manager import KVCacheManager
from pagoda.engine.outputs import RequestOutput
from pagoda.engine.sampling.params import SamplingParams
from pagoda.engine.tokenization.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    pass


# Called on the sink's event loop after every step: (outputs, block hashes stored, evicted).
StepSink = Callable[[list[RequestOutput], list[bytes], list[bytes]], None]
# Called on the sink's event loop when the step thread refuses a submitted request: (id, why).
RejectSink = Callable[[str, ValueError], None]


class StepCore(Protocol):
    """What AsyncEngine and the worker use of a core: `EngineCore`, or `SimCore` (no model). All
    methods run on the step thread; `counters()` and the attributes are also read from others."""

    model_name: str
    max_model_len: int
    tokenizer: Tokenizer
    default_sampling: dict[str, float]
    config: EngineConfig
    kv: KVCacheManager
    num_blocks: int
    last_stats: StepStats

    def check_prompt(self, prompt_token_ids: list[int], params: SamplingParams) -> None: ...

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        priority: int = 0,
        cache_salt: str | None = None,
        arrival_time: float | None = None,
    ) -> None: ...

    def abort(self, request_ids: list[str]) -> list[RequestOutput]: ...

    def has_unfinished(self) -> bool: ...

    def step(self) -> list[RequestOutput]: ...

    def counters(self) -> CoreCounters: ...


T = TypeVar("T")


def build_off_main_thread(build: Callable[[], T]) -> T:
    """`build()` (loading a model: every large torch op) run in a thread of its own that then
    exits; its result returned, its exception raised.

    Why: GNU OpenMP keeps a thread pool for each thread that ever ran a parallel region, and once
    the pools hold more threads than there are cores it stops spin-waiting between regions, so
    every small op of the step thread waits for a futex wake-up. Measured on 2 cores: a 16-row
    bf16 linear took 0.075 ms in a step thread, 0.19 ms once another thread had run a parallel op
    (a served 16-stream decode step 72 ms against 48 offline: the services loaded the model in an
    `asyncio.to_thread` worker, which lives on in the loop's executor). A pool dies with its
    thread: loading here leaves the step thread's pool the only one. No other thread of a serving
    process may run large torch ops afterwards."""
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(build())
        except BaseException as exc:  # raised again in the caller
            error.append(exc)

    # a daemon: a SIGTERM that ends the main thread during a long load (--compile) is not held up
    thread = threading.Thread(target=run, name="pagoda-load", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


class AsyncEngine:
    def __init__(self, core: StepCore) -> None:
        self.core = core
        self.model_name = core.model_name
        self.max_model_len = core.max_model_len
        self.tokenizer = core.tokenizer
        self.default_sampling = core.default_sampling
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[Any]]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._dead: BaseException | None = None
        self._sink: tuple[asyncio.AbstractEventLoop, StepSink] | None = None
        self._reject: RejectSink | None = None
        self._sink_failed = False
        self.steps = 0

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncEngine:
        return cls(build_off_main_thread(lambda: EngineCore(config)))

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            # The step thread and the event loop share the GIL. With Python's default 5 ms switch
            # interval a small-batch step waits on the loop's turns: single-stream ITL measured
            # 33.6 ms at the default against 23.1 ms at 0.5 ms (int4, demo model); 16 streams
            # unchanged (162.9 vs 165.6 tok/s).
            sys.setswitchinterval(min(sys.getswitchinterval(), 0.0005))
            self._thread = threading.Thread(target=self._run, name="pagoda-engine", daemon=True)
            self._thread.start()

    async def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10.0)
            self._thread = None

    def is_ready(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._dead is None

    def set_sink(self, sink: StepSink, reject: RejectSink | None = None) -> None:
        """Send every step's outputs (and prefix-cache events) to `sink` on the caller's loop,
        instead of per-request iterators: how a worker publishes one message per gateway. A
        submitted request that the core refuses when it takes it in goes to `reject`."""
        self._sink = (asyncio.get_running_loop(), sink)
        self._reject = reject

    def submit(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        priority: int = 0,
        cache_salt: str | None = None,
    ) -> None:
        """Add a request whose outputs go to the sink. Raises ValueError for a bad request."""
        if self._dead is not None:
            raise EngineDeadError(f"the engine stopped after an error: {self._dead}")
        self.core.check_prompt(prompt_token_ids, params)
        self.start()
        self._inbox.put(("add", (request_id, prompt_token_ids, params, priority, cache_salt)))
        self._wake.set()

    @property
    def num_waiting(self) -> int:
        """Sequences waiting in the core's queue, plus messages (adds, aborts) not yet taken in."""
        return self.core.counters().num_waiting + self._inbox.qsize()

    @property
    def dead_reason(self) -> BaseException | None:
        return self._dead

    # -- requests ---------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        priority: int = 0,
        cache_salt: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        if self._dead is not None:
            raise EngineDeadError(f"the engine stopped after an error: {self._dead}")
        self.core.check_prompt(prompt_token_ids, params)
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[Any] = asyncio.Queue()
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already running")
            self._streams[request_id] = (loop, q)
        self.start()
        self._inbox.put(("add", (request_id, prompt_token_ids, params, priority, cache_salt)))
        self._wake.set()
        return self._stream(request_id, q, params.n)

    async def _stream(self, request_id: str, q: asyncio.Queue[Any], n: int) -> AsyncIterator[RequestOutput]:
        remaining = n
        try:
            while remaining:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                for out in item:
                    if out.finished:
                        remaining -= 1
                    yield out
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if remaining:
                self._inbox.put(("abort", request_id))
                self._wake.set()

    async def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wake.set()

    # -- the step thread ----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # the engine's state is unknown now: fail everything
            logger.exception("engine step failed")
            self._dead = exc
            self._fail_all(EngineDeadError(f"engine step failed: {exc}"))

    def _loop(self) -> None:
        """Every exception here ends the thread through `_run`, the engine marked dead: a thread
        that died quietly would leave its requests running forever in the worker's eyes."""
        core = self.core
        while not self._stopping and self._dead is None:
            self._drain_inbox()
            if not core.has_unfinished():
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            outputs = core.step()
            self._deliver(outputs)
            if self._sink is not None:
                stored, evicted = core.kv.pool.drain_events()
                self._sink[0].call_soon_threadsafe(self._to_sink, outputs, stored, evicted)
            if core.last_stats.num_scheduled_tokens:
                self.steps += 1
            else:
                # Requests wait but none could be scheduled (no KV room, nothing running to free
                # any): not progress, which the worker's stall check must see (counted, it looked
                # healthy forever), and no reason to spin; an abort or a new request wakes us.
                self._wake.wait(0.05)
                self._wake.clear()

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, arg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                rid, ids, params, priority, salt = arg
                try:
                    self.core.add_request(rid, ids, params, priority=priority, cache_salt=salt)
                except ValueError as exc:
                    self._deliver_error(rid, exc)
            else:
                aborted = self.core.abort([arg])
                self._deliver(aborted)
                if self._sink is not None and aborted:
                    self._sink[0].call_soon_threadsafe(self._to_sink, aborted, [], [])

    def _to_sink(self, outputs: list[RequestOutput], stored: list[bytes], evicted: list[bytes]) -> None:
        """On the sink's loop. A sink that raises lost a step's outputs: its requests would wait
        forever for them, so the engine stops (the worker reports it and its requests move). The
        steps already taken after that one are dropped too: their tokens would follow a gap."""
        assert self._sink is not None
        if self._sink_failed:
            return
        try:
            self._sink[1](outputs, stored, evicted)
        except Exception as exc:
            logger.exception("the step sink failed; stopping the engine")
            self._sink_failed = True
            if self._dead is None:
                self._dead = exc
                self._wake.set()

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, dict[str, list[RequestOutput]]] = defaultdict(
            lambda: defaultdict(list)
        )
        with self._lock:
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    by_loop[stream[0]][out.request_id].append(out)
            targets = {rid: self._streams[rid][1] for per in by_loop.values() for rid in per}
        for loop, per_request in by_loop.items():
            batch = [(targets[rid], outs) for rid, outs in per_request.items()]
            loop.call_soon_threadsafe(_put_all, batch)

    def _deliver_error(self, request_id: str, exc: ValueError) -> None:
        with self._lock:
            stream = self._streams.get(request_id)
        if stream is not None:
            stream[0].call_soon_threadsafe(stream[1].put_nowait, exc)
        elif self._sink is not None and self._reject is not None:
            self._sink[0].call_soon_threadsafe(self._reject, request_id, exc)
        else:
            logger.warning("request %s refused with nobody to tell: %s", request_id, exc)

    def _fail_all(self, exc: BaseException) -> None:
        with self._lock:
            streams = list(self._streams.values())
        for loop, q in streams:
            loop.call_soon_threadsafe(q.put_nowait, exc)


def _put_all(batch: list[tuple[asyncio.Queue[Any], list[RequestOutput]]]) -> None:
    for q, outs in batch:
        q.put_nowait(outs)

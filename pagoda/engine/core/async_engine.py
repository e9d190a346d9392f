"""AsyncEngine: the engine core stepped in its own thread, fed and drained from asyncio.

The caller's event loop never runs a model step. Outputs take one path: after every step the
thread hands them to the engine's one step sink, on the event loop that set it. A worker sets its
own sink (`set_sink`) and feeds requests with `submit`; `add_request` installs `RequestStreams` as
the sink instead and returns an async iterator of one request's RequestOutput deltas (leaving it
early aborts the request; its blocks are freed next step).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import sys
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from pagoda.engine.core.request_streams import RequestStreams
from pagoda.engine.core.stats import CoreCounters, EngineCapacity, StepStats
from pagoda.engine.outputs import RequestOutput
from pagoda.engine.sampling.params import SamplingParams
from pagoda.engine.tokenization.tokenizer import Tokenizer

if TYPE_CHECKING:  # the model code (torch) loads only when a real core is built
    from pagoda.engine.config import EngineConfig
    from pagoda.engine.lora.request import LoRARequest
    from pagoda.engine.pooling.params import PoolerConfig

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    pass


# Called on the sink's event loop after every step: (outputs, block hashes stored, evicted).
StepSink = Callable[[list[RequestOutput], list[bytes], list[bytes]], None]
# Called on the sink's event loop when the step thread refuses a submitted request: (id, why).
RejectSink = Callable[[str, ValueError], None]
# Called on the sink's event loop once, when the step thread died: no output follows.
DeadSink = Callable[[BaseException], None]


@dataclass(frozen=True)
class _Sink:
    loop: asyncio.AbstractEventLoop
    on_step: StepSink
    on_reject: RejectSink | None
    on_dead: DeadSink | None


class StepCore(Protocol):
    """What AsyncEngine uses of a core: `EngineCore`, or `SimCore` (no model). All methods run on
    the step thread, except `counters()` and `cached_block_hashes()` (snapshots, safe from any
    thread); the attributes are read from others too."""

    model_name: str
    max_model_len: int
    tokenizer: Tokenizer
    default_sampling: dict[str, float]
    capacity: EngineCapacity
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
        resume_from: int = 0,
        lora_request: str | None = None,
    ) -> None: ...

    def abort(self, request_ids: list[str]) -> list[RequestOutput]: ...

    def load_lora(self, name: str, path: str) -> LoRARequest: ...

    def remove_lora(self, name: str) -> bool: ...

    def list_loras(self) -> list[str]: ...

    def has_unfinished(self) -> bool: ...

    def step(self) -> list[RequestOutput]: ...

    def counters(self) -> CoreCounters: ...

    def cached_block_hashes(self) -> list[bytes]: ...

    def drain_cache_events(self) -> tuple[list[bytes], list[bytes]]: ...


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
    """A `StepCore` stepped in a thread of its own. Every method runs on the caller's event loop
    (the one that set the sink); only the core's own methods run on the step thread."""

    def __init__(self, core: StepCore) -> None:
        self.core = core
        self.model_name = core.model_name
        self.max_model_len = core.max_model_len
        self.tokenizer = core.tokenizer
        self.default_sampling = core.default_sampling
        # an embedding model's pooling (EngineCore's; simulated and test cores generate)
        self.pooler: PoolerConfig | None = getattr(core, "pooler", None)
        self.capacity = core.capacity
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._dead: BaseException | None = None
        self._sink: _Sink | None = None
        self._sink_failed = False
        self._streams: RequestStreams | None = None  # the sink, once add_request was called
        self.steps = 0
        self._loras: list[str] = core.list_loras()  # a snapshot, renewed by load_lora/unload_lora

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncEngine:
        from pagoda.engine.core.engine_core import EngineCore

        return cls(build_off_main_thread(lambda: EngineCore(config, background_compile=True)))

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

    def set_sink(
        self, on_step: StepSink, on_reject: RejectSink | None = None, on_dead: DeadSink | None = None
    ) -> None:
        """Deliver every step's outputs (and prefix-cache events) to `on_step` on the caller's
        loop: how a worker publishes one message per gateway. A submitted request the core refuses
        when it takes it in goes to `on_reject`; the step thread's death to `on_dead`. Replaces an
        earlier sink, except the per-request streams of `add_request` (a RuntimeError)."""
        if self._streams is not None:
            raise RuntimeError("this engine streams per request (add_request); it takes no other sink")
        self._sink = _Sink(asyncio.get_running_loop(), on_step, on_reject, on_dead)

    def submit(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        priority: int = 0,
        cache_salt: str | None = None,
        resume_from: int = 0,
        lora_name: str | None = None,
    ) -> None:
        """Add a request whose outputs go to the sink. Raises ValueError for a bad request,
        EngineDeadError once the step thread died. `resume_from`: the prompt ends with this many
        of the request's own output tokens (a re-run elsewhere). `lora_name`: the loaded LoRA
        adapter it runs with (None: the base model); an unknown one is refused (`on_reject`)."""
        if self._sink is None:
            raise RuntimeError("set_sink (or use add_request) before submitting: the outputs would be lost")
        if self._dead is not None:
            raise EngineDeadError(f"the engine stopped after an error: {self._dead}")
        self.core.check_prompt(prompt_token_ids, params)
        self.start()
        self._post(
            "add", (request_id, prompt_token_ids, params, priority, cache_salt, resume_from, lora_name)
        )

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        priority: int = 0,
        cache_salt: str | None = None,
        lora_name: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """`submit`, with the outputs as an async iterator of this request's deltas (each of the
        `params.n` choices ends with a finished one). Closing it early aborts the request."""
        if self._streams is None:
            if self._sink is not None:
                raise RuntimeError("this engine delivers to the sink given to set_sink; use submit")
            streams = RequestStreams(lambda rid: self._post("abort", rid))
            self._sink = _Sink(
                asyncio.get_running_loop(), streams.on_step, streams.on_reject, streams.on_dead
            )
            self._streams = streams
        self._streams.reserve(request_id)
        self.submit(
            request_id,
            prompt_token_ids,
            params,
            priority=priority,
            cache_salt=cache_salt,
            lora_name=lora_name,
        )
        return self._streams.open(request_id, params.n)

    async def abort(self, request_id: str) -> None:
        """Stop a request (unknown ids are ignored); its KV blocks are freed within one step."""
        self._post("abort", request_id)

    # -- LoRA adapters -------------------------------------------------------------------------
    async def load_lora(self, name: str, path: str) -> LoRARequest:
        """Load PEFT adapter dir `path` as `name` between steps (ValueError: what is wrong with it)."""
        return await self._on_step_thread(lambda: self.core.load_lora(name, path))  # type: ignore[no-any-return]

    async def unload_lora(self, name: str) -> bool:
        """Unload adapter `name` (False: not loaded): requests naming it are refused from now on;
        those holding it finish with it (vLLM's behaviour)."""
        return await self._on_step_thread(lambda: self.core.remove_lora(name))  # type: ignore[no-any-return]

    def list_loras(self) -> list[str]:
        """The loaded adapters' names (what a worker announces with its model)."""
        return list(self._loras)

    async def _on_step_thread(self, call: Callable[[], Any]) -> Any:
        if self._dead is not None:
            raise EngineDeadError(f"the engine stopped after an error: {self._dead}")
        done: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def run() -> None:
            try:
                result = call()
                self._loras = self.core.list_loras()  # before the caller resumes
                done.set_result(result)
            except Exception as exc:  # the caller's error (ValueError): raised in the caller
                done.set_exception(exc)

        self.start()
        self._post("call", run)
        return await asyncio.wrap_future(done)

    def _post(self, kind: str, arg: Any) -> None:
        self._inbox.put((kind, arg))
        self._wake.set()

    # -- what the worker reads ---------------------------------------------------------------
    def counters(self) -> CoreCounters:
        """The core's live figures (safe while it steps)."""
        return self.core.counters()

    def cached_block_hashes(self) -> list[bytes]:
        """Every block hash in the core's prefix cache now (a snapshot)."""
        return self.core.cached_block_hashes()

    def has_unfinished(self) -> bool:
        """Requests run or wait in the core (messages not yet taken in do not count)."""
        return self.core.has_unfinished()

    @property
    def num_waiting(self) -> int:
        """Sequences waiting in the core's queue, plus messages (adds, aborts) not yet taken in."""
        return self.core.counters().num_waiting + self._inbox.qsize()

    @property
    def dead_reason(self) -> BaseException | None:
        return self._dead

    # -- the step thread ----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # the engine's state is unknown now: fail everything
            logger.exception("engine step failed")
            self._dead = exc
            sink = self._sink
            if sink is not None and sink.on_dead is not None:
                sink.loop.call_soon_threadsafe(sink.on_dead, EngineDeadError(f"engine step failed: {exc}"))

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
            self._send(outputs, *core.drain_cache_events())
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
                rid, ids, params, priority, salt, resumed, lora = arg
                try:
                    self.core.add_request(
                        rid,
                        ids,
                        params,
                        priority=priority,
                        cache_salt=salt,
                        resume_from=resumed,
                        lora_request=lora,
                    )
                except ValueError as exc:
                    self._refuse(rid, exc)
            elif kind == "call":
                arg()
            else:
                aborted = self.core.abort([arg])
                if aborted:
                    self._send(aborted, [], [])

    def _send(self, outputs: list[RequestOutput], stored: list[bytes], evicted: list[bytes]) -> None:
        sink = self._sink
        if sink is not None:  # set before any request came in (submit checks)
            sink.loop.call_soon_threadsafe(self._to_sink, sink, outputs, stored, evicted)

    def _to_sink(
        self, sink: _Sink, outputs: list[RequestOutput], stored: list[bytes], evicted: list[bytes]
    ) -> None:
        """On the sink's loop. A sink that raises lost a step's outputs: its requests would wait
        forever for them, so the engine stops (the worker reports it and its requests move). The
        steps already taken after that one are dropped too: their tokens would follow a gap."""
        if self._sink_failed:
            return
        try:
            sink.on_step(outputs, stored, evicted)
        except Exception as exc:
            logger.exception("the step sink failed; stopping the engine")
            self._sink_failed = True
            if self._dead is None:
                self._dead = exc
                self._wake.set()

    def _refuse(self, request_id: str, exc: ValueError) -> None:
        sink = self._sink
        if sink is not None and sink.on_reject is not None:
            sink.loop.call_soon_threadsafe(sink.on_reject, request_id, exc)
        else:
            logger.warning("request %s refused with nobody to tell: %s", request_id, exc)

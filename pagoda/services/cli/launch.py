"""Starts any set of the four services in one process: `pagoda serve` runs all four (embedded, on
an in-memory bus and store unless --bus/--store name real servers); `pagoda gateway|tokenizer|
scheduler|worker` run one each. SIGTERM/SIGINT stop the HTTP side first (open requests get up to
--shutdown-timeout to finish), then a worker drains (takes no new requests, finishes its running
ones within --shutdown-timeout), then the services stop.

The gateway, tokenizer and scheduler never import torch: they read the model's tokenizer and
limits (`read_served_model`), not its weights; only a worker builds an engine."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Awaitable, Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol

import uvicorn

from pagoda.services.cli.config import GatewayConfig, LaunchConfig, launch_config
from pagoda.services.cli.interpreter import event_loop_factory, settle_heap
from pagoda.services.cli.served_model import ServedModel, read_served_model
from pagoda.services.ops import tracing
from pagoda.services.ops.metrics import Metrics
from pagoda.services.scheduler.registry import WorkerRegistry
from pagoda.services.transport.bus import Bus, make_bus
from pagoda.services.transport.bus_memory import InMemoryBus
from pagoda.services.transport.messages import Queues
from pagoda.services.transport.store import InMemoryStore, Store, make_store

if TYPE_CHECKING:
    from fastapi import FastAPI

    from pagoda.engine import StepCore
    from pagoda.services.gateway.adapters import AdapterDirectory
    from pagoda.services.gateway.server import ModelEndpoint

logger = logging.getLogger("pagoda")

CLOSE_TIMEOUT_S = 5.0


class _Service(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


class _Server(uvicorn.Server):
    """uvicorn re-raises the signal it caught after shutting down (exit status -15); pagoda
    installs its own handlers so a requested stop is a clean exit."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def run_roles(args: argparse.Namespace, roles: tuple[str, ...]) -> int:
    """Run `roles` in this process until stopped; the exit status (see `Process.run`)."""
    config = launch_config(args, roles)
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        return runner.run(Process(config).run())


class Process:
    """The services of one process, from the broker connection to the last close. It owns every
    service it builds, the HTTP server and the tasks it starts, and stops them all on the way out."""

    def __init__(self, config: LaunchConfig) -> None:
        self.config = config
        self.queues = Queues(config.cluster.namespace)
        self.metrics = Metrics()  # one registry for the services of this process
        self.services: list[_Service] = []
        self.stop = asyncio.Event()
        self.failed: list[str] = []  # services that failed for good
        self.bus: Bus = InMemoryBus()
        self.store: Store = InMemoryStore()
        self._endpoints: list[ModelEndpoint] = []  # the gateway's models
        self._adapters: AdapterDirectory | None = None  # their LoRA adapters (--enable-lora)
        self._server: _Server | None = None
        self._failure_watch: asyncio.Task[None] | None = None
        self._metrics_server: Any = None

    async def run(self) -> int:
        """Runs the services until SIGTERM/SIGINT (returns 0) or until one fails for good, e.g. a
        worker whose engine stopped on an error (returns 1: its supervisor restarts it; `/health`
        would otherwise keep answering 200 for a process that can serve nothing)."""
        tracing.setup(self.config.service_name, self.config.cluster.otlp_endpoint)
        await self._connect()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._request_stop, sig)
        try:
            await self.build_services()
            await self._start_services()
            await self._serve()
        finally:
            await self._shut_down()
        return 1 if self.failed else 0

    async def _connect(self) -> None:
        cluster = self.config.cluster
        if cluster.bus:
            self.bus = make_bus(cluster.bus)
        if cluster.store:
            self.store = make_store(cluster.store, prefix=f"{cluster.namespace}:")
        await self.bus.connect()
        try:
            await self.store.connect()
        except BaseException:
            await self.bus.close()
            raise

    def _request_stop(self, sig: signal.Signals) -> None:
        logger.info("received %s: finishing open requests, then stopping", sig.name)
        self._stop_serving()

    def _stop_serving(self) -> None:
        self.stop.set()
        if self._server is not None:
            self._server.should_exit = True

    async def build_services(self) -> None:
        """Builds the services of `config.roles` (started later by `run`); the gateway and
        tokenizer read the model's tokenizer here, a worker loads its engine."""
        roles = set(self.config.roles)
        models: list[ServedModel] = []
        if roles & {"gateway", "tokenizer"}:
            # off the event loop, so the broker connection keeps its heartbeats meanwhile
            models = [await asyncio.to_thread(read_served_model, m) for m in self.config.models]
        if "worker" in roles:
            if self.config.worker is not None and self.config.worker.sim is None:
                from pagoda.engine import set_engine_threads  # before any engine: its ranks split it

                set_engine_threads(self.config.worker.threads, engines=len(self.config.models))
            for i in range(len(self.config.models)):  # `pagoda serve`: one engine per model
                self.services += await asyncio.to_thread(self.build_workers, i)
        if "scheduler" in roles:
            self.services.append(self._build_scheduler())
        if "tokenizer" in roles:
            self.services += [self._build_tokenizer(model) for model in models]
        if "gateway" in roles:
            adapters = await asyncio.to_thread(self._lora_modules, models)
            self._build_gateway(models, adapters)

    def build_workers(self, index: int) -> list[_Service]:
        """The workers of the `index`-th model: one, or one per data-parallel rank (engines of
        their own meeting at the MoE layers: pagoda/engine/distributed/data_parallel.py)."""
        worker, source = self.config.worker, self.config.models[index]
        assert worker is not None
        if worker.sim is not None or worker.engine.parallel.data_parallel_size == 1:
            return [self.build_worker(index)]
        from pagoda.engine import build_data_parallel_cores

        engine = replace(worker.engine, model=source.model, served_model_name=source.served_model_name)
        cores = build_data_parallel_cores(engine, background_compile=True)
        worker_id = _nth_id(worker.worker_id, index)
        return [
            self.build_worker(index, core, None if worker_id is None else f"{worker_id}-dp{core.dp.rank}")
            for core in cores
        ]

    def build_worker(
        self, index: int = 0, core: StepCore | None = None, worker_id: str | None = None
    ) -> _Service:
        """The worker service and its engine core for the `index`-th model (run in a thread:
        loading takes seconds); `core`, `worker_id`: a data-parallel rank's, built already."""
        from pagoda.engine import AsyncEngine, EngineCore, build_off_main_thread
        from pagoda.services.ops.failpoints import install_failpoints
        from pagoda.services.worker.service import WorkerService

        worker, source = self.config.worker, self.config.models[index]
        assert worker is not None
        if core is not None:
            pass  # a data-parallel rank's
        elif worker.sim is not None:
            from pagoda.engine import SimCore

            model = read_served_model(source)
            core = SimCore(
                model.tokenizer, model.name, model.max_model_len, worker.sim, model.default_sampling
            )
        else:
            engine = replace(worker.engine, model=source.model, served_model_name=source.served_model_name)
            # off the main thread: see its docstring (OpenMP pools); a server compiles its decode
            # graphs in the background while it serves (runner/compile_cache.py)
            core = build_off_main_thread(lambda: EngineCore(engine, background_compile=True))
        install_failpoints(core)
        stepped = AsyncEngine(core)
        if hasattr(core, "waker"):  # a data-parallel rank: the others wake its step loop
            core.waker = stepped._wake.set
        return WorkerService(
            stepped, self.bus, self.store, worker_id=worker_id or _nth_id(worker.worker_id, index),
            heartbeat_s=self.config.cluster.heartbeat_s, stall_timeout_s=worker.stall_timeout_s,
            queues=self.queues, metrics=self.metrics, admission=self.config.admission,
        )  # fmt: skip

    def _build_scheduler(self) -> _Service:
        from pagoda.services.scheduler.dispatcher import SchedulerService

        cluster = self.config.cluster
        return SchedulerService(
            self.bus, self.store, router=cluster.router, heartbeat_s=cluster.heartbeat_s,
            queues=self.queues, metrics=self.metrics, admission=self.config.admission,
        )  # fmt: skip

    def _build_tokenizer(self, model: ServedModel) -> _Service:
        from pagoda.services.tokenizer.prompts import PromptProcessor
        from pagoda.services.tokenizer.service import TokenizerService

        processor = PromptProcessor(model.tokenizer, model.max_model_len)
        return TokenizerService(self.bus, processor, model.name, self.queues)

    def _lora_modules(self, models: list[ServedModel]) -> AdapterDirectory | None:
        """The gateway's LoRA adapter directory (--enable-lora), --lora-modules checked."""
        from pagoda.services.gateway.adapters import AdapterDirectory, checked_modules

        gateway = self.config.gateway
        assert gateway is not None
        if not gateway.enable_lora:
            return None
        initial = checked_modules(gateway.lora_modules, [m.name for m in models], gateway.max_lora_rank)
        return AdapterDirectory(self.store, gateway.max_lora_rank, self.config.cluster.heartbeat_s, initial)

    def _build_gateway(self, models: list[ServedModel], adapters: AdapterDirectory | None) -> None:
        """One frontend (and admission) per model, behind one HTTP app."""
        from pagoda.services.gateway.bus_frontend import BusFrontend
        from pagoda.services.gateway.server import ModelEndpoint
        from pagoda.services.scheduler.admission import FleetAdmission

        gateway = self.config.gateway
        assert gateway is not None
        registry = WorkerRegistry(self.store, self.config.cluster.heartbeat_s)
        for model in models:
            frontend = BusFrontend(
                self.bus, model.tokenizer, model_name=model.name, max_model_len=model.max_model_len,
                default_sampling=model.default_sampling, registry=registry, pooler=model.pooler,
                queues=self.queues, queue_timeout_s=gateway.queue_timeout_s or None,
            )  # fmt: skip
            fleet = FleetAdmission(registry, self.config.admission, model.name)
            self._endpoints.append(ModelEndpoint(frontend, admission=fleet))
            self.services += [frontend, fleet]
        self._adapters = adapters
        if adapters is not None:
            self.services.append(adapters)

    async def _start_services(self) -> None:
        for svc in self.services:
            await svc.start()
        events = {
            f"{type(svc).__name__} {getattr(svc, 'worker_id', '')}".strip(): event
            for svc in self.services
            if isinstance(event := getattr(svc, "failed", None), asyncio.Event)
        }
        if events:
            self._failure_watch = asyncio.create_task(self._watch_failures(events), name="failure-watch")
        port = self.config.cluster.metrics_port
        if port is not None:
            started = list(self.services)
            self._metrics_server = self.metrics.serve(
                port, ready=lambda: all(getattr(s, "state", "ready") == "ready" for s in started)
            )
            logger.info("metrics on http://0.0.0.0:%d/metrics", port)

    async def _watch_failures(self, events: dict[str, asyncio.Event]) -> None:
        waits = {asyncio.create_task(event.wait()): name for name, event in events.items()}
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
        self.failed.extend(waits[t] for t in done)
        logger.error("%s failed for good; stopping with exit code 1", ", ".join(self.failed))
        self._stop_serving()

    async def _serve(self) -> None:
        """Serves HTTP until told to stop when this process runs the gateway, else waits for a stop."""
        if not self._endpoints:
            logger.info("running %s", ", ".join(self.config.roles))
            settle_heap()
            await self.stop.wait()
            return
        self._server = _Server(self._uvicorn_config())
        gateway = self.config.gateway
        assert gateway is not None
        logger.info(
            "serving %s on http://%s:%d/v1 (%s)",
            ", ".join(e.frontend.model_name for e in self._endpoints), gateway.host, gateway.port,
            ", ".join(self.config.roles),
        )  # fmt: skip
        config = self._server.config
        config.load()  # builds the app now (serve() skips it once loaded), so settle_heap covers it
        settle_heap()
        await self._server.serve(
            sockets=[_reuse_port_socket(gateway.host, gateway.port)] if gateway.reuse_port else None
        )

    def _uvicorn_config(self) -> uvicorn.Config:
        gateway = self.config.gateway
        assert gateway is not None
        app = gateway_app(gateway, self._endpoints, self.metrics, self.store, self._adapters)
        return uvicorn.Config(
            app, host=gateway.host, port=gateway.port, log_level=gateway.log_level.lower(), access_log=False,
            timeout_graceful_shutdown=max(1, round(self.config.cluster.shutdown_timeout_s)),
        )  # fmt: skip

    async def _shut_down(self) -> None:
        """Drains (on a requested stop), then stops every service and closes the connections, each
        step bounded by CLOSE_TIMEOUT_S."""
        if self._failure_watch is not None:
            self._failure_watch.cancel()
        for svc in self.services:
            drain = getattr(svc, "drain", None)
            if drain is not None and self.stop.is_set():
                with contextlib.suppress(Exception):
                    await drain(self.config.cluster.shutdown_timeout_s)
        if self._metrics_server is not None:
            await asyncio.to_thread(self._metrics_server.close)
        for svc in reversed(self.services):
            await _bounded(svc.stop(), f"stopping {type(svc).__name__}")
        await _bounded(self.bus.close(), "closing the broker connection")
        await _bounded(self.store.close(), "closing the store connection")
        await asyncio.to_thread(tracing.shutdown)
        logger.info("stopped")


def _nth_id(worker_id: str | None, index: int) -> str | None:
    """The id of a process's `index`-th worker (`pagoda serve` runs one per model)."""
    return worker_id if index == 0 or worker_id is None else f"{worker_id}-{index}"


def _reuse_port_socket(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port) that other processes may bind too (SO_REUSEPORT)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def gateway_app(
    gateway: GatewayConfig,
    endpoints: list[ModelEndpoint],
    metrics: Metrics,
    store: Store,
    adapters: AdapterDirectory | None = None,
) -> FastAPI:
    """The gateway's HTTP app over its models' `endpoints`, with `gateway`'s keys, limits and rate
    limits (their counters in `store`, as are stored Responses API responses). Logs how many API
    keys are required, never the keys."""
    from pagoda.services.gateway.ratelimit import RateLimiter
    from pagoda.services.gateway.server import build_app

    if gateway.api_keys:
        logger.info("API keys required: %d configured", len(gateway.api_keys))
    rate_limiter = RateLimiter(store, gateway.rate_limits) if gateway.rate_limits.enabled else None
    return build_app(
        endpoints, api_keys=list(gateway.api_keys) or None,
        metrics=metrics, limits=gateway.limits, rate_limiter=rate_limiter,
        tool_call_parser=gateway.tool_call_parser, reasoning_parser=gateway.reasoning_parser,
        store=store, responses_ttl_s=gateway.responses_ttl_s, adapters=adapters,
    )  # fmt: skip


async def _bounded(step: Awaitable[None], what: str) -> None:
    """One shutdown step, given CLOSE_TIMEOUT_S: with the broker or store gone, closing a channel
    waits on a reconnect that never comes, and SIGTERM must still end the process."""
    try:
        await asyncio.wait_for(step, CLOSE_TIMEOUT_S)
    except TimeoutError:
        logger.warning("%s took over %.0fs; exiting without it", what, CLOSE_TIMEOUT_S)
    except Exception as exc:
        logger.warning("%s failed: %s", what, exc)

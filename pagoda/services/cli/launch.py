"""Starts any set of the four services in one process: `pagoda serve` runs all four (embedded, on
an in-memory bus and store unless --bus/--store name real servers); `pagoda gateway|tokenizer|
scheduler|worker` run one each. SIGTERM/SIGINT stop the HTTP side first (open requests get up to
--shutdown-timeout to finish), then a worker drains (takes no new requests, finishes its running
ones within --shutdown-timeout), then the services stop."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import uvicorn

from pagoda.services.cli.main import admission_limits, engine_kwargs, request_limits
from pagoda.services.ops import tracing
from pagoda.services.ops.metrics import Metrics
from pagoda.services.scheduler.registry import WorkerRegistry
from pagoda.services.transport.bus import Bus, make_bus
from pagoda.services.transport.bus_memory import InMemoryBus
from pagoda.services.transport.messages import Queues
from pagoda.services.transport.store import InMemoryStore, Store, make_store

logger = logging.getLogger("pagoda")

ROLES = ("gateway", "tokenizer", "scheduler", "worker")


class _Service(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


class _Server(uvicorn.Server):
    """uvicorn re-raises the signal it caught after shutting down (exit status -15); pagoda
    installs its own handlers so a requested stop is a clean exit."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass
class _Model:
    """What the front tiers need of the model: its tokenizer and limits, not its weights."""

    name: str
    tokenizer: Any
    max_model_len: int
    default_sampling: dict[str, float] = field(default_factory=dict)


def _model_info(args: argparse.Namespace) -> _Model:
    from pagoda.engine import demo_model_path, generation_defaults, load_checkpoint, validate_max_model_len

    ckpt = load_checkpoint(args.model or demo_model_path())
    return _Model(
        name=args.served_model_name or ckpt.name,
        tokenizer=ckpt.tokenizer,
        max_model_len=validate_max_model_len(args.max_model_len, ckpt.arch.max_position_embeddings),
        default_sampling=generation_defaults(ckpt.path),
    )


def _api_keys(args: argparse.Namespace) -> list[str] | None:
    from pagoda.services.gateway.auth import load_api_keys

    keys = load_api_keys(getattr(args, "api_key", None), getattr(args, "api_key_file", None))
    if keys:
        logger.info("API keys required: %d configured", len(keys))  # never the keys themselves
    return keys or None


def run_roles(args: argparse.Namespace, roles: tuple[str, ...]) -> int:
    bus_url = getattr(args, "bus", None)
    store_url = getattr(args, "store", None)
    if getattr(args, "shutdown_timeout", 0.0) < 0:
        raise ValueError(f"--shutdown-timeout must be >= 0 seconds, got {args.shutdown_timeout}")
    if getattr(args, "stall_timeout", 1.0) <= 0:
        raise ValueError(f"--stall-timeout must be > 0 seconds, got {args.stall_timeout}")
    if len(roles) == 1 and (not bus_url or bus_url.startswith("memory")):
        raise ValueError(f"`pagoda {roles[0]}` runs alone: give it --bus amqp://... and --store redis://...")
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        return runner.run(_main(args, roles, bus_url, store_url))


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when it is installed (`pip install pagoda[fast]`, which also brings
    httptools: uvicorn then parses HTTP with it by itself), else asyncio's. With both, the gateway
    used ~10% less CPU per streamed token (docs/perf.md); PAGODA_EVENT_LOOP=asyncio opts out."""
    if os.environ.get("PAGODA_EVENT_LOOP", "auto") == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop  # type: ignore[no-any-return]


async def _main(
    args: argparse.Namespace, roles: tuple[str, ...], bus_url: str | None, store_url: str | None
) -> int:
    """Runs the services until SIGTERM/SIGINT (returns 0) or until one fails for good, e.g. a
    worker whose engine stopped on an error (returns 1: its supervisor restarts it; `/health`
    would otherwise keep answering 200 for a process that can serve nothing)."""
    tracing.setup("pagoda" if len(roles) > 1 else f"pagoda-{roles[0]}", getattr(args, "otlp_endpoint", None))
    bus: Bus = make_bus(bus_url) if bus_url else InMemoryBus()
    store: Store = make_store(store_url, prefix=f"{args.namespace}:") if store_url else InMemoryStore()
    await bus.connect()
    try:
        await store.connect()
    except BaseException:
        await bus.close()
        raise
    services: list[_Service] = []
    queues = Queues(args.namespace)
    metrics = Metrics()  # one registry for the services of this process
    metrics_port: int | None = getattr(args, "metrics_port", None)
    metrics_server = None
    server: _Server | None = None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def request_stop(sig: signal.Signals) -> None:
        logger.info("received %s: finishing open requests, then stopping", sig.name)
        stop.set()
        if server is not None:
            server.should_exit = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, request_stop, sig)
    failure: asyncio.Task[None] | None = None
    failed: list[str] = []

    async def watch_failures(events: dict[str, asyncio.Event]) -> None:
        waits = {asyncio.create_task(event.wait()): name for name, event in events.items()}
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
        failed.extend(waits[t] for t in done)
        logger.error("%s failed for good; stopping with exit code 1", ", ".join(failed))
        stop.set()
        if server is not None:
            server.should_exit = True

    try:
        api_keys = _api_keys(args) if "gateway" in roles else None
        # loading runs off the event loop, so the broker connection keeps its heartbeats meanwhile
        model = await asyncio.to_thread(_model_info, args) if {"gateway", "tokenizer"} & set(roles) else None
        heartbeat = args.heartbeat_interval
        # the tokenizer role has no admission flags (and needs none)
        admission = admission_limits(args)
        if "worker" in roles:
            services.append(await asyncio.to_thread(_worker, args, bus, store, heartbeat, queues, metrics))
        if "scheduler" in roles:
            from pagoda.services.scheduler.dispatcher import SchedulerService

            services.append(
                SchedulerService(
                    bus,
                    store,
                    router=args.router,
                    heartbeat_s=heartbeat,
                    queues=queues,
                    metrics=metrics,
                    admission=admission,
                )
            )
        if "tokenizer" in roles:
            from pagoda.services.tokenizer.prompts import PromptProcessor
            from pagoda.services.tokenizer.service import TokenizerService

            assert model is not None
            processor = PromptProcessor(model.tokenizer, model.max_model_len)
            services.append(TokenizerService(bus, processor, queues))
        frontend = None
        fleet = None
        if "gateway" in roles:
            from pagoda.services.gateway.bus_frontend import BusFrontend
            from pagoda.services.scheduler.admission import FleetAdmission

            assert model is not None
            frontend = BusFrontend(
                bus, model.tokenizer, model_name=model.name, max_model_len=model.max_model_len,
                default_sampling=model.default_sampling,
                registry=WorkerRegistry(store, heartbeat), queues=queues,
                queue_timeout_s=args.queue_timeout or None,
            )  # fmt: skip
            fleet = FleetAdmission(WorkerRegistry(store, heartbeat), admission)
            services += [frontend, fleet]
        for svc in services:
            await svc.start()
        events = {
            f"{type(svc).__name__} {getattr(svc, 'worker_id', '')}".strip(): event
            for svc in services
            if isinstance(event := getattr(svc, "failed", None), asyncio.Event)
        }
        if events:
            failure = asyncio.create_task(watch_failures(events), name="failure-watch")
        if metrics_port is not None:
            started = list(services)
            metrics_server = metrics.serve(
                metrics_port, ready=lambda: all(getattr(s, "state", "ready") == "ready" for s in started)
            )
            logger.info("metrics on http://0.0.0.0:%d/metrics", metrics_port)
        if frontend is not None:
            from pagoda.services.gateway.ratelimit import RateLimiter, RateLimits
            from pagoda.services.gateway.server import build_app

            rate_limits = RateLimits(args.rate_limit_requests, args.rate_limit_tokens)
            app = build_app(
                frontend, served_model_names=[frontend.model_name], api_keys=api_keys, metrics=metrics,
                limits=request_limits(args), admission=fleet,
                rate_limiter=RateLimiter(store, rate_limits) if rate_limits.enabled else None,
            )  # fmt: skip
            server = _Server(
                uvicorn.Config(
                    app, host=args.host, port=args.port, log_level=args.log_level.lower(), access_log=False,
                    timeout_graceful_shutdown=max(1, round(_shutdown_timeout(args))),
                )
            )  # fmt: skip
            logger.info(
                "serving %s on http://%s:%d/v1 (%s)",
                frontend.model_name,
                args.host,
                args.port,
                ", ".join(roles),
            )
            await server.serve()
        else:
            logger.info("running %s", ", ".join(roles))
            await stop.wait()
    finally:
        if failure is not None:
            failure.cancel()
        for svc in services:
            drain = getattr(svc, "drain", None)
            if drain is not None and stop.is_set():
                with contextlib.suppress(Exception):
                    await drain(_shutdown_timeout(args))
        if metrics_server is not None:
            await asyncio.to_thread(metrics_server.close)
        for svc in reversed(services):
            await _bounded(svc.stop(), f"stopping {type(svc).__name__}")
        await _bounded(bus.close(), "closing the broker connection")
        await _bounded(store.close(), "closing the store connection")
        await asyncio.to_thread(tracing.shutdown)
        logger.info("stopped")
    return 1 if failed else 0


CLOSE_TIMEOUT_S = 5.0


async def _bounded(step: Awaitable[None], what: str) -> None:
    """One shutdown step, given CLOSE_TIMEOUT_S: with the broker or store gone, closing a channel
    waits on a reconnect that never comes, and SIGTERM must still end the process."""
    try:
        await asyncio.wait_for(step, CLOSE_TIMEOUT_S)
    except TimeoutError:
        logger.warning("%s took over %.0fs; exiting without it", what, CLOSE_TIMEOUT_S)
    except Exception as exc:
        logger.warning("%s failed: %s", what, exc)


def _shutdown_timeout(args: argparse.Namespace) -> float:
    return float(getattr(args, "shutdown_timeout", 30.0))


def _worker(
    args: argparse.Namespace, bus: Bus, store: Store, heartbeat: float, queues: Queues, metrics: Metrics
) -> _Service:
    from pagoda.engine import AsyncEngine, EngineCore, StepCore, build_off_main_thread, make_engine_config
    from pagoda.services.ops.failpoints import install_failpoints
    from pagoda.services.worker.service import WorkerService

    core: StepCore
    if getattr(args, "backend", "torch") == "sim":
        from pagoda.engine import SimConfig, SimCore

        model = _model_info(args)
        sim = SimConfig(step_ms=args.sim_step_ms, max_batch=args.sim_max_batch, eos_prob=args.sim_eos_prob,
                        seed=args.seed)  # fmt: skip
        core = SimCore(model.tokenizer, model.name, model.max_model_len, sim, model.default_sampling)
    else:
        config = make_engine_config(args.model, **engine_kwargs(args))
        core = build_off_main_thread(lambda: EngineCore(config))  # see its docstring: OpenMP pools
    install_failpoints(core)
    return WorkerService(
        AsyncEngine(core),
        bus,
        store,
        worker_id=getattr(args, "worker_id", None),
        heartbeat_s=heartbeat,
        stall_timeout_s=getattr(args, "stall_timeout", 30.0),
        queues=queues,
        metrics=metrics,
        admission=admission_limits(args),
    )

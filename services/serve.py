"""`pagoda serve`: the embedded deployment, engine and OpenAI server in one process.

The engine steps in its own thread (AsyncEngine); uvicorn serves on the main event loop. SIGTERM
and SIGINT stop taking connections, let open responses finish, stop the engine and exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Iterator

import uvicorn

from engine.async_engine import AsyncEngine
from engine.engine_core import EngineCore
from engine.llm import make_engine_config
from services.cli import engine_kwargs

logger = logging.getLogger("pagoda.serve")


class _Server(uvicorn.Server):
    """uvicorn re-raises the signal it caught after shutting down (exit status -15); pagoda
    installs its own handlers so a requested stop is a clean exit."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def run_serve(args: argparse.Namespace) -> int:
    from services.openai_server import build_app

    config = make_engine_config(args.model, **engine_kwargs(args))
    engine = AsyncEngine(EngineCore(config))
    keys = list(args.api_key or [])
    if os.environ.get("PAGODA_API_KEY"):
        keys.append(os.environ["PAGODA_API_KEY"])
    app = build_app(engine, served_model_names=[engine.model_name], api_keys=keys or None)
    uv_config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level.lower(),
        access_log=False,
        timeout_graceful_shutdown=30,
    )
    server = _Server(uv_config)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, _request_stop, server, sig)
        engine.start()
        logger.info("serving %s on http://%s:%d/v1", engine.model_name, args.host, args.port)
        try:
            await server.serve()
        finally:
            await engine.shutdown()
            logger.info("stopped")

    asyncio.run(main())
    return 0


def _request_stop(server: uvicorn.Server, sig: signal.Signals) -> None:
    logger.info("received %s: finishing open requests, then stopping", sig.name)
    server.should_exit = True

"""`pagoda serve`: the embedded deployment, engine and OpenAI server in one process.

The engine steps in its own thread (AsyncEngine); uvicorn owns the event loop and handles SIGTERM
and SIGINT by finishing open responses and then stopping the engine.
"""

from __future__ import annotations

import argparse
import logging
import os

import uvicorn

from engine.async_engine import AsyncEngine
from engine.engine_core import EngineCore
from engine.llm import make_engine_config
from services.cli import engine_kwargs

logger = logging.getLogger("pagoda.serve")


def run_serve(args: argparse.Namespace) -> int:
    from services.openai_server import build_app

    config = make_engine_config(args.model, **engine_kwargs(args))
    engine = AsyncEngine(EngineCore(config))
    engine.start()
    keys = list(args.api_key or [])
    if os.environ.get("PAGODA_API_KEY"):
        keys.append(os.environ["PAGODA_API_KEY"])
    app = build_app(engine, served_model_names=[engine.model_name], api_keys=keys or None)

    @app.on_event("shutdown")
    async def _stop_engine() -> None:
        await engine.shutdown()

    logger.info("serving %s on http://%s:%d/v1", engine.model_name, args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level.lower(), access_log=False)
    return 0

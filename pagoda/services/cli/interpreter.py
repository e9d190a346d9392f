"""How a pagoda process sets up its interpreter: the event loop it runs on, and the garbage
collector's settings once it has started (both measured on the gateway's streaming path)."""

from __future__ import annotations

import asyncio
import gc
import os
from collections.abc import Callable


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when it is installed (`pip install pagoda[fast]`, which also brings
    httptools: uvicorn then parses HTTP with it by itself), else asyncio's. With both, the gateway
    used ~10% less CPU per streamed token (docs/perf-history.md); PAGODA_EVENT_LOOP=asyncio opts out."""
    if os.environ.get("PAGODA_EVENT_LOOP", "auto") == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop  # type: ignore[no-any-return]


def settle_heap() -> None:
    """Once a process has started: move what it holds for good (tokenizer, app, schemas) out of
    the cyclic garbage collector's scans, and collect the young generation 14x less often. The
    streaming path allocates a few objects per token; with the default thresholds the collector
    took ~10% of the gateway's CPU under load, most of it rescanning objects that live forever."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)

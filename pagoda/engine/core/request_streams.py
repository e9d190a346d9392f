"""Per-request output iterators built on an AsyncEngine's step sink.

The engine delivers every step's outputs to one sink on one event loop; `RequestStreams` is the
sink that splits them by request into async iterators. It lives on that loop alone (no locks).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator, Callable

from pagoda.engine.outputs import RequestOutput

# what a request's queue holds: the outputs of one step, or the error that ends the request
_Item = list[RequestOutput] | BaseException


class RequestStreams:
    """The sink behind `AsyncEngine.add_request`: one queue per open request.

    Contract: `reserve` a request id before the engine takes the request, then `open` it; outputs
    for ids not open are dropped (a request whose iterator was closed). An iterator ends after the
    finishing output of each of its `n` choices, or raises the error `on_reject` or `on_dead` gave
    it. Leaving it earlier calls `abort(request_id)`; a refused request (never taken in) is not
    aborted, so that another request of the same id keeps running."""

    def __init__(self, abort: Callable[[str], None]) -> None:
        self._abort = abort
        self._queues: dict[str, asyncio.Queue[_Item]] = {}

    def reserve(self, request_id: str) -> None:
        """Raise ValueError when a request of this id is still streaming."""
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already running")

    def open(self, request_id: str, n: int) -> AsyncIterator[RequestOutput]:
        """The outputs of a request the engine has taken, for its `n` choices."""
        self.reserve(request_id)
        q: asyncio.Queue[_Item] = asyncio.Queue()
        self._queues[request_id] = q
        return self._iterate(request_id, q, n)

    async def _iterate(
        self, request_id: str, q: asyncio.Queue[_Item], n: int
    ) -> AsyncIterator[RequestOutput]:
        remaining = n
        try:
            while remaining:
                item = await q.get()
                if isinstance(item, BaseException):
                    remaining = 0  # refused or the engine died: nothing runs to abort
                    raise item
                for out in item:
                    if out.finished:
                        remaining -= 1
                    yield out
        finally:
            if self._queues.get(request_id) is q:
                del self._queues[request_id]
            if remaining:
                self._abort(request_id)

    # -- the sink (on the engine's sink loop) ------------------------------------------------
    def on_step(self, outputs: list[RequestOutput], stored: list[bytes], evicted: list[bytes]) -> None:
        by_request: dict[str, list[RequestOutput]] = defaultdict(list)
        for out in outputs:
            if out.request_id in self._queues:
                by_request[out.request_id].append(out)
        for rid, outs in by_request.items():
            self._queues[rid].put_nowait(outs)

    def on_reject(self, request_id: str, exc: ValueError) -> None:
        q = self._queues.get(request_id)
        if q is not None:
            q.put_nowait(exc)

    def on_dead(self, exc: BaseException) -> None:
        for q in self._queues.values():
            q.put_nowait(exc)

"""Hostile bus messages: whatever bytes reach a service's queue, it logs and drops what it cannot
use and keeps serving (hypothesis: random bytes, and envelopes of every type with random bodies)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagoda.engine.sampling.params import SamplingParams
from pagoda.services.gateway.bus_frontend import BusFrontend
from pagoda.services.scheduler.dispatcher import SchedulerService
from pagoda.services.tokenizer.prompts import PromptProcessor
from pagoda.services.tokenizer.service import TokenizerService
from pagoda.services.transport.bus import Delivery
from pagoda.services.transport.bus_memory import InMemoryBus
from pagoda.services.transport.messages import WIRE_VERSION, PromptInput, Queues
from pagoda.services.transport.store import InMemoryStore
from pagoda.services.worker.service import WorkerService
from tests.fakes import FakeTokenizer, SlotEngine

_SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
_JSON = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
)
_FIELDS = [
    *("request_id", "reply_to", "prompt", "sampling", "prompt_token_ids", "request_ids", "worker_id"),
    *("deltas", "status", "message", "priority", "n", "max_tokens", "seed", "queue_timeout_s"),
]
_TYPES = ["tokenize", "schedule", "run", "abort", "assigned", "rejected", "step", "other"]


def _envelope(kind: str, body: Any, version: Any) -> bytes:
    return json.dumps({"v": version, "type": kind, "body": body}).encode()


_MESSAGES = (
    st.binary(max_size=64)
    | st.builds(
        _envelope,
        st.sampled_from(_TYPES),
        _JSON | st.dictionaries(st.sampled_from(_FIELDS), _JSON, max_size=6),
        st.sampled_from([WIRE_VERSION, WIRE_VERSION, 0, "1"]),
    )
    | _JSON.map(lambda v: json.dumps(v).encode())
)


class Services:
    """One of each service on one in-memory bus, their handlers callable one message at a time."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.bus, store, tok = InMemoryBus(), InMemoryStore(), cast(Any, FakeTokenizer())
        self.queues = Queues("fuzz")
        self.engine = SlotEngine(slots=4)
        self.worker = WorkerService(
            cast(Any, self.engine), self.bus, store, worker_id="w0", queues=self.queues
        )
        self.scheduler = SchedulerService(self.bus, store, queues=self.queues)
        name = self.engine.model_name
        self.tokenizer = TokenizerService(self.bus, PromptProcessor(tok, 256), name, self.queues)
        self.gateway = BusFrontend(self.bus, tok, model_name=name, max_model_len=256, queues=self.queues)
        self.all = [self.worker, self.scheduler, self.tokenizer, self.gateway]
        self.run(self._start())

    def run(self, coro: Awaitable[Any]) -> Any:
        return self.loop.run_until_complete(coro)

    async def _start(self) -> None:
        await self.bus.connect()
        for s in self.all:
            await s.start()

    @property
    def handlers(self) -> list[Callable[[Delivery], Awaitable[None]]]:
        return [self.worker._on_message, self.scheduler._on_message, self.tokenizer._on_message,
                self.gateway._on_reply]  # fmt: skip

    async def _round_trip(self) -> str:
        sub = await self.gateway.submit("ok", PromptInput(text="hi"), SamplingParams(max_tokens=3))
        text = ""
        async for out in sub.outputs:
            text += "".join(chr(t) for t in out.new_token_ids)
        return text

    def close(self) -> None:
        async def stop() -> None:
            for s in reversed(self.all):
                await s.stop()
            await self.bus.close()

        self.run(stop())
        self.loop.close()


@pytest.fixture(scope="module")
def services() -> Iterator[Services]:
    s = Services()
    yield s
    s.close()


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=_MESSAGES)
def test_no_message_kills_a_service(services: Services, body: bytes) -> None:
    for handler in services.handlers:
        services.run(handler(Delivery(body)))  # raises nothing


def test_the_services_still_serve_after_the_fuzzing(
    services: Services, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    for handler in services.handlers:
        services.run(handler(Delivery(b"\xff not json")))
    assert caplog.text.count("dropped a malformed") == 4  # each service said so
    assert services.run(asyncio.wait_for(services._round_trip(), 10)) == "AAA"
    assert all(t.done() is False for t in services.worker._tasks), "a worker task died"

"""Prometheus metrics: the gateway's per-request figures equal what clients got, the worker's are
read from the engine core on scrape, the scheduler counts its routing decisions."""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pagoda.engine.config import BatcherConfig
from pagoda.engine.core.engine_core import EngineCore
from pagoda.engine.core.stats import CoreCounters, EngineCapacity
from pagoda.engine.kv.kv_cache_manager import KVCacheManager
from pagoda.engine.sampling.params import SamplingParams
from pagoda.engine.scheduling.batcher import Batcher
from pagoda.engine.scheduling.request import Request
from pagoda.services.gateway.server import build_app
from pagoda.services.ops.metrics import GatewayMetrics, Metrics, ServedRequest
from pagoda.services.scheduler.dispatcher import SchedulerService
from pagoda.services.scheduler.registry import WorkerRegistry
from pagoda.services.transport.bus_memory import InMemoryBus
from pagoda.services.transport.messages import Queues, SamplingSpec, ScheduleRequest, encode
from pagoda.services.transport.store import InMemoryStore
from pagoda.services.worker.service import WorkerService
from tests.fakes import MODEL, FakeEngine, heartbeat, local_frontend
from tests.polling import until

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _samples(text: str) -> Samples:
    """(sample name, labels) -> value of every sample in a /metrics body."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def _get(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def _wait_for(metrics: Metrics, name: str, value: float, **labels: str) -> Samples:
    """The samples once `name{labels}` reached `value` (or after 5 s)."""
    deadline = time.monotonic() + 5
    while True:
        s = _samples(metrics.render().decode())
        if _get(s, name, **labels) >= value or time.monotonic() > deadline:
            return s
        await asyncio.sleep(0.01)


def _app(engine: FakeEngine, **kw: Any) -> Any:
    return build_app(local_frontend(engine), **kw)


async def _usage_of_stream(resp: httpx.Response) -> dict[str, int]:
    chunks = [line[len("data: ") :] for line in resp.text.split("\n\n") if line]
    assert chunks[-1] == "[DONE]"
    return cast("dict[str, int]", httpx.Response(200, content=chunks[-2]).json()["usage"])


async def test_gateway_counters_equal_what_clients_got() -> None:
    app = _app(FakeEngine())
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}
    usage = {"prompt_tokens": 0, "completion_tokens": 0}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        sent = [
            ("/v1/chat/completions", {**chat, "max_tokens": 5}),  # length
            ("/v1/chat/completions", {**chat, "stream": True, "stream_options": {"include_usage": True}}),
            ("/v1/completions", {"model": MODEL, "prompt": "abc", "max_tokens": 3}),  # length
            ("/v1/completions", {"model": MODEL, "prompt": "xyz", "n": 2, "max_tokens": 200, "stream": True,
                                 "stream_options": {"include_usage": True}}),  # 2 choices, stop
        ]  # fmt: skip
        for path, body in sent:
            resp = await client.post(path, json=body)
            assert resp.status_code == 200, resp.text
            got = await _usage_of_stream(resp) if body.get("stream") else resp.json()["usage"]
            for key in usage:
                usage[key] += got[key]
        assert (await client.post("/v1/chat/completions", json={**chat, "model": "nope"})).status_code == 404
        assert (await client.post("/v1/completions", json={"model": MODEL})).status_code == 400
        resp = await client.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    s = _samples(resp.text)
    m = {"model_name": MODEL}
    n = len(sent)
    assert _get(s, "vllm:prompt_tokens_total", **m) == usage["prompt_tokens"]
    assert _get(s, "vllm:generation_tokens_total", **m) == usage["completion_tokens"]
    assert _get(s, "vllm:request_success_total", **m, finished_reason="length") == 2
    assert _get(s, "vllm:request_success_total", **m, finished_reason="stop") == 3  # per choice
    assert _get(s, "vllm:request_success_total", **m, finished_reason="abort") == 0
    assert _get(s, "vllm:time_to_first_token_seconds_count", **m) == n
    assert _get(s, "vllm:e2e_request_latency_seconds_count", **m) == n
    assert _get(s, "vllm:request_prompt_tokens_count", **m) == n
    assert _get(s, "vllm:request_prompt_tokens_sum", **m) == usage["prompt_tokens"]
    assert _get(s, "vllm:request_generation_tokens_sum", **m) == usage["completion_tokens"]
    choices = 5  # one gap between each two tokens of a choice
    assert _get(s, "vllm:inter_token_latency_seconds_count", **m) == usage["completion_tokens"] - choices
    assert _get(s, "vllm:time_per_output_token_seconds_count", **m) == usage["completion_tokens"] - choices
    assert _get(s, "pagoda:http_responses_total", **m, status="200") == n
    assert _get(s, "pagoda:http_responses_total", **m, status="404") == 1
    assert _get(s, "pagoda:http_responses_total", **m, status="400") == 1


async def test_metrics_is_open_and_registries_are_separate() -> None:
    shared = Metrics()
    a, b = _app(FakeEngine(), api_keys=["k"], metrics=shared), _app(FakeEngine())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=a), base_url="http://t") as client:
        assert (await client.get("/metrics")).status_code == 200  # no key needed
        assert (await client.get("/v1/models")).status_code == 401
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=b), base_url="http://t") as client:
        other = _samples((await client.get("/metrics")).text)
    mine = _samples(shared.render().decode())
    assert _get(mine, "pagoda:http_responses_total", model_name=MODEL, status="401") == 1
    assert _get(other, "pagoda:http_responses_total", model_name=MODEL, status="401") == 0


def test_abandoned_choices_count_as_aborts() -> None:
    metrics = Metrics()
    gw = metrics.gateway()
    assert isinstance(gw, GatewayMetrics) and metrics.gateway() is gw
    gw.observe("m", ServedRequest("disconnected", 1.0, 0.1, [0.01], 3, 2, ["stop", None], submitted=True))
    gw.observe("m", ServedRequest(400, 0.01, None))  # refused: nothing reached the engine
    s = _samples(metrics.render().decode())
    assert _get(s, "vllm:request_success_total", model_name="m", finished_reason="abort") == 1
    assert _get(s, "vllm:request_success_total", model_name="m", finished_reason="stop") == 1
    assert _get(s, "vllm:generation_tokens_total", model_name="m") == 2
    assert _get(s, "vllm:time_to_first_token_seconds_count", model_name="m") == 1
    assert _get(s, "vllm:e2e_request_latency_seconds_count", model_name="m") == 0  # not completed


# ------------------------------------------------------------------------------------- worker


def _core_without_model(num_blocks: int = 4) -> EngineCore:
    """An EngineCore with a real scheduler and KV cache manager but no model: enough for counters()."""
    core = EngineCore.__new__(EngineCore)
    core.model_name = "tiny"
    core.kv = KVCacheManager(num_blocks, block_size=4)
    core.batcher = Batcher(BatcherConfig(max_num_batched_tokens=64), core.kv, 64, [0])
    core._awaiting = {}  # requests waiting for a grammar: none
    core.parallel = None  # one rank
    return core


def test_engine_core_counters_read_the_scheduler_and_cache() -> None:
    core = _core_without_model()
    assert core.counters() == CoreCounters(0, 0, 0.0, 0, 0, 0, num_free_blocks=4)
    for i in range(3):
        prompt = list(range(10 * i + 1, 10 * i + 7))  # distinct: no prefix-cache sharing
        core.batcher.add_request(Request(f"r{i}", prompt, SamplingParams(max_tokens=4)))
    core.batcher.schedule()  # 4 blocks of 4 tokens: two requests of 6 tokens fit, one waits
    c = core.counters()
    assert (c.num_running, c.num_waiting, c.kv_usage) == (2, 1, 1.0)
    assert c.prefix_query_tokens == core.kv.query_tokens > 0


class _FakeAsyncEngine:
    """What WorkerService needs of an AsyncEngine, over a model-less core (never stepped)."""

    def __init__(self, core: EngineCore) -> None:
        self.core = core
        self.model_name = core.model_name
        self.capacity = EngineCapacity(max_num_seqs=8, block_size=4, num_blocks=4)
        self.dead_reason = None
        self.steps = 0

    def counters(self) -> CoreCounters:
        return self.core.counters()

    def list_loras(self) -> list[str]:
        return []

    def cached_block_hashes(self) -> list[bytes]:
        return self.core.cached_block_hashes()

    def has_unfinished(self) -> bool:
        return self.core.has_unfinished()

    @property
    def num_waiting(self) -> int:
        return self.core.counters().num_waiting

    def set_sink(self, sink: Any, reject: Any = None) -> None:
        pass

    def start(self) -> None:
        pass

    async def shutdown(self) -> None:
        pass


async def test_worker_metrics_are_read_from_the_core_on_scrape() -> None:
    metrics, bus, store = Metrics(), InMemoryBus(), InMemoryStore()
    cores = [_core_without_model(), _core_without_model()]
    workers = [
        WorkerService(cast("Any", _FakeAsyncEngine(c)), bus, store, worker_id=f"w{i}", metrics=metrics)
        for i, c in enumerate(cores)
    ]
    for w in workers:
        await w.start()
    cores[1].batcher.add_request(Request("r", list(range(1, 7)), SamplingParams(max_tokens=4)))
    cores[1].batcher.num_preemptions = 3
    cores[1].kv.query_tokens, cores[1].kv.hit_tokens = 100, 40
    s = _samples(metrics.render().decode())
    w0, w1 = {"model_name": "tiny", "engine": "w0"}, {"model_name": "tiny", "engine": "w1"}
    assert _get(s, "vllm:num_requests_waiting", **w1) == 1
    assert _get(s, "vllm:num_requests_running", **w1) == 0
    assert (
        _get(s, "vllm:prefix_cache_queries_total", **w1),
        _get(s, "vllm:prefix_cache_hits_total", **w1),
    ) == (
        100,
        40,
    )
    assert _get(s, "vllm:num_preemptions_total", **w1) == 3
    assert ("vllm:kv_cache_usage_perc", frozenset(w0.items())) in s
    for w in workers:
        await w.stop()
    assert ("vllm:kv_cache_usage_perc", frozenset(w0.items())) not in _samples(metrics.render().decode())


# ---------------------------------------------------------------------------------- scheduler


async def test_scheduler_counts_routing_decisions_and_refusals() -> None:
    metrics, bus, store, queues = Metrics(), InMemoryBus(), InMemoryStore(), Queues("t")
    scheduler = SchedulerService(
        bus, store, router="least-load", heartbeat_s=0.05, queues=queues, metrics=metrics
    )
    await bus.declare_work_queue(queues.worker("w0"))
    reply = await bus.declare_reply_queue("")

    def request(i: int) -> bytes:
        msg = ScheduleRequest(
            request_id=f"r{i}", reply_to=reply, prompt_token_ids=[1, 2, 3], sampling=SamplingSpec()
        )
        return encode(msg)

    await scheduler.start()
    try:
        await bus.publish(queues.schedule, request(0))  # no worker yet: refused
        s = await _wait_for(metrics, "pagoda:scheduler_rejected_total", 1, reason="no_worker")
        assert _get(s, "pagoda:scheduler_rejected_total", reason="no_worker") == 1
        await WorkerRegistry(store, 1.0).beat(heartbeat("w0", block_size=4))

        async def w0_seen() -> bool:  # the scheduler's view of the workers refreshed
            return any(beat.worker_id == "w0" for beat in await scheduler._workers())

        await until(w0_seen, 5, "the scheduler to see w0")
        for i in range(1, 4):
            await bus.publish(queues.schedule, request(i))
        routed = {"worker": "w0", "reason": "least-load"}
        s = await _wait_for(metrics, "pagoda:routing_decisions_total", 3, **routed)
        assert _get(s, "pagoda:routing_decisions_total", **routed) == 3
        assert _get(s, "pagoda:scheduler_rejected_total", reason="no_worker") == 1
        assert ("pagoda:schedule_queue_depth", frozenset()) in s
    finally:
        await scheduler.stop()


def test_metrics_port_serves_the_registry() -> None:
    metrics = Metrics()
    metrics.scheduler().rejected.labels("no_worker").inc()
    state = {"ready": True}
    srv = metrics.serve(0, host="127.0.0.1", ready=lambda: state["ready"])
    try:
        port = srv.server.server_port
        assert httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=5).status_code == 200
        state["ready"] = False  # e.g. a draining or stalled worker
        assert httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=5).status_code == 503
        # what Prometheus asks for: the names must keep their colons all the same
        accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
        resp = httpx.get(f"http://127.0.0.1:{port}/metrics", headers={"Accept": accept}, timeout=5)
        assert resp.headers["content-type"].startswith("text/plain")
        assert _get(_samples(resp.text), "pagoda:scheduler_rejected_total", reason="no_worker") == 1
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
        assert httpx.get(f"http://127.0.0.1:{port}/nope", timeout=5).status_code == 404
        with pytest.raises(ValueError, match="--metrics-port"):  # a port in use is a user error
            metrics.serve(port, host="127.0.0.1")
    finally:
        srv.close()


def test_worker_phase_histograms() -> None:
    metrics = Metrics()
    worker = metrics.worker()
    assert metrics.worker() is worker
    now = time.monotonic()
    worker.observe("m", "w0", arrived=now - 3.0, queue_s=1.0, first_token=now - 1.5)
    worker.observe("m", "w0", arrived=now - 0.5, queue_s=None, first_token=None)  # aborted while waiting
    s = _samples(metrics.render().decode())
    w = {"model_name": "m", "engine": "w0"}
    assert _get(s, "vllm:request_queue_time_seconds_count", **w) == 2
    assert _get(s, "vllm:request_prefill_time_seconds_count", **w) == 1
    assert _get(s, "vllm:request_prefill_time_seconds_sum", **w) == pytest.approx(0.5, abs=1e-6)
    assert _get(s, "vllm:request_decode_time_seconds_sum", **w) == pytest.approx(1.5, abs=0.5)
    assert _get(s, "vllm:request_inference_time_seconds_sum", **w) == pytest.approx(2.0, abs=0.5)
    assert _get(s, "vllm:request_queue_time_seconds_sum", **w) == pytest.approx(1.5, abs=0.5)


def test_observe_all_equals_observe_one_by_one() -> None:
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from pagoda.services.ops.metrics import ITL_BUCKETS, observe_all

    gaps = [0.0, 0.005, 0.01, 0.0100001, 0.02, 0.025, 0.3, 1.0, 79.0, 80.0, 500.0, -1.0, float("nan")]
    texts = []
    for many in (False, True):
        registry = CollectorRegistry()
        hist = Histogram("itl", "gaps", ["m"], registry=registry, buckets=ITL_BUCKETS).labels("x")
        other = Histogram("tpot", "gaps", ["m"], registry=registry, buckets=ITL_BUCKETS).labels("x")
        if many:
            observe_all(hist, gaps, other)  # the second with the buckets found for the first
        else:
            for g in gaps:
                hist.observe(g)
                other.observe(g)
        text = generate_latest(registry).decode()
        texts.append(text.replace("itl_created", "#").replace("tpot_created", "#"))
    strip = ["\n".join(x for x in t.splitlines() if not x.startswith("#")) for t in texts]
    assert strip[0] == strip[1] and 'itl_bucket{le="0.01",m="x"} 4.0' in strip[1]
    assert 'tpot_bucket{le="0.01",m="x"} 4.0' in strip[1]

"""Tracing: off by default (no spans, no headers, no middleware); on, one trace per request from
the client's traceparent through the HTTP call, gateway, tokenizer, scheduler and worker, carried
in the in-memory bus's message headers."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from pagoda.engine.config import CacheConfig, EngineConfig
from pagoda.engine.core.async_engine import AsyncEngine
from pagoda.engine.core.engine_core import EngineCore
from pagoda.engine.sampling.params import SamplingParams
from pagoda.services.gateway.bus_frontend import BusFrontend
from pagoda.services.gateway.server import build_app
from pagoda.services.ops import tracing
from pagoda.services.scheduler.dispatcher import SchedulerService
from pagoda.services.scheduler.registry import WorkerRegistry
from pagoda.services.tokenizer.prompts import PromptProcessor
from pagoda.services.tokenizer.service import TokenizerService
from pagoda.services.transport.bus_memory import InMemoryBus
from pagoda.services.transport.store import InMemoryStore
from pagoda.services.worker.service import WorkerService

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exp = InMemorySpanExporter()
    assert tracing.setup("pagoda", exporter=exp)
    try:
        yield exp
    finally:
        tracing.shutdown()


def test_off_by_default_costs_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv(tracing.TRACE_FILE_ENV, raising=False)
    assert not tracing.setup("pagoda") and not tracing.enabled()
    trace = tracing.gateway_request("r", "m", True, SamplingParams())
    assert trace is tracing.NOOP and trace.headers() is None
    assert tracing.worker_request({"traceparent": "x"}, "m", SamplingParams(), 3) is tracing.NOOP
    with tracing.hop("tokenizer", "tokenizer.tokenize", {}) as span:
        assert span is tracing.NOOP


def test_bad_endpoint_is_a_user_error() -> None:
    with pytest.raises(ValueError, match="--otlp-endpoint"):
        tracing.setup("pagoda", "collector:4318")
    assert not tracing.enabled()


def _by_name(spans: list[ReadableSpan]) -> dict[str, ReadableSpan]:
    out: dict[str, ReadableSpan] = {}
    for s in spans:
        assert s.name not in out, f"two {s.name} spans"
        out[s.name] = s
    return out


def _parent_of(span: ReadableSpan) -> int:
    assert span.parent is not None, f"{span.name} has no parent"
    return span.parent.span_id


async def test_one_trace_through_all_four_services(
    demo_checkpoint: Any, exporter: InMemorySpanExporter
) -> None:
    bus, store = InMemoryBus(), InMemoryStore()
    cfg = EngineConfig(dtype="float32", max_model_len=512, cache=CacheConfig(kv_cache_memory=32 << 20))
    tok = demo_checkpoint.tokenizer
    engine = AsyncEngine(EngineCore(cfg, checkpoint=demo_checkpoint))
    model = engine.model_name
    gateway = BusFrontend(bus, tok, model_name=model, max_model_len=512, registry=WorkerRegistry(store, 0.1))
    services = [
        # the same heartbeat as the readers': at the default 1 s the gateway, reading the registry
        # with 0.1 s, saw w0 missing between beats and, on a loaded machine, moved the request
        WorkerService(engine, bus, store, worker_id="w0", heartbeat_s=0.1),
        SchedulerService(bus, store, heartbeat_s=0.1),
        TokenizerService(bus, PromptProcessor(tok, 512), model),
        gateway,
    ]
    for s in services:
        await s.start()
    try:
        app = build_app(gateway, served_model_names=["m"])
        body = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
                "temperature": 0.5, "top_p": 0.9, "stream": True}  # fmt: skip
        headers = {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"}
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            resp = await client.post("/v1/chat/completions", json=body, headers=headers)
            assert resp.status_code == 200, resp.text
            assert (await client.get("/health")).status_code == 200  # not traced
    finally:
        for s in reversed(services):
            await s.stop()
    spans = _by_name(list(exporter.get_finished_spans()))
    assert {s.context.trace_id for s in spans.values()} == {int(CLIENT_TRACE, 16)}
    http = spans["POST /v1/chat/completions"]
    assert _parent_of(http) == int(CLIENT_SPAN, 16)
    assert http.attributes is not None and http.attributes["http.response.status_code"] == 200
    chain = ["gateway.request", "tokenizer.tokenize", "scheduler.route", "worker.request", "engine.decode"]
    parent = http
    for name in chain:
        assert _parent_of(spans[name]) == parent.context.span_id, name
        parent = spans[name]
    worker = spans["worker.request"]
    for name in ("gateway.stream",):
        assert _parent_of(spans[name]) == spans["gateway.request"].context.span_id
    for name in ("engine.queue", "engine.prefill", "worker.queue"):
        assert _parent_of(spans[name]) in (worker.context.span_id, spans["scheduler.route"].context.span_id)
    assert _parent_of(spans["tokenizer.queue"]) == spans["gateway.request"].context.span_id
    ends = [spans[n].end_time or 0 for n in ("engine.queue", "engine.prefill", "engine.decode")]
    assert ends == sorted(ends)
    g, r = spans["gateway.request"].attributes, spans["scheduler.route"].attributes
    assert g is not None and r is not None
    assert g["gen_ai.request.model"] == model and g["gen_ai.operation.name"] == "chat"
    assert g["gen_ai.request.temperature"] == 0.5 and g["gen_ai.request.max_tokens"] == 4
    assert g["gen_ai.usage.output_tokens"] == 4 and g["gen_ai.usage.input_tokens"] > 0
    assert tuple(g["gen_ai.response.finish_reasons"]) == ("length",)  # type: ignore[arg-type]
    assert r["pagoda.worker_id"] == "w0" and r["pagoda.prefix_overlap_blocks"] == 0
    services_seen = {(s.attributes or {}).get("pagoda.service") for s in spans.values()}
    assert services_seen == {"gateway", "tokenizer", "scheduler", "worker"}


def test_spans_reach_an_otlp_endpoint() -> None:
    """--otlp-endpoint: spans are POSTed as OTLP/HTTP protobuf to <endpoint>/v1/traces."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    received: list[tuple[str, bytes]] = []

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append((self.path, self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert tracing.setup("pagoda-worker", f"http://127.0.0.1:{server.server_port}")
        trace = tracing.worker_request({}, "m", SamplingParams(max_tokens=3), 7)
        trace.end()
        tracing.shutdown()  # flushes the batch
    finally:
        tracing.shutdown()
        server.shutdown()
    assert [path for path, _ in received] == ["/v1/traces"]
    req = ExportTraceServiceRequest.FromString(received[0][1])
    (resource_spans,) = req.resource_spans
    names = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
    assert names["service.name"] == "pagoda-worker"
    spans = [s for scope in resource_spans.scope_spans for s in scope.spans]
    assert [s.name for s in spans] == ["worker.request"]
    attrs = {a.key: a.value for a in spans[0].attributes}
    assert (
        attrs["gen_ai.request.max_tokens"].int_value == 3
        and attrs["gen_ai.usage.input_tokens"].int_value == 7
    )

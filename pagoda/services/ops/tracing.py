"""Distributed tracing (OpenTelemetry): one trace per API request, from the gateway through the
tokenizer, scheduler and worker.

Off unless `setup()` is given an OTLP endpoint (`--otlp-endpoint`, or the standard
`OTEL_EXPORTER_OTLP_ENDPOINT`); while off every helper here returns `NOOP`, whose methods do
nothing, so the hot path pays one attribute lookup. Tests set `PAGODA_TRACE_FILE` instead: each
process appends its finished spans there as JSON lines.

The context crosses the bus as W3C `traceparent` message headers (AMQP headers, or the in-memory
bus's equivalent), next to `pagoda-sent-at`, the producer's clock when it published: a consumer
turns the wait into a `<service>.queue` span. Spans, each tagged `pagoda.service`:

    gateway    POST /v1/...            the HTTP call (pagoda/services/gateway/server.py), when traced
                 gateway.request       one engine request: gen_ai.* model, sampling, usage
                   gateway.stream      first token -> last token, as the client sees them
    tokenizer    tokenizer.queue, tokenizer.tokenize
    scheduler    scheduler.queue, scheduler.route   (pagoda.worker_id, pagoda.prefix_overlap_blocks)
    worker       worker.queue, worker.request -> engine.queue, engine.prefill, engine.decode
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider

    from pagoda.engine import RequestOutput, SamplingParams

logger = logging.getLogger("pagoda.tracing")

TRACE_FILE_ENV = "PAGODA_TRACE_FILE"  # test-only: JSON lines of finished spans
SENT_AT = "pagoda-sent-at"  # header: the producer's wall clock (ns) when it published
_PROPAGATOR = TraceContextTextMapPropagator()


class _State:
    provider: TracerProvider | None = None
    tracer: trace.Tracer | None = None
    service: str = ""


_state = _State()


def enabled() -> bool:
    return _state.tracer is not None


def setup(service: str, endpoint: str | None = None, *, exporter: SpanExporter | None = None) -> bool:
    """Turn tracing on for this process when an endpoint, the test file or an `exporter` (tests)
    is given. `service` names the process (`pagoda-worker`, or `pagoda` for the embedded server)."""
    endpoint = endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    path = os.environ.get(TRACE_FILE_ENV)
    if not endpoint and not path and exporter is None:
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    if endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        if "://" not in endpoint:
            raise ValueError(f"--otlp-endpoint {endpoint!r} is not a URL; write e.g. http://collector:4318")
        url = endpoint if endpoint.rstrip("/").endswith("/v1/traces") else endpoint.rstrip("/") + "/v1/traces"
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url)))
        logger.info("tracing: exporting spans to %s", url)
    if path:
        provider.add_span_processor(SimpleSpanProcessor(_JsonLinesExporter(path)))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    _state.provider, _state.tracer, _state.service = provider, provider.get_tracer("pagoda"), service
    return True


def shutdown() -> None:
    """Flush and stop the exporters (on process exit)."""
    provider, _state.provider, _state.tracer = _state.provider, None, None
    if provider is not None:
        provider.shutdown()


def _now_ns() -> int:
    return time.time_ns()


def _headers(span: trace.Span) -> dict[str, str]:
    carrier: dict[str, str] = {SENT_AT: str(_now_ns())}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    return carrier


def _start(
    name: str, service: str, parent: Context | None, attrs: Mapping[str, Any], **kw: Any
) -> trace.Span:
    assert _state.tracer is not None
    span = _state.tracer.start_span(name, context=parent, **kw)
    span.set_attribute("pagoda.service", service)
    for key, value in attrs.items():
        if value is not None:
            span.set_attribute(key, value)
    return span


def _consumed(service: str, headers: Mapping[str, str]) -> Context | None:
    """The producer's context from a message's headers; records the wait as `<service>.queue`."""
    if "traceparent" not in headers:
        return None
    parent = _PROPAGATOR.extract(headers)
    sent = headers.get(SENT_AT, "")
    if sent.isdigit():
        wait = _start(f"{service}.queue", service, parent, {}, start_time=int(sent))
        wait.end()
    return parent


class TraceHandle:
    """What every helper returns while tracing is off: accepts every call, does nothing."""

    def set(self, key: str, value: Any) -> None:
        pass

    def headers(self) -> dict[str, str] | None:
        return None

    def output(self, out: RequestOutput) -> None:
        pass

    def fail(self, error: BaseException | str) -> None:
        pass

    def end(self, error: BaseException | str | None = None) -> None:
        pass


NOOP = TraceHandle()


class SpanHandle(TraceHandle):
    """One span of a service: attributes, and the headers that make the next hop its child."""

    def __init__(self, span: trace.Span) -> None:
        self.span = span
        self.ended = False

    def set(self, key: str, value: Any) -> None:
        self.span.set_attribute(key, value)

    def headers(self) -> dict[str, str] | None:
        return _headers(self.span)

    def fail(self, error: BaseException | str) -> None:
        self.span.set_status(trace.Status(trace.StatusCode.ERROR, str(error)))

    def end(self, error: BaseException | str | None = None) -> None:
        if self.ended:
            return
        self.ended = True
        if error is not None:
            self.fail(error)
        self._finish()
        self.span.end()

    def _finish(self) -> None:
        """Last attributes and child spans, once, before the span ends."""


@contextlib.contextmanager
def hop(service: str, name: str, headers: Mapping[str, str], **attrs: Any) -> Iterator[TraceHandle]:
    """A consumer's processing span, child of the message's producer (tokenizer, scheduler)."""
    if _state.tracer is None:
        yield NOOP
        return
    handle = SpanHandle(_start(name, service, _consumed(service, headers), attrs))
    try:
        yield handle
    except BaseException as exc:
        handle.end(exc)
        raise
    handle.end()


def sampling_attributes(model: str, params: SamplingParams) -> dict[str, Any]:
    """gen_ai.* request attributes (OpenTelemetry's GenAI semantic conventions)."""
    return {
        "gen_ai.request.model": model,
        "gen_ai.request.max_tokens": params.max_tokens,
        "gen_ai.request.temperature": params.temperature,
        "gen_ai.request.top_p": params.top_p,
        "gen_ai.request.top_k": params.top_k,
        "gen_ai.request.seed": params.seed,
        "gen_ai.request.frequency_penalty": params.frequency_penalty,
        "gen_ai.request.presence_penalty": params.presence_penalty,
        "gen_ai.request.choice.count": params.n,
    }


class _RequestTrace(SpanHandle):
    """Outputs of one request seen by the gateway or a worker: usage and finish reasons at the end."""

    def __init__(self, span: trace.Span) -> None:
        super().__init__(span)
        self.first_token_ns: int | None = None
        self.output_tokens: dict[int, int] = {}  # choice index -> tokens so far
        self.finish_reasons: dict[int, str] = {}
        self.cached_tokens = 0

    def output(self, out: RequestOutput) -> None:
        if self.first_token_ns is None and out.new_token_ids:
            self.first_token_ns = _now_ns()
            self.first_token()
        self.output_tokens[out.index] = out.num_output_tokens
        self.cached_tokens = out.num_cached_tokens
        if out.finished and out.finish_reason is not None:
            self.finish_reasons[out.index] = out.finish_reason

    def first_token(self) -> None:
        pass

    def _finish(self) -> None:
        self.span.set_attribute("gen_ai.usage.output_tokens", sum(self.output_tokens.values()))
        self.span.set_attribute("gen_ai.response.finish_reasons", sorted(set(self.finish_reasons.values())))


class GatewayTrace(_RequestTrace):
    def first_token(self) -> None:
        self.span.add_event("first_token")
        self.stream = _start("gateway.stream", "gateway", trace.set_span_in_context(self.span), {})

    def _finish(self) -> None:
        super()._finish()
        if self.first_token_ns is not None:
            self.stream.end()


def gateway_request(
    request_id: str, model: str, chat: bool, params: SamplingParams, prompt_tokens: int | None = None
) -> TraceHandle:
    """The gateway's span of one engine request; a child of the HTTP call's span when traced."""
    if _state.tracer is None:
        return NOOP
    attrs = {
        "gen_ai.operation.name": "chat" if chat else "text_completion",
        "gen_ai.request.id": request_id,
        "gen_ai.usage.input_tokens": prompt_tokens,
        **sampling_attributes(model, params),
    }
    return GatewayTrace(_start("gateway.request", "gateway", None, attrs, kind=trace.SpanKind.PRODUCER))


class WorkerTrace(_RequestTrace):
    """The worker's span of one request, with engine.queue / engine.prefill / engine.decode
    children timed from the outputs (queue time from the engine, prefill until the first token)."""

    def __init__(self, span: trace.Span) -> None:
        super().__init__(span)
        self.received_ns = _now_ns()

    def output(self, out: RequestOutput) -> None:
        first = self.first_token_ns is None and bool(out.new_token_ids)
        super().output(out)
        if first:
            queue_s = out.queue_time_s if out.queue_time_s is not None else 0.0
            self.scheduled_ns = self.received_ns + int(queue_s * 1e9)
            self.span.set_attribute("gen_ai.latency.time_in_queue", queue_s)
            self.span.set_attribute("pagoda.cached_tokens", out.num_cached_tokens)

    def _finish(self) -> None:
        super()._finish()
        ctx = trace.set_span_in_context(self.span)
        now = _now_ns()
        if self.first_token_ns is not None:
            phases = (
                ("engine.queue", self.received_ns, self.scheduled_ns),
                ("engine.prefill", self.scheduled_ns, self.first_token_ns),
                ("engine.decode", self.first_token_ns, now),
            )
            for name, start, stop in phases:
                _start(name, "worker", ctx, {}, start_time=start).end(end_time=max(stop, start))


def worker_request(
    headers: Mapping[str, str], model: str, params: SamplingParams, prompt_tokens: int
) -> TraceHandle:
    if _state.tracer is None:
        return NOOP
    attrs = {"gen_ai.usage.input_tokens": prompt_tokens, **sampling_attributes(model, params)}
    parent = _consumed("worker", headers)
    return WorkerTrace(_start("worker.request", "worker", parent, attrs, kind=trace.SpanKind.CONSUMER))


class TraceMiddleware:
    """ASGI middleware (added only while tracing is on): one SERVER span per HTTP call, a child of
    the client's `traceparent` when it sends one; the engine requests it makes are its children."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or _state.tracer is None or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])}
        parent = _PROPAGATOR.extract(carrier)
        name = f"{scope['method']} {scope['path']}"
        attrs = {"http.request.method": scope["method"], "url.path": scope["path"]}
        span = _start(name, "gateway", parent, attrs, kind=trace.SpanKind.SERVER)

        async def send_status(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                span.set_attribute("http.response.status_code", message["status"])
                if message["status"] >= 500:
                    span.set_status(trace.Status(trace.StatusCode.ERROR))
            await send(message)

        try:
            with trace.use_span(span, end_on_exit=False):
                await self.app(scope, receive, send_status)
        finally:
            span.end()


class _JsonLinesExporter(SpanExporter):
    """Appends finished spans to a file, one JSON object per line (tests read it back)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = "".join(s.to_json(indent=None) + "\n" for s in spans)
        with self.lock, open(self.path, "a") as f:
            f.write(lines)
        return SpanExportResult.SUCCESS

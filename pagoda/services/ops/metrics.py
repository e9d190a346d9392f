"""Prometheus metrics of the services, named like vLLM's (`vllm:*`, label `model_name`) so that
existing dashboards work, plus `pagoda:*` ones for the cluster scheduler.

`Metrics` owns one `CollectorRegistry` (never the process-wide default: tests and the embedded
`pagoda serve` run several services in one process) and builds each service's part of it once:

- `gateway()`: per-request histograms and counters, observed when the OpenAI server
  finishes a request (pagoda/services/gateway/streams.py), and HTTP responses by status.
- `engines()`: the workers' engine cores, read on scrape (`EngineCollector`): the figures are
  plain ints and floats that the engine's step thread updates, so reading them is safe.
- `worker()`: per-request queue, prefill, decode and inference time on a worker's engine.
- `scheduler()`: routing decisions, refusals and the schedule queue's depth.

The gateway serves the registry at GET /metrics on its API port; a worker or scheduler process
without a gateway serves it with `serve(port)` (`--metrics-port`).
"""

from __future__ import annotations

import collections
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from pagoda.engine import CoreCounters

__all__ = [
    "CONTENT_TYPE_LATEST",
    "EngineCollector",
    "GatewayMetrics",
    "Metrics",
    "SchedulerMetrics",
    "WorkerMetrics",
]

# the buckets vLLM uses (vllm/v1/metrics/loggers.py)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
               20.0, 40.0, 80.0)  # fmt: skip
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                   120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
TOKEN_BUCKETS = tuple(float(m * 10**e) for e in range(6) for m in (1, 2, 5))  # 1, 2, 5, 10, ... 500000


def observe_all(hist: Histogram, values: Sequence[float], *same: Histogram) -> None:
    """`hist.observe(v)` for each of `values` (a request's inter-token gaps, one per token), with
    one increment per bucket touched instead of a lock and a bucket scan per value; `same`: more
    histograms with `hist`'s buckets that get the same values (the buckets found once for all).
    It reaches into prometheus_client's Histogram (`_upper_bounds`, `_buckets`, `_sum`); without
    them, it observes one by one. tests/unit/test_metrics.py holds it to `observe`."""
    hists = (hist, *same)
    bounds = getattr(hist, "_upper_bounds", None)
    parts = [(getattr(h, "_buckets", None), getattr(h, "_sum", None)) for h in hists]
    alike = all(getattr(h, "_upper_bounds", None) == bounds for h in hists)
    if bounds is None or not alike or any(b is None or t is None for b, t in parts):
        for h in hists:
            for v in values:
                h.observe(v)
        return
    # observe's bucket for v: the first bound >= v (NaN: none, but it is added to the sum)
    counts = collections.Counter(bisect_left(bounds, v) for v in values if v == v)
    total = sum(values)
    for buckets, hist_sum in parts:
        assert buckets is not None and hist_sum is not None
        hist_sum.inc(total)
        for i, n in counts.items():
            buckets[i].inc(n)


@dataclass
class ServedRequest:
    """What the gateway knows of one API call when it ends."""

    status: int | str  # an HTTP status, or "disconnected"
    e2e_s: float
    ttft_s: float | None  # None when no token came
    token_gaps_s: Sequence[float] = ()  # inter-token latencies, per choice
    prompt_tokens: int = 0
    generation_tokens: int = 0
    finish_reasons: Sequence[str | None] = ()  # one per choice; None: did not finish
    submitted: bool = False  # the request reached the engine


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        m = ["model_name"]

        def hist(name: str, doc: str, buckets: Sequence[float]) -> Histogram:
            return Histogram(name, doc, m, registry=registry, buckets=buckets)

        self.ttft = hist(
            "vllm:time_to_first_token_seconds", "Time to first token from arrival.", TTFT_BUCKETS
        )
        self.itl = hist("vllm:inter_token_latency_seconds", "Time between tokens of a choice.", ITL_BUCKETS)
        self.tpot = hist("vllm:time_per_output_token_seconds", "Old name of the ITL histogram.", ITL_BUCKETS)
        self.e2e = hist("vllm:e2e_request_latency_seconds", "Arrival to last token.", LATENCY_BUCKETS)
        self.req_prompt = hist("vllm:request_prompt_tokens", "Prompt tokens per request.", TOKEN_BUCKETS)
        self.req_generation = hist(
            "vllm:request_generation_tokens", "Output tokens per request.", TOKEN_BUCKETS
        )
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens processed.", m, registry=registry)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated.", m, registry=registry)
        self.success = Counter(
            "vllm:request_success",
            "Finished choices by finish reason.",
            [*m, "finished_reason"],
            registry=registry,
        )
        self.http = Counter(
            "pagoda:http_responses", "API responses by HTTP status.", [*m, "status"], registry=registry
        )

    def observe(self, model_name: str, rec: ServedRequest) -> None:
        """One API call ended: counters for anything that reached the engine; the latency and size
        histograms for completed calls; success by finish reason for completed or abandoned ones."""
        if rec.submitted:
            self.prompt_tokens.labels(model_name).inc(rec.prompt_tokens)
            self.generation_tokens.labels(model_name).inc(rec.generation_tokens)
        if rec.ttft_s is not None:
            self.ttft.labels(model_name).observe(rec.ttft_s)
        if rec.token_gaps_s:
            observe_all(self.itl.labels(model_name), rec.token_gaps_s, self.tpot.labels(model_name))
        if rec.submitted and rec.status == 200:
            self.e2e.labels(model_name).observe(rec.e2e_s)
            self.req_prompt.labels(model_name).observe(rec.prompt_tokens)
            self.req_generation.labels(model_name).observe(rec.generation_tokens)
        if rec.submitted and rec.status in (200, "disconnected"):
            for reason in rec.finish_reasons:
                self.success.labels(model_name, reason or "abort").inc()

    def response(self, model_name: str, status: int) -> None:
        self.http.labels(model_name, str(status)).inc()


class CoreSource(Protocol):
    model_name: str

    def counters(self) -> CoreCounters: ...


@dataclass
class _Engine:
    model_name: str
    core: CoreSource


class EngineCollector:
    """Reads every registered engine core on scrape; label `engine` tells workers apart when a
    process runs several (vLLM's label for the same)."""

    def __init__(self) -> None:
        self.engines: dict[str, _Engine] = {}
        self.lock = threading.Lock()

    def add(self, engine_id: str, core: CoreSource) -> None:
        with self.lock:
            self.engines[engine_id] = _Engine(core.model_name, core)

    def remove(self, engine_id: str) -> None:
        with self.lock:
            self.engines.pop(engine_id, None)

    def collect(self) -> Iterable[Metric]:
        labels = ["model_name", "engine"]
        gauges = {
            "num_running": GaugeMetricFamily("vllm:num_requests_running", "Requests running.", labels=labels),
            "num_waiting": GaugeMetricFamily("vllm:num_requests_waiting", "Requests waiting.", labels=labels),
            "kv_usage": GaugeMetricFamily("vllm:kv_cache_usage_perc", "KV cache usage, 0..1.", labels=labels),
            "kv_live_tokens": GaugeMetricFamily(
                "pagoda:kv_cache_live_tokens", "Tokens stored in the KV blocks in use.", labels=labels
            ),
            "kv_used_slots": GaugeMetricFamily(
                "pagoda:kv_cache_used_slots", "KV blocks in use x block size.", labels=labels
            ),
            "kv_live_token_ratio": GaugeMetricFamily(
                "pagoda:kv_cache_live_token_ratio",
                "Live tokens / slots of the KV blocks in use, 0..1 (0 when idle).",
                labels=labels,
            ),
        }
        counters = {
            "prefix_query_tokens": CounterMetricFamily(
                "vllm:prefix_cache_queries", "Prefix cache queries, in tokens.", labels=labels
            ),
            "prefix_hit_tokens": CounterMetricFamily(
                "vllm:prefix_cache_hits", "Prefix cache hits, in tokens.", labels=labels
            ),
            "num_preemptions": CounterMetricFamily("vllm:num_preemptions", "Preemptions.", labels=labels),
        }
        with self.lock:
            engines = list(self.engines.items())
        readings = [([e.model_name, engine_id], e.core.counters()) for engine_id, e in engines]
        for labels_of, c in readings:
            for name, gauge in gauges.items():
                gauge.add_metric(labels_of, float(getattr(c, name)))
            for name, counter in counters.items():
                counter.add_metric(labels_of, float(getattr(c, name)))
        yield from gauges.values()
        yield from counters.values()
        yield from _spec_decode_families(readings)


def _spec_decode_families(readings: list[tuple[list[str], CoreCounters]]) -> list[Metric]:
    """vLLM's speculative decoding counters, with a sample for each engine that speculates."""
    labels = ["model_name", "engine"]
    families = {
        "spec_num_drafts": CounterMetricFamily(
            "vllm:spec_decode_num_drafts", "Sequence-steps that verified draft tokens.", labels=labels
        ),
        "spec_num_draft_tokens": CounterMetricFamily(
            "vllm:spec_decode_num_draft_tokens", "Draft tokens verified.", labels=labels
        ),
        "spec_num_accepted_tokens": CounterMetricFamily(
            "vllm:spec_decode_num_accepted_tokens", "Draft tokens accepted.", labels=labels
        ),
    }
    per_pos = CounterMetricFamily(
        "vllm:spec_decode_num_accepted_tokens_per_pos",
        "Draft tokens accepted, by their position in the draft (0-based).",
        labels=[*labels, "position"],
    )
    for labels_of, c in readings:
        if not c.spec_num_accepted_tokens_per_pos:  # the engine does not speculate
            continue
        for name, family in families.items():
            family.add_metric(labels_of, float(getattr(c, name)))
        for pos, n in enumerate(c.spec_num_accepted_tokens_per_pos):
            per_pos.add_metric([*labels_of, str(pos)], float(n))
    return [*families.values(), per_pos]


class SchedulerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.routed = Counter(
            "pagoda:routing_decisions",
            "Requests routed by worker and reason.",
            ["worker", "reason"],
            registry=registry,
        )
        self.rejected = Counter(
            "pagoda:scheduler_rejected", "Requests the scheduler refused.", ["reason"], registry=registry
        )
        self.queue_depth = Gauge(
            "pagoda:schedule_queue_depth", "Messages ready in the schedule queue.", registry=registry
        )


class WorkerMetrics:
    """Per-request phases on a worker's engine, observed when a request finishes (vLLM's names)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["model_name", "engine"]

        def hist(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, labels, registry=registry, buckets=LATENCY_BUCKETS)

        self.queue = hist("vllm:request_queue_time_seconds", "Arrival on the engine to first schedule.")
        self.prefill = hist("vllm:request_prefill_time_seconds", "First schedule to first token.")
        self.decode = hist("vllm:request_decode_time_seconds", "First token to last token.")
        self.inference = hist("vllm:request_inference_time_seconds", "First schedule to last token.")

    def observe(
        self, model_name: str, engine: str, arrived: float, queue_s: float | None, first_token: float | None
    ) -> None:
        """`arrived`, `first_token`: monotonic times; a request that never produced a token (aborted
        while waiting) only counts its queue time."""
        now = time.monotonic()
        if queue_s is None:
            self.queue.labels(model_name, engine).observe(now - arrived)
            return
        scheduled = arrived + queue_s
        self.queue.labels(model_name, engine).observe(queue_s)
        if first_token is not None:
            self.prefill.labels(model_name, engine).observe(max(first_token - scheduled, 0.0))
            self.decode.labels(model_name, engine).observe(now - first_token)
        self.inference.labels(model_name, engine).observe(max(now - scheduled, 0.0))


class Metrics:
    """One registry and the metrics of the services that share it (one per process, or per test)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._lock = threading.Lock()
        self._gateway: GatewayMetrics | None = None
        self._engines: EngineCollector | None = None
        self._scheduler: SchedulerMetrics | None = None
        self._worker: WorkerMetrics | None = None

    def gateway(self) -> GatewayMetrics:
        with self._lock:
            if self._gateway is None:
                self._gateway = GatewayMetrics(self.registry)
            return self._gateway

    def engines(self) -> EngineCollector:
        with self._lock:
            if self._engines is None:
                self._engines = EngineCollector()
                self.registry.register(self._engines)
            return self._engines

    def scheduler(self) -> SchedulerMetrics:
        with self._lock:
            if self._scheduler is None:
                self._scheduler = SchedulerMetrics(self.registry)
            return self._scheduler

    def worker(self) -> WorkerMetrics:
        with self._lock:
            if self._worker is None:
                self._worker = WorkerMetrics(self.registry)
            return self._worker

    def render(self) -> bytes:
        """The registry in Prometheus' text format (CONTENT_TYPE_LATEST)."""
        return generate_latest(self.registry)

    def serve(self, port: int, host: str = "0.0.0.0", ready: Callable[[], bool] | None = None) -> _HTTPServer:
        """Serve GET /metrics, /health (the process answers) and /health/ready (`ready()`; a
        draining or stalled worker is not ready) on its own port, from a thread, for processes
        without a gateway; Kubernetes probes these. Always the classic text format, as the gateway
        serves it: prometheus_client's own server answers a scraper asking for OpenMetrics with
        names escaped (`vllm_...`), which would break dashboards written for vLLM's `vllm:` names."""
        registry = self.registry

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    body, ctype, status = generate_latest(registry), CONTENT_TYPE_LATEST, 200
                elif path == "/health":
                    body, ctype, status = b"ok\n", "text/plain", 200
                elif path == "/health/ready":
                    ok = ready is None or ready()
                    body, ctype = (b"ready\n" if ok else b"not ready\n"), "text/plain"
                    status = 200 if ok else 503
                else:
                    body, ctype, status = b"not found: try /metrics\n", "text/plain", 404
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # scrapes are not worth a log line each

        try:
            server = ThreadingHTTPServer((host, port), Handler)
        except OSError as err:
            raise ValueError(
                f"cannot serve metrics on {host}:{port} ({err}); choose another --metrics-port"
            ) from None
        server.daemon_threads = True
        thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
        thread.start()
        return _HTTPServer(server, thread)


@dataclass
class _HTTPServer:
    server: ThreadingHTTPServer
    thread: threading.Thread

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5.0)

"""Observability of a live cluster (four processes over the real RabbitMQ and Redis):

- one trace per request: the spans each process writes (PAGODA_TRACE_FILE) chain gateway ->
  tokenizer -> scheduler -> worker through the traceparent carried in AMQP headers;
- under concurrent load the counters equal what the clients sent and received;
- a real Prometheus (Debian's package) scrapes the stack, and the dashboard's PromQL returns the
  values of the run.
"""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.processes import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def stack(cluster: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The session's cluster, scraped by a Prometheus of its own."""
    tmp = tmp_path_factory.mktemp("prometheus")
    ports = {f"{role}": port for role, port in cluster["metrics_ports"].items()}
    ports["gateway"] = int(cluster["base"].rsplit(":", 1)[1])
    ports["prometheus"] = free_port()
    prometheus = _start_prometheus(tmp, ports)
    _wait_scraped(f"http://127.0.0.1:{ports['prometheus']}", targets=4)
    model = httpx.get(f"{cluster['base']}/v1/models", timeout=10).json()["data"][0]["id"]
    try:
        yield {
            **cluster,
            "ports": ports,
            "model": model,
            "prometheus": f"http://127.0.0.1:{ports['prometheus']}",
        }
    finally:
        prometheus.terminate()
        prometheus.wait(30)


def _start_prometheus(tmp: Path, ports: dict[str, int]) -> subprocess.Popen[bytes]:
    jobs = {"gateway": ["gateway"], "worker": ["w1", "w2"], "scheduler": ["scheduler"]}
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{ports[n]}" for n in names]}]}
            for job, names in jobs.items()
        ],
    }
    (tmp / "prometheus.yaml").write_text(yaml.safe_dump(config))
    log = (tmp / "prometheus.log").open("w")
    proc = subprocess.Popen(
        ["prometheus", f"--config.file={tmp / 'prometheus.yaml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{ports['prometheus']}"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, (tmp / "prometheus.log").read_text()
        try:
            if httpx.get(f"http://127.0.0.1:{ports['prometheus']}/-/ready", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise AssertionError("prometheus did not become ready:\n" + (tmp / "prometheus.log").read_text())


# ------------------------------------------------------------------------------------ tracing


def _spans_of(path: Path, trace_id: str, want: set[str], timeout: float = 20.0) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        spans: dict[str, dict[str, Any]] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                span = json.loads(line)
                if span["context"]["trace_id"] == f"0x{trace_id}":
                    assert span["name"] not in spans, f"two {span['name']} spans"
                    spans[span["name"]] = span
        if want <= set(spans) or time.monotonic() > deadline:
            return spans
        time.sleep(0.2)


def test_one_trace_spans_all_four_services(stack: dict[str, Any]) -> None:
    trace_id, client_span = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    messages = [{"role": "user", "content": "Name a colour."}]
    body = {
        "model": stack["model"],
        "messages": messages,
        "max_tokens": 5,
        "temperature": 0.7,
        "stream": True,
    }
    headers = {"traceparent": f"00-{trace_id}-{client_span}-01"}
    resp = httpx.post(f"{stack['base']}/v1/chat/completions", json=body, headers=headers, timeout=60)
    assert resp.status_code == 200, resp.text
    chain = ["POST /v1/chat/completions", "gateway.request", "tokenizer.tokenize", "scheduler.route",
             "worker.request"]  # fmt: skip
    spans = _spans_of(stack["spans"], trace_id, {*chain, "engine.decode", "gateway.stream"})
    assert set(chain) <= set(spans), sorted(spans)
    services = {"gateway": "pagoda-gateway", "tokenizer": "pagoda-tokenizer", "scheduler": "pagoda-scheduler",
                "worker": "pagoda-worker"}  # fmt: skip
    parent = f"0x{client_span}"
    for name in chain:  # each span is the child of the one before, across four processes
        span = spans[name]
        assert span["parent_id"] == parent, (name, span["parent_id"], parent)
        role = span["attributes"]["pagoda.service"]
        assert span["resource"]["attributes"]["service.name"] == services[role], name
        parent = span["context"]["span_id"]
    assert [spans[n]["attributes"]["pagoda.service"] for n in chain[1:]] == list(services)
    for name in ("engine.queue", "engine.prefill", "engine.decode"):
        assert spans[name]["parent_id"] == spans["worker.request"]["context"]["span_id"], name
    for role in ("tokenizer", "scheduler", "worker"):  # the wait in each queue
        assert f"{role}.queue" in spans
    route, worker = spans["scheduler.route"]["attributes"], spans["worker.request"]["attributes"]
    assert route["pagoda.worker_id"] in ("w1", "w2") and "pagoda.prefix_overlap_blocks" in route
    assert worker["gen_ai.request.temperature"] == 0.7 and worker["gen_ai.request.max_tokens"] == 5
    assert (
        worker["gen_ai.usage.output_tokens"]
        == spans["gateway.request"]["attributes"]["gen_ai.usage.output_tokens"]
    )
    assert 0 < worker["gen_ai.usage.output_tokens"] <= 5


# ------------------------------------------------------------------------------------ metrics


def _scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = httpx.get(url, timeout=10).text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _total(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def _requests(model: str, i: int) -> tuple[str, dict[str, Any]]:
    """A mix: chat and completions, streamed or not, n=2, stop strings (finish "stop") and short
    max_tokens (finish "length")."""
    chat = {"model": model, "messages": [{"role": "user", "content": f"Say something about {i}."}]}
    usage = {"stream_options": {"include_usage": True}}
    return [
        ("/v1/chat/completions", {**chat, "max_tokens": 4}),
        ("/v1/completions", {"model": model, "prompt": f"Item {i}: the", "max_tokens": 30, "stop": [" "],
                             "stream": True, **usage}),
        ("/v1/completions", {"model": model, "prompt": f"Count {i},", "max_tokens": 3, "n": 2}),
        ("/v1/chat/completions", {**chat, "max_tokens": 6, "stream": True, **usage}),
    ][i % 4]  # fmt: skip


async def _send(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> dict[str, Any]:
    resp = await client.post(path, json=body)
    if resp.status_code != 200:
        return {"status": resp.status_code}
    if not body.get("stream"):
        data = resp.json()
        return {
            "status": 200,
            "usage": data["usage"],
            "reasons": [c["finish_reason"] for c in data["choices"]],
        }
    reasons, usage = [], None
    for line in resp.text.split("\n\n"):
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[len("data: ") :])
        usage = chunk.get("usage") or usage
        reasons += [c["finish_reason"] for c in chunk.get("choices", []) if c.get("finish_reason")]
    return {"status": 200, "usage": usage, "reasons": reasons}


def _prom(base: str, expr: str) -> list[dict[str, Any]]:
    resp = httpx.get(f"{base}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert resp["status"] == "success", (expr, resp)
    return resp["data"]["result"]  # type: ignore[no-any-return]


def _value(result: list[dict[str, Any]]) -> float:
    assert len(result) == 1, result
    return float(result[0]["value"][1])


def _wait_scraped(prom: str, targets: int) -> None:
    """Until every target has been scraped once: counters that rise before Prometheus first sees
    them would have no rate (the dashboard's Throughput panel) over the run."""
    deadline = time.monotonic() + 30
    while len(_prom(prom, "up == 1")) < targets:
        assert time.monotonic() < deadline, f"prometheus did not scrape the stack: {_prom(prom, 'up')}"
        time.sleep(0.3)


def test_counters_match_the_requests_sent_and_prometheus_reads_them(stack: dict[str, Any]) -> None:
    gateway, ports, model = f"{stack['base']}/metrics", stack["ports"], stack["model"]
    w1, w2, scheduler = (f"http://127.0.0.1:{ports[r]}/metrics" for r in ("w1", "w2", "scheduler"))
    urls = (gateway, w1, w2, scheduler)
    before = {url: _scrape(url) for url in urls}
    n = 24
    long_prompt = {"model": model, "prompt": "word " * 3000, "max_tokens": 2}  # over max_model_len: 400

    async def run() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(base_url=stack["base"], timeout=120) as client:
            sends = [_send(client, *_requests(model, i)) for i in range(n)]
            sends += [_send(client, "/v1/completions", long_prompt) for _ in range(2)]
            return await asyncio.gather(*sends)

    results = asyncio.run(run())
    ok = [r for r in results if r["status"] == 200]
    assert len(ok) == n and [r["status"] for r in results[n:]] == [400, 400], results
    reasons = Counter(reason for r in ok for reason in r["reasons"])
    assert sum(reasons.values()) == n + n // 4  # n=2 requests have two choices
    assert reasons["length"] > 0 and reasons["stop"] > 0, reasons
    prompt_tokens = sum(r["usage"]["prompt_tokens"] for r in ok)
    generated = sum(r["usage"]["completion_tokens"] for r in ok)

    # a stop string ends a choice at the gateway, which then aborts the rest on the worker: wait
    # until the workers have finished every request of the run
    deadline = time.monotonic() + 20
    while True:
        after = {url: _scrape(url) for url in urls}
        busy = sum(
            _total(after[u], f"vllm:num_requests_{k}") for u in (w1, w2) for k in ("running", "waiting")
        )
        done = sum(
            _total(after[u], "vllm:request_queue_time_seconds_count")
            - _total(before[u], "vllm:request_queue_time_seconds_count")
            for u in (w1, w2)
        )
        if (busy == 0 and done == n) or time.monotonic() > deadline:
            break
        time.sleep(0.2)

    def delta(url: str, name: str, **labels: str) -> float:
        return _total(after[url], name, **labels) - _total(before[url], name, **labels)

    assert delta(gateway, "vllm:prompt_tokens_total") == prompt_tokens
    assert delta(gateway, "vllm:generation_tokens_total") == generated
    for reason in ("stop", "length", "abort"):
        assert delta(gateway, "vllm:request_success_total", finished_reason=reason) == reasons[reason], reason
    assert delta(gateway, "vllm:e2e_request_latency_seconds_count") == n
    assert delta(gateway, "vllm:time_to_first_token_seconds_count") == n
    assert delta(gateway, "pagoda:http_responses_total", status="200") == n
    assert delta(gateway, "pagoda:http_responses_total", status="400") == 2
    routed = {w: delta(scheduler, "pagoda:routing_decisions_total", worker=w) for w in ("w1", "w2")}
    assert sum(routed.values()) == n, routed
    for w, url in (("w1", w1), ("w2", w2)):  # one engine request per API call, on the worker routed to
        assert delta(url, "vllm:request_queue_time_seconds_count", engine=w) == routed[w], w
        assert delta(url, "vllm:request_prefill_time_seconds_count", engine=w) == routed[w], w
        assert _total(after[url], "vllm:num_requests_running") == 0

    # Prometheus has scraped the end of the run: the dashboard's queries return its values
    prom = stack["prometheus"]
    want = _total(after[gateway], "vllm:generation_tokens_total")
    deadline = time.monotonic() + 30
    while _value(_prom(prom, "sum(vllm:generation_tokens_total)") or [{"value": [0, "0"]}]) != want:
        assert time.monotonic() < deadline, "prometheus did not scrape the final counters"
        time.sleep(0.5)
    time.sleep(2.5)  # two more scrapes of the idle stack
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/pagoda.json").read_text())
    panels = {p["title"]: [t["expr"].replace("$__rate_interval", "1m") for t in p["targets"]]
              for p in dashboard["panels"]}  # fmt: skip
    values = {expr: _prom(prom, expr) for exprs in panels.values() for expr in exprs}
    # series that exist only once it happens: preemptions, rejections, speculation (off here)
    absent = ("preemptions", "scheduler_rejected", "spec_decode")
    empty = [e for e, r in values.items() if not r and not any(a in e for a in absent)]
    assert not empty, f"dashboard queries without data: {empty}"

    def panel(title: str, i: int = 0) -> list[dict[str, Any]]:
        return values[panels[title][i]]

    assert _value(panel("Generated tokens")) == want
    assert _value(panel("Prompt tokens")) == _total(after[gateway], "vllm:prompt_tokens_total")
    assert _value(panel("Requests finished")) == _total(after[gateway], "vllm:request_success_total")
    hits, queries = (
        _total(after[w1], f"vllm:prefix_cache_{k}_total") + _total(after[w2], f"vllm:prefix_cache_{k}_total")
        for k in ("hits", "queries")
    )
    assert _value(panel("Prefix cache hit rate")) == pytest.approx(hits / queries)
    assert _value(panel("Throughput")) > 0  # generated tokens per second over the last minute
    for title in (
        "Time to first token",
        "Inter-token latency",
        "End-to-end latency",
        "Queue time on the engine",
    ):
        quantiles = [_value(panel(title, i)) for i in range(3)]
        assert all(math.isfinite(q) and q >= 0 for q in quantiles), (title, quantiles)
        assert quantiles == sorted(quantiles), (title, quantiles)  # p50 <= p90 <= p99
    by_reason = {r["metric"]["finished_reason"]: float(r["value"][1]) for r in panel("Finish reasons")}
    assert set(by_reason) >= {k for k, v in reasons.items() if v}
    assert {r["metric"]["worker"] for r in panel("Routing decisions per worker")} <= {"w1", "w2"}
    load = {r["metric"]["engine"]: float(r["value"][1]) for r in panel("Load per worker")}
    assert load == {"w1": 0, "w2": 0}  # both idle after the run
    kv = {r["metric"]["engine"]: float(r["value"][1]) for r in panel("KV cache usage per worker")}
    assert set(kv) == {"w1", "w2"} and all(0 <= v <= 1 for v in kv.values())
    assert _value(panel("Queue", 2)) == 0  # the schedule queue drained
    errors = {r["metric"].get("status") for r in panel("Refusals and errors", 1)}
    assert "400" in errors

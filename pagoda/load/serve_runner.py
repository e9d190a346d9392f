"""The measuring core of `pagoda bench serve`: `run_benchmark(config) -> BenchResult` plus the
pure `summarize(records, duration, slo)`.

Requests stream over httpx with SSE parsed here (not the openai SDK) so every chunk is timed where
it arrives.

Arrivals: `--request-rate R` starts conversations as a Poisson process (inf: all at once), and
`--concurrency N` caps how many run at a time (closed loop). A conversation holds its slot for all
its turns, which run in order; random and ShareGPT conversations are a single turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import httpx
import numpy as np
from tqdm import tqdm

from pagoda.load.datasets import BenchTurn, Conversation, DatasetSpec, load_dataset, sample_text
from pagoda.load.outcomes import HUNG_PREFIX, count_outcomes
from pagoda.load.server_metrics import KvSampler, summarize_kv
from pagoda.load.sse_client import LineSplitter, StreamTimer

SLO_KEYS = ("ttft", "tpot", "e2e")


def parse_slo(text: str | None) -> dict[str, float]:
    """Parse "ttft=500,tpot=50" into {"ttft": 500.0, "tpot": 50.0} (milliseconds)."""
    if not text:
        return {}
    slo: dict[str, float] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = "e2e" if key.strip() == "e2el" else key.strip()
        try:
            bound = float(value)
        except ValueError:
            bound = -1.0
        if not sep or key not in SLO_KEYS or bound <= 0:
            raise ValueError(f"--slo part {part!r} should be KEY=MS with KEY in {', '.join(SLO_KEYS)}")
        slo[key] = bound
    return slo


@dataclass(frozen=True)
class ServeConfig:
    base_url: str
    model: str | None = None  # None: the first of GET /v1/models
    endpoint: str = "chat"  # chat | completions
    concurrency: int | None = None  # None: no cap
    request_rate: float = math.inf  # conversations started per second (Poisson)
    dataset: DatasetSpec = field(default_factory=lambda: DatasetSpec(name="random", num_prompts=100))
    ignore_eos: bool = False
    # with ignore_eos also send min_tokens = max_tokens: servers without ignore_eos (llama-cpp-python)
    min_tokens_for_eos: bool = False
    slo: dict[str, float] = field(default_factory=dict)
    api_key: str | None = None
    tokenize: bool = True  # calibrate tokens per word with the server's /tokenize when it has one
    request_timeout_s: float = 300.0  # total per request
    max_duration_s: float = 3600.0  # total for the run; unfinished requests count as errors
    progress: bool = True
    # /metrics URLs to sample the KV cache from while the run goes (() : the server's own /metrics)
    metrics_urls: tuple[str, ...] = ()
    kv_metrics: bool = True
    extra_body: dict[str, Any] = field(default_factory=dict)  # merged into every request (--structured)

    def __post_init__(self) -> None:
        if self.endpoint not in ("chat", "completions"):
            raise ValueError(f"--endpoint {self.endpoint!r}: choose chat or completions")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"--concurrency {self.concurrency} must be at least 1")
        if not self.request_rate > 0:
            raise ValueError(f"--request-rate {self.request_rate} must be positive (inf: all at once)")
        if self.request_timeout_s <= 0 or self.max_duration_s <= 0:
            raise ValueError("--timeout and --max-duration must be positive")

    @property
    def root(self) -> str:
        url = self.base_url.rstrip("/")
        return url.removesuffix("/v1")


@dataclass
class RequestRecord:
    """One request's timings in seconds; `error` is empty when it succeeded."""

    start_s: float = 0.0  # perf_counter at send
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error

    @property
    def tpot_s(self) -> float:
        n = self.completion_tokens
        return (self.e2e_s - self.ttft_s) / (n - 1) if n > 1 else 0.0


@dataclass(frozen=True)
class LatencyStats:
    """Milliseconds over `count` samples (all zero when there are none)."""

    count: int
    mean: float
    p50: float
    p90: float
    p99: float

    @staticmethod
    def of(seconds: list[float]) -> LatencyStats:
        if not seconds:
            return LatencyStats(0, 0.0, 0.0, 0.0, 0.0)
        ms = np.asarray(seconds, dtype=np.float64) * 1000.0
        p50, p90, p99 = (float(x) for x in np.percentile(ms, [50, 90, 99]))
        return LatencyStats(len(ms), float(ms.mean()), p50, p90, p99)


@dataclass(frozen=True)
class BenchResult:
    completed: int
    failed: int
    duration_s: float
    input_tokens: int
    output_tokens: int
    request_throughput: float  # completed requests / s
    output_throughput: float  # completion tokens / s
    total_token_throughput: float  # (prompt + completion tokens) / s
    goodput: float | None  # completed requests meeting every SLO bound / s; None without --slo
    peak_concurrency: int  # most requests in flight at once, from the records' intervals
    ttft: LatencyStats
    tpot: LatencyStats
    itl: LatencyStats
    e2e: LatencyStats
    first_error: str = ""
    slo: dict[str, float] = field(default_factory=dict)
    outcomes: dict[str, int] = field(default_factory=dict)  # pagoda/load/outcomes.py: ok, refused_429, ...
    meta: dict[str, Any] = field(default_factory=dict)  # model, endpoint, dataset, ... of the run
    # the per-request records (for --plot); not in to_dict()
    records: list[RequestRecord] = field(default_factory=list, repr=False, compare=False)
    # KV cache figures sampled from the server's /metrics (pagoda/load/server_metrics.py); None: not exposed
    kv: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(replace(self, records=[]))
        del out["records"]
        return out


def _meets(rec: RequestRecord, slo: dict[str, float]) -> bool:
    values_ms = {"ttft": rec.ttft_s * 1e3, "tpot": rec.tpot_s * 1e3, "e2e": rec.e2e_s * 1e3}
    return all(values_ms[k] <= bound for k, bound in slo.items())


def _peak_overlap(records: list[RequestRecord]) -> int:
    events = sorted(
        [(r.start_s, 1) for r in records] + [(r.start_s + r.e2e_s, -1) for r in records],
        key=lambda e: (e[0], e[1]),  # an end at the same instant as a start goes first
    )
    peak = cur = 0
    for _, delta in events:
        cur += delta
        peak = max(peak, cur)
    return peak


def summarize(records: list[RequestRecord], duration: float, slo: dict[str, float]) -> BenchResult:
    """Pure: aggregate per-request records of a run that took `duration` seconds."""
    assert duration > 0, f"duration {duration} must be positive"
    ok = [r for r in records if r.ok]
    errors = [r for r in records if not r.ok]
    in_tok = sum(r.prompt_tokens for r in ok)
    out_tok = sum(r.completion_tokens for r in ok)
    good = sum(_meets(r, slo) for r in ok) / duration if slo else None
    return BenchResult(
        completed=len(ok),
        failed=len(errors),
        duration_s=duration,
        input_tokens=in_tok,
        output_tokens=out_tok,
        request_throughput=len(ok) / duration,
        output_throughput=out_tok / duration,
        total_token_throughput=(in_tok + out_tok) / duration,
        goodput=good,
        peak_concurrency=_peak_overlap([r for r in records if r.e2e_s > 0]),
        ttft=LatencyStats.of([r.ttft_s for r in ok]),
        tpot=LatencyStats.of([r.tpot_s for r in ok if r.completion_tokens > 1]),
        itl=LatencyStats.of([gap for r in ok for gap in r.itl_s]),
        e2e=LatencyStats.of([r.e2e_s for r in ok]),
        first_error=errors[0].error if errors else "",
        slo=dict(slo),
        outcomes=count_outcomes(records),
    )


def auth_headers(cfg: ServeConfig) -> dict[str, str]:
    return {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}


def request_body(cfg: ServeConfig, model: str, turn: BenchTurn) -> dict[str, Any]:
    """The JSON body of one streamed request (chat or completion, as `cfg.endpoint` says)."""
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": turn.output_len,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if cfg.endpoint == "chat":
        body["messages"] = list(turn.messages)
    else:
        body["prompt"] = turn.prompt()
    if cfg.ignore_eos:
        body["ignore_eos"] = True
        if cfg.min_tokens_for_eos:
            body["min_tokens"] = turn.output_len
    return body | cfg.extra_body


async def _read_stream(resp: httpx.Response, timer: StreamTimer) -> None:
    lines = LineSplitter()
    async for data in resp.aiter_bytes():
        now = time.perf_counter()
        for line in lines.feed(data):
            if timer.line(line, now):
                return


async def send_request(
    client: httpx.AsyncClient, cfg: ServeConfig, model: str, turn: BenchTurn
) -> RequestRecord:
    """Stream one request and time it; failures land in `record.error`, never raise."""
    path = "/v1/chat/completions" if cfg.endpoint == "chat" else "/v1/completions"
    rec = RequestRecord(prompt_tokens=turn.input_len)
    timer = StreamTimer(rec, max_lines=64 + 8 * turn.output_len)  # a server streaming forever ends too
    rec.start_s = time.perf_counter()
    try:
        async with asyncio.timeout(cfg.request_timeout_s):
            body = request_body(cfg, model, turn)
            async with client.stream("POST", cfg.root + path, json=body, headers=auth_headers(cfg)) as resp:
                if resp.status_code == 200:
                    await _read_stream(resp, timer)
                else:
                    text = (await resp.aread())[:300].decode(errors="replace")
                    rec.error = f"HTTP {resp.status_code}: {text}"
    except TimeoutError:
        rec.error = f"{HUNG_PREFIX} --timeout {cfg.request_timeout_s:g}s"
    except (httpx.HTTPError, json.JSONDecodeError, AttributeError, TypeError) as exc:
        rec.error = f"{type(exc).__name__}: {exc}"
    timer.close(time.perf_counter(), turn.output_len)
    return rec


async def default_model(client: httpx.AsyncClient, cfg: ServeConfig) -> str:
    url = cfg.root + "/v1/models"
    try:
        resp = await client.get(url, headers=auth_headers(cfg), timeout=30.0)
        resp.raise_for_status()
        return str(resp.json()["data"][0]["id"])
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise ValueError(f"cannot list models at {url} ({exc}); is the server up? or pass --model") from exc


async def tokens_per_word(client: httpx.AsyncClient, cfg: ServeConfig, model: str) -> float | None:
    """The server's tokens per word on the benchmark's word list, or None without /tokenize."""
    text = sample_text()
    body = {"model": model, "prompt": text, "add_special_tokens": False}
    try:
        resp = await client.post(cfg.root + "/tokenize", json=body, headers=auth_headers(cfg), timeout=30.0)
        count = resp.json().get("count") if resp.status_code == 200 else None
    except (httpx.HTTPError, ValueError, AttributeError):
        return None
    return count / len(text.split()) if isinstance(count, int) and count > 0 else None


async def _drive(
    client: httpx.AsyncClient, cfg: ServeConfig, model: str, convs: list[Conversation]
) -> tuple[list[RequestRecord], float]:
    total = sum(len(c) for c in convs)
    records: list[RequestRecord] = []
    slots = asyncio.Semaphore(cfg.concurrency) if cfg.concurrency else None
    arrivals = random.Random(cfg.dataset.seed)
    bar = tqdm(total=total, disable=not cfg.progress, desc="requests", unit="req")

    async def conversation(conv: Conversation) -> None:
        async with slots or contextlib.nullcontext():
            for turn in conv:
                records.append(await send_request(client, cfg, model, turn))
                bar.update(1)

    tasks: list[asyncio.Task[None]] = []
    start = time.perf_counter()
    try:
        async with asyncio.timeout(cfg.max_duration_s):
            for conv in convs:
                tasks.append(asyncio.create_task(conversation(conv)))
                if math.isfinite(cfg.request_rate):
                    await asyncio.sleep(arrivals.expovariate(cfg.request_rate))
            await asyncio.gather(*tasks)
    except TimeoutError:
        pass
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        bar.close()
    duration = time.perf_counter() - start
    unfinished = RequestRecord(error=f"not finished within --max-duration {cfg.max_duration_s:g}s")
    records += [replace(unfinished) for _ in range(total - len(records))]
    return records, duration


async def run_benchmark(cfg: ServeConfig, client: httpx.AsyncClient | None = None) -> BenchResult:
    """Run the whole benchmark against cfg.base_url; `client` may be injected (tests)."""
    own = client is None
    if client is None:
        limits = httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency)
        client = httpx.AsyncClient(timeout=httpx.Timeout(cfg.request_timeout_s), limits=limits)
    try:
        model = cfg.model or await default_model(client, cfg)
        tpw = await tokens_per_word(client, cfg, model) if cfg.tokenize else None
        spec = replace(cfg.dataset, tokens_per_word=tpw or cfg.dataset.tokens_per_word)
        convs = load_dataset(spec)
        if not convs:
            raise ValueError(f"dataset {spec.name!r} gave no requests")
        sampler = KvSampler(client, list(cfg.metrics_urls) or [cfg.root + "/metrics"])
        sampling = cfg.kv_metrics and await sampler.start()
        try:
            records, duration = await _drive(client, cfg, model, convs)
        finally:
            await sampler.stop()
    finally:
        if own:
            await client.aclose()
    result = summarize(records, duration, cfg.slo)
    meta = {
        "base_url": cfg.base_url,
        "model": model,
        "endpoint": cfg.endpoint,
        "dataset": spec.name,
        "num_requests": len(records),
        "concurrency": cfg.concurrency,
        "request_rate": cfg.request_rate if math.isfinite(cfg.request_rate) else "inf",
        "tokens_per_word": round(spec.tokens_per_word, 4),
        "length_source": "tokenize" if tpw else "words",
    }
    kv = summarize_kv(sampler.samples) if sampling else None
    return replace(result, meta=meta, records=records, kv=kv)

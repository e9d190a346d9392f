"""`pagoda bench control-plane`: what the gateway -> tokenizer -> scheduler -> worker path costs per
token, measured with simulated workers (`pagoda worker --backend sim`) so no model gets in the way.

It starts a gateway, tokenizers, a scheduler and N sim workers as subprocesses over the real
RabbitMQ and Redis, in a namespace of its own; drives M concurrent streams through the OpenAI
streaming API (closed loop: each stream sends its next request when the last one ends) for a
fixed time at each level of `--streams`; and samples every process's CPU time over the level.
The report: streamed tokens/s, the added latency per token (observed inter-token latency minus
the modeled step time), TTFT, and CPU% per process (100% = one core), naming the busiest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlparse

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

from pagoda.load.control_plane_config import ControlPlaneConfig
from pagoda.load.datasets import BenchTurn, sample_text
from pagoda.load.outcomes import HUNG_PREFIX
from pagoda.load.proc_group import CpuWindow, ProcessGroup
from pagoda.load.serve_runner import LatencyStats, RequestRecord, ServeConfig, request_body
from pagoda.load.server_process import free_port
from pagoda.load.sse_client import HTTPError, SSEClient, StreamTimer
from pagoda.services.transport.messages import Queues


def cpu_ms_per_1k(cpu_pct: dict[str, float], tokens_per_s: float) -> dict[str, float]:
    """CPU% (100 = one core) at `tokens_per_s` -> CPU milliseconds per 1,000 tokens."""
    if tokens_per_s <= 0:
        return {}
    return {k: v * 10.0 * 1000.0 / tokens_per_s for k, v in cpu_pct.items()}


@dataclass
class LevelResult:
    streams: int
    requests: int  # completed
    failed: int
    duration_s: float
    tokens: int  # completion tokens of completed requests, as the clients were told (usage)
    chunks: int  # content chunks the clients received
    server_tokens: int  # the gateway's vllm:generation_tokens over the level
    tokens_per_s: float
    ttft: LatencyStats
    itl: LatencyStats
    added_itl: LatencyStats  # each gap between chunks - step time (bunched chunks go below 0)
    added_tpot: LatencyStats  # per request: (e2e - ttft) / (tokens - 1) - step time
    cpu: dict[str, float] = field(default_factory=dict)  # CPU% per process, 100 = one core
    first_error: str = ""
    per_gateway_tokens: list[int] = field(default_factory=list)  # server_tokens by gateway process

    @property
    def cpu_ms_per_1k_tokens(self) -> dict[str, float]:
        """CPU time per process per 1,000 streamed tokens: unlike CPU% and tok/s, this holds
        when other work shares the machine."""
        return cpu_ms_per_1k(self.cpu, self.tokens_per_s)

    @property
    def busiest(self) -> tuple[str, float]:
        name = max(self.cpu, key=lambda k: self.cpu[k]) if self.cpu else ""
        return name, self.cpu.get(name, 0.0)


# --- the stack ---------------------------------------------------------------------------------


async def _probe(cfg: ControlPlaneConfig) -> None:
    """Raise ConnectionError (one line naming the fix) when RabbitMQ or Redis cannot be reached."""
    from pagoda.services.transport.bus import make_bus
    from pagoda.services.transport.store import make_store

    bus = make_bus(cfg.bus)
    await bus.connect()
    await bus.close()
    store = make_store(cfg.store, prefix="probe:")
    await store.connect()
    await store.close()


def start_stack(cfg: ControlPlaneConfig, ns: str, port: int) -> tuple[ProcessGroup, list[str]]:
    """The stack's processes, and the /metrics URLs whose token counts add up to the gateways'
    (several gateways share `port`: each serves its own metrics on a port of its own)."""
    common = ["--bus", cfg.bus, "--store", cfg.store, "--namespace", ns, "--router", cfg.router]
    model = ["--model", cfg.model] if cfg.model else []
    log = ["--log-level", cfg.service_log_level]
    group = ProcessGroup()
    if cfg.gateways == 1:
        group.start("gateway", *log, "gateway", *model, *common, "--port", str(port))
        metrics = [f"http://127.0.0.1:{port}/metrics"]
    else:
        own = [free_port() for _ in range(cfg.gateways)]
        for i, mport in enumerate(own):
            shared = ["--port", str(port), "--reuse-port", "--metrics-port", str(mport)]
            group.start(f"gateway-{i}", *log, "gateway", *model, *common, *shared)
        metrics = [f"http://127.0.0.1:{mport}/metrics" for mport in own]
    for i in range(cfg.tokenizers):
        group.start(f"tokenizer-{i}", *log, "tokenizer", *model, *common)
    group.start("scheduler", *log, "scheduler", *common)
    sim = ["--backend", "sim", "--sim-step-ms", str(cfg.step_ms), "--sim-max-batch", str(cfg.max_batch)]
    for i in range(cfg.workers):
        group.start(f"worker-{i}", *log, "worker", *model, *common, *sim, "--worker-id", f"sim{i}")
    return group, metrics


def wait_ready(cfg: ControlPlaneConfig, group: ProcessGroup, base: str, ns: str) -> None:
    import redis

    r = redis.Redis.from_url(cfg.store)
    deadline = time.monotonic() + cfg.startup_timeout_s
    try:
        while time.monotonic() < deadline:
            group.check_alive()
            with contextlib.suppress(httpx.HTTPError):
                ready = httpx.get(base + "/health/ready", timeout=2.0).status_code == 200
                if ready and int(r.scard(f"{ns}:workers")) >= cfg.workers:
                    return
            time.sleep(0.3)
    finally:
        r.close()
    raise RuntimeError(f"the stack was not ready within --startup-timeout {cfg.startup_timeout_s:g}s")


def cleanup(cfg: ControlPlaneConfig, ns: str, model: str | None) -> None:
    """Delete the run's store keys and durable queues (the broker and store are shared); `model`:
    the served model's name (its tokenize queue), None when the stack never answered."""
    import redis

    r = redis.Redis.from_url(cfg.store)
    with contextlib.suppress(Exception):
        for key in r.scan_iter(f"{ns}:*"):
            r.delete(key)
    r.close()
    queues = Queues(ns)
    names = [queues.schedule, *(queues.worker(f"sim{i}") for i in range(cfg.workers))]
    names += [queues.tokenize(model)] if model is not None else []
    with contextlib.suppress(Exception):
        asyncio.run(_delete_queues(cfg.bus, names))


async def _delete_queues(url: str, names: list[str]) -> None:
    import aio_pika

    conn = await aio_pika.connect(url)
    try:
        channel = await conn.channel()
        for name in names:
            with contextlib.suppress(Exception):
                await channel.queue_delete(name)
    finally:
        await conn.close()


# --- one level ---------------------------------------------------------------------------------


def generation_tokens(metrics_text: str) -> int:
    """The sum of vllm:generation_tokens_total over its labels in a /metrics text."""
    return int(
        sum(
            sample.value
            for family in text_string_to_metric_families(metrics_text)
            for sample in family.samples
            if sample.name == "vllm:generation_tokens_total"
        )
    )


async def _scrape_tokens(client: httpx.AsyncClient, urls: list[str]) -> list[int]:
    """Each gateway's generation tokens so far."""
    counts = []
    for url in urls:
        resp = await client.get(url, timeout=10.0)
        resp.raise_for_status()
        counts.append(generation_tokens(resp.text))
    return counts


async def send_lean(client: SSEClient, cfg: ServeConfig, model: str, turn: BenchTurn) -> RequestRecord:
    """`serve_runner.send_request` over a keep-alive `SSEClient` (chat, no auth): the same record,
    for a fraction of httpx's CPU per chunk."""
    rec = RequestRecord(prompt_tokens=turn.input_len)
    timer = StreamTimer(rec, max_lines=64 + 8 * turn.output_len)
    rec.start_s = time.perf_counter()
    try:
        async with asyncio.timeout(cfg.request_timeout_s):
            status, body = await client.post("/v1/chat/completions", request_body(cfg, model, turn), timer)
        if status != 200:
            rec.error = f"HTTP {status}: {body[:300].decode(errors='replace')}"
    except TimeoutError:
        rec.error = f"{HUNG_PREFIX} --timeout {cfg.request_timeout_s:g}s"
    except (OSError, HTTPError, ValueError, AttributeError, TypeError) as exc:
        rec.error = f"{type(exc).__name__}: {exc}"
    timer.close(time.perf_counter(), turn.output_len)
    return rec


async def run_level(
    cfg: ControlPlaneConfig, group: ProcessGroup, base: str, metrics: list[str], model: str, m: int
) -> LevelResult:
    url = urlparse(base)
    scfg = ServeConfig(
        base_url=base, model=model, ignore_eos=True, tokenize=False, progress=False,
        request_timeout_s=cfg.request_timeout_s,
    )  # fmt: skip
    async with httpx.AsyncClient(timeout=httpx.Timeout(cfg.request_timeout_s)) as client:
        before = await _scrape_tokens(client, metrics)
        records: list[RequestRecord] = []
        text = sample_text(cfg.prompt_words + 50).split()

        async def stream(i: int, deadline: float) -> None:
            n = 0
            lean = SSEClient(url.hostname or "127.0.0.1", url.port or 80)
            try:
                while time.perf_counter() < deadline:
                    words = " ".join(text[(i + n) % 50 :][: cfg.prompt_words])
                    turn = BenchTurn(({"role": "user", "content": f"{i}.{n} {words}"},), cfg.prompt_words,
                                     cfg.output_len)  # fmt: skip
                    records.append(await send_lean(lean, scfg, model, turn))
                    n += 1
            finally:
                lean.close()

        window = CpuWindow.begin(group)
        start = time.perf_counter()
        await asyncio.gather(*(stream(i, start + cfg.duration_s) for i in range(m)))
        duration = time.perf_counter() - start
        cpu = window.end(group)
        served = [0] * len(before)
        for _ in range(20):  # the gateway counts a request's tokens as it closes the stream
            after = await _scrape_tokens(client, metrics)
            served = [a - b for a, b in zip(after, before, strict=True)]
            if sum(served) >= sum(r.completion_tokens for r in records if r.ok):
                break
            await asyncio.sleep(0.1)
    level = summarize_level(cfg, m, records, duration, cpu, sum(served))
    level.per_gateway_tokens = served
    return level


def summarize_level(
    cfg: ControlPlaneConfig,
    m: int,
    records: list[RequestRecord],
    duration: float,
    cpu: dict[str, float],
    server_tokens: int,
) -> LevelResult:
    """Pure: one level's report from its request records."""
    ok = [r for r in records if r.ok]
    errors = [r for r in records if not r.ok]
    tokens = sum(r.completion_tokens for r in ok)
    step = cfg.step_ms / 1e3
    gaps = [g for r in ok for g in r.itl_s]
    return LevelResult(
        streams=m,
        requests=len(ok),
        failed=len(errors),
        duration_s=duration,
        tokens=tokens,
        chunks=sum(len(r.itl_s) + 1 for r in ok if r.completion_tokens),
        server_tokens=server_tokens,
        tokens_per_s=tokens / duration,
        ttft=LatencyStats.of([r.ttft_s for r in ok]),
        itl=LatencyStats.of(gaps),
        added_itl=LatencyStats.of([g - step for g in gaps]),
        added_tpot=LatencyStats.of([r.tpot_s - step for r in ok if r.completion_tokens > 1]),
        cpu=cpu,
        first_error=errors[0].error if errors else "",
    )


# --- the run -----------------------------------------------------------------------------------


def run_control_plane(cfg: ControlPlaneConfig) -> dict[str, Any]:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    asyncio.run(_probe(cfg))
    ns = cfg.namespace or f"bench-cp-{uuid.uuid4().hex[:8]}"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    group, metrics = start_stack(cfg, ns, port)
    levels: list[LevelResult] = []
    served: str | None = None
    codes: dict[str, int] = {}
    try:
        for name, url in (("rabbitmq", cfg.bus), ("redis", cfg.store)):
            parsed = urlparse(url)
            if parsed.hostname in ("127.0.0.1", "localhost") and parsed.port:
                group.watch_listener(name, parsed.port)
        group.external["bench client"] = psutil.Process()
        t0 = time.perf_counter()
        wait_ready(cfg, group, base, ns)
        _say(
            cfg, f"stack ready in {time.perf_counter() - t0:.1f}s: namespace {ns}, {cfg.workers} sim workers"
        )
        model = str(httpx.get(base + "/v1/models", timeout=10.0).json()["data"][0]["id"])
        served = model
        for m in cfg.streams:
            level = asyncio.run(run_level(cfg, group, base, metrics, model, m))
            group.check_alive()
            levels.append(level)
            name, pct = level.busiest
            _say(cfg, f"{m} streams: {level.tokens_per_s:.0f} tok/s, added ITL p99 "
                      f"{level.added_itl.p99:.2f} ms, busiest {name} {pct:.0f}%")  # fmt: skip
    finally:
        codes = group.stop()
        cleanup(cfg, ns, served)
    meta = {k: v for k, v in asdict(cfg).items() if k not in ("progress",)}
    return {
        "config": meta | {"namespace": ns},
        "levels": [_level_dict(lv) for lv in levels],
        "exit_codes": codes,
    }


def _level_dict(lv: LevelResult) -> dict[str, Any]:
    return asdict(lv) | {"busiest": list(lv.busiest), "cpu_ms_per_1k_tokens": lv.cpu_ms_per_1k_tokens}


def _say(cfg: ControlPlaneConfig, text: str) -> None:
    if cfg.progress:
        print(text, flush=True)

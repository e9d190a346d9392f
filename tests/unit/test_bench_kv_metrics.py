"""bench serve's KV cache report: gauges parsed from a real /metrics text, the run summary's
numbers, and a run against a fake server whose /metrics changes while requests stream."""

from __future__ import annotations

import pytest
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from pagoda.engine.config import BatcherConfig
from pagoda.engine.core.engine_core import EngineCore
from pagoda.engine.kv.kv_cache_manager import KVCacheManager
from pagoda.engine.sampling.params import SamplingParams
from pagoda.engine.scheduling.batcher import Batcher
from pagoda.engine.scheduling.request import Request as EngineRequest
from pagoda.load.bench_serve import format_result
from pagoda.load.datasets import DatasetSpec
from pagoda.load.serve_runner import ServeConfig, run_benchmark
from pagoda.load.server_metrics import KvSample, parse_kv, summarize_kv
from pagoda.services.ops.metrics import Metrics
from tests.unit.test_bench_serve import FakeOpenAI, fake  # noqa: F401  (the fixture)


def _core(name: str, prompt_lens: tuple[int, ...]) -> EngineCore:
    core = EngineCore.__new__(EngineCore)  # scheduler + cache, no model
    core.model_name = "tiny"
    core.kv = KVCacheManager(10, block_size=4)
    core.batcher = Batcher(BatcherConfig(max_num_batched_tokens=64), core.kv, 64, [0])
    for i, n in enumerate(prompt_lens):
        core.batcher.add_request(EngineRequest(f"{name}{i}", list(range(50 * i + 1, 50 * i + 1 + n)),
                                                 SamplingParams(max_tokens=4)))  # fmt: skip
    core.batcher.schedule()
    return core


def test_parse_kv_sums_the_engines() -> None:
    metrics = Metrics()
    metrics.engines().add("w0", _core("a", (5, 8)))  # 13 tokens in 2 + 2 blocks of 4: 16 slots
    metrics.engines().add("w1", _core("b", (3,)))  # 3 tokens in 1 block
    got = parse_kv(metrics.render().decode())
    assert got == KvSample(live_tokens=16.0, used_slots=20.0, usage=(0.4 + 0.1) / 2)
    assert got.live_ratio == 0.8
    assert parse_kv("# nothing here\nother_metric 1.0\n") is None


def test_summarize_kv() -> None:
    samples = [
        KvSample(0, 0, 0.0),  # idle: ignored
        KvSample(30, 40, 0.5),
        KvSample(72, 80, 1.0),  # the peak
        KvSample(18, 40, 0.5),
    ]
    s = summarize_kv(samples)
    assert s is not None
    assert (s["samples"], s["peak_usage"], s["live_ratio_at_peak"]) == (4, 1.0, 0.9)
    assert s["live_ratio_mean"] == pytest.approx(120 / 160)
    assert s["min_live_ratio"] == pytest.approx(0.45)
    assert summarize_kv([]) is None
    assert summarize_kv([KvSample(0, 0, 0.0)]) == {"samples": 1, "peak_usage": 0.0}


async def test_run_samples_kv_from_metrics(fake: tuple[FakeOpenAI, str]) -> None:  # noqa: F811
    server, url = fake
    scrapes = 0

    async def metrics(request: Request) -> Response:
        nonlocal scrapes
        scrapes += 1
        used = 0 if scrapes == 1 else 64  # idle at the probe, then busy
        text = (
            f'pagoda:kv_cache_live_tokens{{engine="w0",model_name="m"}} {0.9 * used}\n'
            f'pagoda:kv_cache_used_slots{{engine="w0",model_name="m"}} {used}\n'
            f'vllm:kv_cache_usage_perc{{engine="w0",model_name="m"}} {used / 128}\n'
        )
        return PlainTextResponse(text)

    server.app.add_route("/metrics", metrics)
    spec = DatasetSpec(name="random", num_prompts=4, input_len=8, output_len=12)
    cfg = ServeConfig(base_url=url, concurrency=2, dataset=spec, progress=False, tokenize=False)
    r = await run_benchmark(cfg)
    assert r.completed == 4
    assert r.kv is not None and r.kv["samples"] >= 1
    assert r.kv["peak_usage"] == 0.5 and r.kv["live_ratio_mean"] == pytest.approx(0.9)
    assert "Live-token ratio at peak usage:" in format_result(r)
    assert "kv" in r.to_dict()

